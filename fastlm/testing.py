"""The numerical policy (DESIGN.md) as test helpers, shared by every op's tests.

A result passes when its max error against a float64 reference is at most twice the error
of PyTorch's own implementation at the same dtype, plus a floor of one unit in the last
place of the result's dtype at the reference's scale (two correct roundings of the same
value may differ by that much). For a sum over many terms (dweight, dbias), the scale is
the sum of the terms' magnitudes (:func:`summand_scale`): a correctly accumulated fp32 sum
carries rounding error of that order whatever order it adds in, and PyTorch's CPU kernels
(cascade summation) happen to be more exact than GPU-style tree reductions.

Two float32 computations of the same math in different orders (fastlm against transformers,
a batched pass against one request at a time) are held to the same rule, each against the
float64 run, with a statistic that does not hinge on luck: a loss or log-likelihood from the
error of the logits it is computed from (:func:`assert_loss_policy`), a small model's outputs
or gradients in 2-norm (:func:`assert_policy_norm`). Results equal by construction are
compared bit for bit (:func:`assert_equal`). Every failure prints the values, their
difference and what was allowed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.ops import masks


def max_error(actual: Tensor, reference: Tensor) -> float:
    diff = (actual.double() - reference.double()).abs()
    return 0.0 if diff.numel() == 0 else diff.max().item()


def summand_scale(terms: Tensor, dims: int | tuple[int, ...]) -> float:
    """Largest sum of ``|terms|`` over ``dims``: the floor's scale for a reduction."""
    return terms.double().abs().sum(dim=dims).max().item()


def assert_policy(
    actual: Tensor,
    reference: Tensor,
    baseline: Tensor,
    name: str = "output",
    factor: float = 2.0,
    scale: float | None = None,
) -> None:
    """Assert ``actual`` is within the numerical policy of ``reference`` (float64 oracle),
    given ``baseline`` (PyTorch's own result at ``actual``'s dtype). ``scale`` sets the
    floor's magnitude (default: the reference's largest element).

    Fails with a report naming the worst element, its values and the allowed error. NaN or
    inf in ``actual`` where the reference is finite always fails (unwritten outputs are
    NaN-poisoned by :func:`poisoned_outputs`).
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}")
    ref = reference.double()
    bad = ~torch.isfinite(actual.double()) & torch.isfinite(ref)
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {actual.numel()} elements are NaN/inf where the "
            f"reference is finite; first at {idx}: got {actual[idx].item()}, "
            f"expected {ref[idx].item()}"
        )
    if actual.numel() == 0:
        return
    scale = ref.abs().max().item() if scale is None else scale
    floor = torch.finfo(actual.dtype).eps * max(scale, 1e-30)
    err = (actual.double() - ref).abs()
    worst = err.max().item()
    base_err = max_error(baseline, ref)
    allowed = factor * base_err + floor
    if not worst <= allowed:
        idx = tuple(i.item() for i in (err == worst).nonzero()[0])
        over = int((err > allowed).sum())
        raise AssertionError(
            f"{name} ({actual.dtype}): max error {worst:.3e} > allowed {allowed:.3e} "
            f"(= {factor} x PyTorch's {base_err:.3e} + floor {floor:.3e}); {over} of "
            f"{actual.numel()} elements over. Worst at {idx}: got {actual[idx].item():.9g}, "
            f"reference {ref[idx].item():.9g}, PyTorch {baseline[idx].item():.9g}"
        )


def assert_policy_norm(
    actual: Tensor | dict[str, Tensor],
    reference: Tensor | dict[str, Tensor],
    baseline: Tensor | dict[str, Tensor],
    name: str = "output",
    factor: float = 2.0,
) -> None:
    """The numerical policy in 2-norm over all elements, for float32 results composed of
    many rounded steps (a small model's outputs, its gradients): there, the largest single
    error is a noisy statistic (PyTorch's own run can be nearly exact at every element of a
    tensor by chance, or hold pure noise where the exact value is zero), the 2-norm of all
    the errors is not. Allowed: ``factor`` x the 2-norm of PyTorch's error against the
    float64 ``reference``, plus one rounding of every element (eps x the reference's norm).
    Dicts (name -> tensor, the same keys) are measured together; a failure names the
    tensors with the largest errors (or the worst element of a single tensor)."""
    single = isinstance(actual, Tensor)
    if single:
        actual, reference, baseline = ({name: t} for t in (actual, reference, baseline))
    rows, eps = {}, 0.0
    for key, ref in reference.items():
        got, base = actual[key], baseline[key]
        if got.shape != ref.shape:
            raise AssertionError(f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        ref = ref.double()
        rows[key] = [(t.double() - ref).norm().item() for t in (got, base)] + [ref.norm().item()]
        eps = max(eps, torch.finfo(got.dtype).eps)
    got, own, size = (math.hypot(*column) for column in zip(*rows.values(), strict=True))
    floor = eps * size
    allowed = factor * own + floor
    if got <= allowed:
        return
    if single:
        a, r, b = actual[name], reference[name].double(), baseline[name]
        worst = (a.double() - r).abs().nan_to_num(nan=math.inf)
        idx = tuple(i.item() for i in (worst == worst.max()).nonzero()[0])
        where = (
            f"Worst at {idx}: got {a[idx].item():.9g}, reference {r[idx].item():.9g}, "
            f"PyTorch {b[idx].item():.9g}"
        )
    else:
        top = sorted(rows.items(), key=lambda item: -item[1][0])[:3]
        where = "Largest: " + ", ".join(f"{k} {e[0]:.3e} (PyTorch {e[1]:.3e})" for k, e in top)
    count = sum(t.numel() for t in reference.values())
    raise AssertionError(
        f"{name}: error {got:.3e} (2-norm over {count} elements) > allowed {allowed:.3e} "
        f"(= {factor} x PyTorch's {own:.3e} + one rounding of each {floor:.3e}). {where}"
    )


def assert_within(
    actual: Tensor | float,
    reference: Tensor | float,
    allowed: float,
    name: str = "output",
    basis: str = "",
) -> None:
    """Assert every element of ``actual`` is within ``allowed`` (absolute) of ``reference``,
    for a bound derived elsewhere; ``basis`` says how, and is printed on failure with the
    worst element's values, their difference and the bound. NaN fails."""
    actual, reference = (
        t if isinstance(t, Tensor) else torch.tensor(t, dtype=torch.float64)
        for t in (actual, reference)
    )
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}")
    err = (actual.double() - reference.double()).abs()
    over = ~(err <= allowed)
    if over.any():
        ranked = torch.where(over, err.nan_to_num(nan=math.inf), -1.0)
        idx = tuple(i.item() for i in (ranked == ranked.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: {int(over.sum())} of {actual.numel()} elements differ by more than "
            f"allowed {allowed:.3e}{f' ({basis})' if basis else ''}. Worst at {idx}: got "
            f"{actual[idx].item():.9g}, reference {reference[idx].item():.9g}, difference "
            f"{err[idx].item():.3e}"
        )


def assert_equal(actual: Tensor, expected: Tensor, name: str = "output", basis: str = "") -> None:
    """Assert ``actual`` is ``expected`` bit for bit (dtype, shape and every element), for
    results equal by construction (the same computation twice, a round trip, untouched
    memory); ``basis`` says why they must be. Fails naming the first differing element."""
    why = f" ({basis})" if basis else ""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise AssertionError(
            f"{name}{why}: {actual.dtype} {tuple(actual.shape)} != "
            f"{expected.dtype} {tuple(expected.shape)}"
        )
    if torch.equal(actual, expected):
        return
    differ = actual != expected
    idx = tuple(i.item() for i in differ.nonzero()[0])
    raise AssertionError(
        f"{name}{why}: {int(differ.sum())} of {actual.numel()} elements differ, largest "
        f"difference {max_error(actual, expected):.3e}; first at {idx}: got "
        f"{actual[idx].item():.9g}, expected {expected[idx].item():.9g}"
    )


def loss_allowance(
    loss64: Tensor | float,
    logits: Tensor,
    logits64: Tensor,
    weight: float = 2.0,
    loss_dtype: torch.dtype = torch.float32,
) -> tuple[float, str]:
    """What the numerical policy allows a cross-entropy (or log-likelihood) computed from
    ``logits`` (classes last), given the float64 twin's ``loss64`` from ``logits64``:
    ``(allowed, basis)``.

    A single scalar's rounding error is random and can be near zero by chance, so the bound
    comes from the logits (many elements, a stable measure): the loss moves at most
    ``weight`` times its logits' largest change, ``weight`` being the absolute sum of its
    gradient in the logits (2 for one row's ``-log_softmax`` or a mean over rows: softmax
    minus one-hot; 2k for a sum of k rows). Allowed: ``weight`` x (the logits' allowance
    under the policy, 2 x their error in PyTorch's run + one rounding at their scale; + one
    float32 ulp of the largest log-probability, which the loss adds up in float32), plus
    one rounding of the loss in ``loss_dtype``."""
    scale = logits64.double().abs().max().item() if logits64.numel() else 0.0
    per_logit = 2 * max_error(logits, logits64) + torch.finfo(logits.dtype).eps * scale
    logp = logits64.double().log_softmax(-1)
    logp_scale = logp[torch.isfinite(logp)].abs().max().item() if logp.numel() else 0.0
    loss64 = torch.as_tensor(loss64).double()
    loss_scale = loss64.abs().max().item() if loss64.numel() else 0.0
    eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(loss_dtype).eps
    allowed = weight * (per_logit + eps32 * logp_scale) + eps * loss_scale
    basis = (
        f"{weight:g} x (the logits' {per_logit:.3e}: 2 x their error in PyTorch + 1 ulp; "
        f"+ 1 ulp of the largest |log-prob| {logp_scale:.3g}) + 1 ulp of the loss"
    )
    return allowed, basis


def assert_loss_policy(
    loss: Tensor | float,
    loss64: Tensor | float,
    logits: Tensor,
    logits64: Tensor,
    name: str = "loss",
    weight: float = 2.0,
) -> None:
    """``loss`` (a cross-entropy or log-likelihood, a tensor or a float, float32 unless a
    tensor says otherwise) against the float64 twin's ``loss64`` within
    :func:`loss_allowance`; the failure prints both, their difference and the basis."""
    dtype = loss.dtype if isinstance(loss, Tensor) else torch.float32
    allowed, basis = loss_allowance(loss64, logits, logits64, weight, dtype)
    assert_within(loss, loss64, allowed, name, basis)


def sdpa_baseline(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    bias: Tensor | None = None,
    alibi: Tensor | None = None,
) -> Tensor:
    """PyTorch's own attention at the inputs' dtype (the policy's baseline): SDPA on
    (B, S, H, D) tensors, the window, bias and ALiBi as one additive mask in that dtype."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    seen = masks.visible(seqlen_q, seqlen_k, causal, masks.window_bounds(window), q.device)
    mask = masks.additive_mask(seen, torch.float32)
    if bias is not None:
        mask = mask + bias.float()
    if alibi is not None:
        distance = masks.diagonal_offset(seqlen_q, seqlen_k, q.device).abs()
        mask = mask - alibi.float().reshape(-1, q.shape[2], 1, 1) * distance
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.to(q.dtype),
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)


def attention_grad_scales(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, out: Tensor, probs: Tensor, scale: float
) -> tuple[float, float, float]:
    """Floors' scales for dq, dk, dv: the largest sums of |terms| each gradient adds up,
    ``dS = P * (dP - delta)`` then ``dq = scale * dS k``, ``dk = scale * dS^T q``,
    ``dv = P^T dO``. They cancel (a single key gives dq = 0 exactly), so one ulp of the
    terms, not of the result, is what rounding can cost. ``probs``: (B, H, Sq, Sk)."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.double().repeat_interleave(group, dim=2) for t in (k, v))
    do, out = do.double(), out.double()
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v).abs()
    delta = (do * out).sum(-1).transpose(1, 2).abs()[..., None]
    terms = probs * (dp + delta)  # (B, H, Sq, Sk)
    dq = scale * terms.sum(-1).max() * k.abs().max()
    dk = scale * terms.sum(-2).max() * q.double().abs().max()
    dv = (probs.sum(-2).max() * do.abs().max()).item()
    return dq.item(), dk.item(), dv


def assert_attention_policy(
    out: Tensor,
    grads: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    do: Tensor,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    bias: Tensor | None = None,
    alibi: Tensor | None = None,
) -> None:
    """Attention's ``out`` and ``grads`` ((dq, dk, dv), then dbias with ``bias``) for
    ``(out * do).sum()``, against the float64 reference under the numerical policy, with
    :func:`sdpa_baseline` at q's dtype as PyTorch's own error (default softmax scale)."""
    from fastlm.ops.attention import attention_probs, attention_ref

    scale = q.shape[-1] ** -0.5

    def run(dtype: torch.dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        b = None if bias is None else bias.detach().to(dtype).requires_grad_()
        if dtype == torch.float64:
            o = attention_ref(*leaves, causal, scale, window, b, alibi)[0]
        else:
            o = sdpa_baseline(*leaves, causal, scale, window, b, alibi)
        wanted = leaves + ([b] if b is not None else [])
        return o, torch.autograd.grad((o * do.to(dtype)).sum(), wanted)

    ref_out, ref_grads = run(torch.float64)
    base_out, base_grads = run(q.dtype)
    bias64 = None if bias is None else bias.double()
    probs, _ = attention_probs(q.double(), k.double(), causal, scale, window, bias64, alibi)
    scales = attention_grad_scales(q, k, v, do, ref_out, probs, scale)
    assert_policy(out, ref_out, base_out, "out")
    names = ("dq", "dk", "dv", "dbias")
    floors = (*scales, None)
    for name, got, ref, base, floor_scale in zip(
        names, grads, ref_grads, base_grads, floors, strict=False
    ):
        assert_policy(got, ref, base, name, scale=floor_scale)


def assert_lse(
    lse: Tensor,
    q: Tensor,
    k: Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    bias: Tensor | None = None,
    alibi: Tensor | None = None,
    name: str = "lse",
) -> None:
    """Attention's float32 log-sum-exp (B, H, Sq) against the scores' log-sum-exp in
    float64, within 64 float32 ulps of the largest |lse|: an online softmax rounds the row's
    running maximum, each ``(s - m) * log2(e)``, every rescaling of the running sum and the
    final ``m + log(l)``, a few float32 roundings at the scale of the row's largest terms,
    where ``torch.logsumexp`` of float32 scores rounds about once (2 x its error is not a
    bound: the kernels measured up to 8 ulps against its 2). Rows that see no key must be
    -inf in both. q: (B, Sq, H, D); k: (B, Sk, Hkv, D)."""
    from fastlm.ops.attention import attention_probs

    b = None if bias is None else bias.double()
    reference = attention_probs(q.double(), k.double(), causal, scale, window, b, alibi)[1]
    visible = torch.isfinite(reference)
    assert_equal(torch.isfinite(lse), visible, f"{name} finite", "rows that see a key")
    largest = reference[visible].abs().max().item() if visible.any() else 0.0
    allowed = 64 * torch.finfo(torch.float32).eps * largest
    basis = f"64 float32 ulps of the largest |lse| {largest:.4g}"
    assert_within(lse[visible], reference[visible], allowed, name, basis)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floating tensors, so an
    output element a kernel forgets to write shows up as NaN instead of stale memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: Tensor) -> Tensor:
        return t.fill_(math.nan) if t.is_floating_point() and t.numel() else t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
