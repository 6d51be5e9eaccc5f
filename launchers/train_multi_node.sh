#!/usr/bin/env bash
# Several nodes from one command: the default `deepspeed` multi-node path (pdsh over passwordless
# ssh to every host of the hostfile). The remote ranks start in a fresh login environment: DeepSpeed
# exports only PYTHON*/MLFLOW*/MV2*/UCX* variables (NCCL* only when this node has a GPU) and the
# KEY=VALUE lines of an env file. This script writes .deepspeed_env.gradual in the current directory:
# the lines of your own ~/.deepspeed_env and ./.deepspeed_env (they win), then PATH, LD_LIBRARY_PATH,
# CUDA_HOME, HF_HOME, every NCCL_* / TORCH_NCCL_* variable and the toolkit's (GRADUAL_CACHE_DIR,
# TORCH_EXTENSIONS_DIR, HF_HUB_OFFLINE, ...) that are set here, and points DS_ENV_FILE at it.
#   HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 launchers/train_multi_node.sh train.yaml --set epochs=2
# Environment: HOSTFILE (default ./hostfile), MASTER_ADDR (default: node 0's `hostname -I`),
# MASTER_PORT (29500), NUM_NODES, NUM_GPUS (per node), LAUNCHER (pdsh; or openmpi, slurm, ...),
# DS_ENV_VARS (extra variable names to forward), PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
HOSTFILE=${HOSTFILE:-hostfile}
[[ -f $HOSTFILE ]] || { echo "error: hostfile not found: $HOSTFILE ('<host> slots=<n>' lines)" >&2; exit 2; }
envfile=$PWD/.deepspeed_env.gradual
# shellcheck disable=SC2086  # DS_ENV_VARS: a list of names
"$PYTHON" -m toolkit.train.envfile "$envfile" ${DS_ENV_VARS:-}
export DS_ENV_FILE=$envfile  # an absolute path: DeepSpeed reads it instead of ~/.deepspeed_env, ./.deepspeed_env
args=(--hostfile "$HOSTFILE" --master_port "$MASTER_PORT" --launcher "${LAUNCHER:-pdsh}")
[[ -n ${MASTER_ADDR:-} ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n ${NUM_NODES:-} ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n ${NUM_GPUS:-} ]] && args+=(--num_gpus "$NUM_GPUS")
echo "[$(basename "$0")] DS_ENV_FILE=$DS_ENV_FILE" >&2
run_deepspeed "${args[@]}"
