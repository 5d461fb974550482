"""torch.compile of fastlm's GPT: the whole forward, and a training step, traced with
``fullgraph=True``, which raises at any graph break (fastlm's ops enter the graph through
their fake impls or as the PyTorch ops of their torch backend), within the numerical policy
of eager; and the static decode step (``generate(compile=...)``, :class:`StaticDecoder`)
compiled once and replayed at every position, giving eager ``generate``'s greedy tokens.

The CPU tests trace with ``backend="aot_eager"`` (Dynamo and AOTAutograd, no code
generation: seconds, where Inductor compiles C++ per graph); the CUDA-graph capture of the
decode step (``mode="reduce-overhead"``) runs where a GPU is, its CPU twin here."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from fastlm.models import create
from fastlm.models.generation import CACHE_BUCKET, StaticDecoder
from fastlm.testing import assert_policy_norm

VOCAB = 97
# GPT-2 (learned positions, LayerNorm, GELU), Llama (rotary, RMSNorm, SwiGLU, GQA) and
# Gemma 2 (soft caps, sliding window on alternate layers, sandwich norms) at test size.
PRESETS = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "gemma2": "gemma2-tiny"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from scratch: Dynamo remembers what it saw across calls (a float
    seen with two values becomes symbolic in the next trace)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# One layer where the test traces the model whole (tracing time grows with depth); Gemma 2
# keeps two, a sliding-window layer and a full one.
TRACE_LAYERS = {"gpt2": 1, "llama": 1, "gemma2": 2}


def _model(name: str, num_layers: int = 2) -> torch.nn.Module:
    # Weights at 0.1 (not 0.02): logits spread over units, so that greedy picks are not
    # near-ties that a different summation order could flip.
    return create(PRESETS[name], vocab_size=VOCAB, num_layers=num_layers, initializer_range=0.1)


def _left_padded(batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, seqlen))
    mask = torch.ones_like(ids)
    mask[0, : seqlen // 2] = 0  # row 0 holds half its positions, left-padded
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", list(PRESETS))
def test_forward_traces_whole_and_keeps_eager_numbers(name):
    model = _model(name, TRACE_LAYERS[name]).eval()
    ids, mask = _left_padded(2, 11)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(ids, attention_mask=mask).logits
    eager = model(ids, attention_mask=mask).logits
    reference = model.double()(ids, attention_mask=mask).logits
    keep = mask.bool()  # padded queries see no key: their rows are zeros by contract
    assert_policy_norm(got[keep], reference[keep], eager[keep], name="logits")


@pytest.mark.parametrize("name", list(PRESETS))
def test_training_step_traces_whole_and_keeps_eager_gradients(name):
    """Forward with labels (the fused linear cross-entropy, ignored labels included) and
    backward through the compiled graph: the loss and every gradient as eager's, within
    the policy against float64."""
    model = _model(name, TRACE_LAYERS[name]).train()
    ids = torch.randint(1, VOCAB, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100

    def loss_and_grads(m, run):
        m.zero_grad()
        loss = run(ids, labels=labels).loss
        loss.backward()
        return {"loss": loss.detach(), **{k: p.grad for k, p in m.named_parameters()}}

    got = loss_and_grads(model, torch.compile(model, fullgraph=True, backend="aot_eager"))
    eager = loss_and_grads(model, model)
    reference = loss_and_grads(model.double(), model)
    assert_policy_norm(got, reference, eager, name="loss and gradients")


@pytest.mark.parametrize("name", list(PRESETS))
def test_compiled_decode_step_traces_once_and_gives_eager_tokens(name):
    """The decode step traces whole, once: one graph serves every position of a call, and
    a later call of the same batch size and cache bucket (other prompts, other lengths)
    runs without recompiling (``fail_on_recompile``). Greedy tokens equal eager
    ``generate``'s, left-padded rows included."""
    model = _model(name).eval()
    ids, mask = _left_padded(3, 9)
    counter = CompileCounterWithBackend("aot_eager")
    got = model.generate(ids, 7, attention_mask=mask, compile={"backend": counter})
    want = model.generate(ids, 7, attention_mask=mask)
    assert torch.equal(got, want), f"compiled\n{got}\neager\n{want}"
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for 6 decode steps"

    other, other_mask = _left_padded(3, 5)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = model.generate(other, 9, attention_mask=other_mask, compile={"backend": counter})
    assert torch.equal(got, model.generate(other, 9, attention_mask=other_mask))
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_compiled_decode_step_creates_no_host_tensor_and_reads_nothing_back(name):
    """What would keep a CUDA graph from capturing the step (its CPU twin, on the graph
    Dynamo traces): no tensor made from Python numbers per step (a CPU constant in the
    graph: Gemma's embedding scale was one), no value read back to the host (.item(),
    .tolist()), no op of another graph than this one (one graph, fullgraph)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _model(name).eval()
    decoder = StaticDecoder(model, 2, 16, {"backend": record})
    with torch.no_grad():
        decoder.prefill(torch.randint(1, VOCAB, (2, 3)), torch.tensor([3, 2]))
        decoder.step(torch.randint(1, VOCAB, (2, 1)), torch.tensor([3, 2]))
    assert len(graphs) == 1
    made = (torch.tensor, torch.as_tensor, torch.scalar_tensor)
    bad = [
        n.format_node()
        for n in graphs[0].graph.nodes
        if (n.op == "call_function" and n.target in made)
        or (n.op == "call_method" and n.target in ("item", "tolist"))
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_scale_gives_the_scale_tensors_bits(dtype):
    """Gemma's embeddings times sqrt(hidden) rounded to their dtype: the Python number
    gives the product with the 0-dim tensor bit for bit (Gemma 2's sizes and others)."""
    from fastlm.models.gpt import embedding_scale

    h = torch.randn(4096).to(dtype)
    for size in (2304, 3584, 4608, 3, 64, 100, 1000, 2047, 5120, 8191):
        want = h * torch.tensor(size**0.5, dtype=dtype)
        got = h * embedding_scale(size, dtype)
        assert torch.equal(got, want), (size, (got.float() - want.float()).abs().max())


def test_static_decoder_is_kept_per_shape_and_replaced():
    model = _model("gpt2")
    first = model.static_decoder(2, 10)
    assert model.static_decoder(2, CACHE_BUCKET) is first  # the same bucket
    assert first.max_len == CACHE_BUCKET and first.caches[0].k.shape[:2] == (2, CACHE_BUCKET)
    assert model.static_decoder(3, 10) is not first
    assert model.static_decoder(3, CACHE_BUCKET + 1).max_len == 2 * CACHE_BUCKET


def test_eager_static_step_equals_the_eager_decode_step():
    """The step uncompiled is the eager decode: its logits equal the full forward's at the
    last position (the policy), fed token by token at tensor positions."""
    model = _model("llama").eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    decoder = StaticDecoder(model, 2, 16)
    logits = decoder.prefill(ids[:, :3], torch.tensor([3, 3]))
    steps = [logits]
    for i in range(3, 6):
        steps.append(decoder.step(ids[:, i : i + 1], torch.tensor([i, i])))
    got = torch.stack(steps[:-1], 1)
    eager = model(ids[:, :5]).logits[:, 2:]
    reference = model.double()(ids[:, :5]).logits[:, 2:]
    assert_policy_norm(got, reference, eager, name="step logits")


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        (dict(compile="yes"), TypeError, "compile must be a bool or a dict"),
        (dict(compile={"fullgraph": False}), ValueError, "fullgraph"),
        (dict(compile=True, paged=True), ValueError, "contiguous cache"),
    ],
)
def test_compile_bad_input(kwargs, error, word):
    with pytest.raises(error, match=word):
        _model("gpt2", num_layers=1).generate(torch.ones(1, 3, dtype=torch.long), 2, **kwargs)


def test_t5_has_no_static_decoder():
    model = create("t5-tiny", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="compile: T5"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 2, compile=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(PRESETS))
def test_cuda_graph_decode_step_gives_eager_tokens(name):
    """``compile=True`` on CUDA: Inductor with ``mode="reduce-overhead"``, the step one
    CUDA graph replayed at every position (static buffers written in place): Inductor
    skipped no graph (its skip counter stays at zero). Its CPU twins are
    test_compiled_decode_step_traces_once_and_gives_eager_tokens and
    test_compiled_decode_step_creates_no_host_tensor_and_reads_nothing_back."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = _model(name).cuda().eval()
    ids, mask = (t.cuda() for t in _left_padded(3, 9))
    got = model.generate(ids, 7, attention_mask=mask, compile=True)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert model.static_decoder(3, 16, {}).graphed
    assert torch.equal(got, model.generate(ids, 7, attention_mask=mask))
    with torch.compiler.set_stance("fail_on_recompile"):
        again = model.generate(ids, 7, attention_mask=mask, compile=True)
    assert torch.equal(again, got)
