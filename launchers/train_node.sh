#!/usr/bin/env bash
# One node of a multi-node run, without ssh: run this once on every node with the same hostfile,
# the same MASTER_ADDR/MASTER_PORT and that node's NODE_RANK (0 = the host listed first).
#   node 0: NODE_RANK=0 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile launchers/train_node.sh train.yaml
#   node 1: NODE_RANK=1 MASTER_ADDR=10.0.0.1 HOSTFILE=hostfile launchers/train_node.sh train.yaml
# Environment: NODE_RANK and MASTER_ADDR (required), HOSTFILE (default ./hostfile), MASTER_PORT
# (29500), NUM_GPUS (per node; on CPU this caps the ranks per node, like --num_accelerators),
# PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
HOSTFILE=${HOSTFILE:-hostfile}
[[ -f $HOSTFILE ]] || { echo "error: hostfile not found: $HOSTFILE" >&2; exit 2; }
[[ -n ${NODE_RANK:-} ]] || { echo "error: set NODE_RANK (0 .. nodes-1)" >&2; exit 2; }
[[ -n ${MASTER_ADDR:-} ]] || { echo "error: set MASTER_ADDR (the address of node 0)" >&2; exit 2; }
args=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
      --master_port "$MASTER_PORT")
[[ -n ${NUM_GPUS:-} ]] && args+=(--num_gpus "$NUM_GPUS")
run_deepspeed "${args[@]}"
