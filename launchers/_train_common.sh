# Sourced by the train_*.sh launchers: argument parsing, environment defaults, and `run_deepspeed`,
# which prints the resolved command and then runs it (PRINT_ONLY=1: print and stop).
#   usage: <script> CONFIG.yaml [--set key=value ...] [--resume [DIR]] [--dry-run] [--ds-config NAME]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
config=$1
shift
[[ -f $config ]] || { echo "error: training config not found: $config" >&2; exit 2; }
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
train_args=(--module toolkit.train --config "$config" "$@")

# the venv's launcher unless DEEPSPEED names another; JIT-built DeepSpeed ops are cached, not rebuilt
DEEPSPEED=${DEEPSPEED:-$root/.venv/bin/deepspeed}
[[ -x $DEEPSPEED ]] || DEEPSPEED=$(command -v deepspeed || true)
[[ -n $DEEPSPEED ]] || { echo "error: the deepspeed launcher is not installed" >&2; exit 2; }
# the Python beside the launcher (the venv's), for the toolkit's helpers
PYTHON=${PYTHON:-$(dirname "$DEEPSPEED")/python}
[[ -x $PYTHON ]] || PYTHON=$(command -v python3)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.cache/torch_extensions}
export GRADUAL_CACHE_DIR=${GRADUAL_CACHE_DIR:-$root/.cache/gradual}
MASTER_PORT=${MASTER_PORT:-29500}

run_deepspeed() {
  local cmd=("$DEEPSPEED" "$@" "${train_args[@]}")
  printf '[%s] %s\n' "$(basename "$0")" "$(printf '%q ' "${cmd[@]}")" >&2
  [[ ${PRINT_ONLY:-0} == 1 ]] && return 0
  exec "${cmd[@]}"
}
