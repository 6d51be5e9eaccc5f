#!/usr/bin/env bash
# Several nodes from one command: the default `deepspeed` multi-node path (pdsh over passwordless
# ssh to every host of the hostfile). Variables in .deepspeed_env (in $HOME or the current
# directory, KEY=VALUE lines) are exported on every node; if none exists this script writes one
# in the current directory with the toolkit's variables that are set here.
#   HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 launchers/train_multi_node.sh train.yaml --set epochs=2
# Environment: HOSTFILE (default ./hostfile), MASTER_ADDR (default: node 0's `hostname -I`),
# MASTER_PORT (29500), NUM_NODES, NUM_GPUS (per node), LAUNCHER (pdsh; or openmpi, slurm, ...),
# DS_ENV_VARS (extra variable names for .deepspeed_env), PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
HOSTFILE=${HOSTFILE:-hostfile}
[[ -f $HOSTFILE ]] || { echo "error: hostfile not found: $HOSTFILE ('<host> slots=<n>' lines)" >&2; exit 2; }
if [[ ! -f .deepspeed_env && ! -f $HOME/.deepspeed_env ]]; then
  for var in GRADUAL_CACHE_DIR TORCH_EXTENSIONS_DIR HF_HOME HF_HUB_OFFLINE TOKENIZERS_PARALLELISM \
             ${DS_ENV_VARS:-}; do
    [[ -n ${!var:-} ]] && printf '%s=%s\n' "$var" "${!var}"
  done >.deepspeed_env
  echo "[$(basename "$0")] wrote .deepspeed_env ($(cut -d= -f1 .deepspeed_env | tr '\n' ' '))" >&2
fi
args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --launcher "${LAUNCHER:-pdsh}")
[[ -n ${MASTER_ADDR:-} ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n ${NUM_NODES:-} ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n ${NUM_GPUS:-} ]] && args+=(--num_gpus "$NUM_GPUS")
run_deepspeed "${args[@]}"
