#!/usr/bin/env bash
# One node, all (or NUM_GPUS) GPUs: deepspeed --num_gpus N --module toolkit.train ...
#   launchers/train_single_node.sh train.yaml --set lr=1e-5 --set ds_config=zero1
# Environment: NUM_GPUS (default: every visible GPU), MASTER_PORT (29500), PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
args=(--master_port "$MASTER_PORT")
[[ -n ${NUM_GPUS:-} ]] && args=(--num_gpus "$NUM_GPUS" "${args[@]}")
run_deepspeed "${args[@]}"
