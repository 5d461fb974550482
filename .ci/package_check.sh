#!/usr/bin/env bash
# Packaging as a user meets it: build an sdist and a wheel from this checkout (the default
# FASTLM_BUILD_CUDA=auto, which on a machine without a GPU makes a pure-Python wheel), then
# install each in turn into a fresh venv outside the source tree and smoke-test it there:
# `fastlm info`, one op on the Triton interpreter, `fastlm train --max-steps 2`.
# Usage: .ci/package_check.sh PYTHON  (an interpreter with torch, setuptools and wheel)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$python" -m pip install -q build
FASTLM_BUILD_CUDA=auto "$python" -m build --no-isolation --sdist --wheel \
  --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
grep -m 1 "fastlm:" "$work/build.log" || true  # why no extension was built, if it was not
wheel=$(ls "$work"/dist/fastlm-*.whl)
sdist=$(ls "$work"/dist/fastlm-*.tar.gz)
echo "built $(basename "$wheel") and $(basename "$sdist")"
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  case $wheel in  # auto builds no extension where no GPU can run it
    *-py3-none-any.whl) ;;
    *) echo "FASTLM_BUILD_CUDA=auto built a platform wheel on a machine without a GPU"; exit 1 ;;
  esac
fi
tar -tzf "$sdist" > "$work/sdist.txt"
for needed in csrc/norm.cu csrc/bindings.cpp kernels/norm.py fastlm/cli.py; do
  grep -q "/$needed\$" "$work/sdist.txt" || { echo "the sdist lacks $needed"; exit 1; }
done

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch setuptools wheel

smoke() {  # run from outside the source tree: only the installed package can be found
  (
    cd "$work"
    export PATH="$work/venv/bin:$PATH"
    python - <<'PY'
import pathlib, sys
import fastlm
where = pathlib.Path(fastlm.__path__[0]).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"fastlm imported from {where}"
print(f"fastlm {fastlm.__version__} from {where}")
PY
    fastlm --version
    fastlm info > info.txt
    head -n 6 info.txt
    grep -q "^  layer_norm " info.txt  # every op's backends are listed
    TRITON_INTERPRET=1 FASTLM_BACKEND=triton python - <<'PY'
import torch
import fastlm
x, w = torch.randn(4, 64), torch.rand(64)
y = fastlm.ops.rms_norm(x, 64, w, eps=1e-6)
ref = torch.nn.functional.rms_norm(x.double(), (64,), w.double(), eps=1e-6)
error = (y.double() - ref).abs().max().item()
assert error < 64 * torch.finfo(torch.float32).eps, error
print(f"rms_norm on the Triton interpreter: max error {error:.2e} against float64")
PY
    rm -rf run && fastlm train --max-steps 2 --eval-every 1 --save-every 2 --no-progress \
      --out-dir run | tail -n 3
    test -f run/checkpoints/step-00000002/model.safetensors
  )
}

"$work/venv/bin/pip" install -q "$wheel"  # with its dependencies, as a user installs it
echo "--- wheel: $(basename "$wheel")"
smoke
"$work/venv/bin/pip" uninstall -q -y fastlm
"$work/venv/bin/pip" install -q --no-build-isolation "$sdist"
echo "--- sdist: $(basename "$sdist")"
smoke
echo "packaging: wheel and sdist install outside the tree and pass the smoke test"
