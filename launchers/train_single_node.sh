#!/usr/bin/env bash
# One node, all (or NUM_GPUS) GPUs: deepspeed --num_gpus N --module toolkit.train ...
#   launchers/train_single_node.sh train.yaml --set lr=1e-5 --set ds_config=zero1
# Environment: NUM_GPUS (default: every visible GPU; not with CUDA_VISIBLE_DEVICES, which then decides),
# MASTER_PORT (29500), PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
args=(--master_port "$MASTER_PORT")
# DeepSpeed's runner drops CUDA_VISIBLE_DEVICES when --num_gpus is given and uses GPUs 0..N-1
if [[ -n ${NUM_GPUS:-} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  echo "error: NUM_GPUS=$NUM_GPUS beside CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: deepspeed would ignore the mask" \
       "and train on GPUs 0..$((NUM_GPUS - 1)); leave NUM_GPUS out (the mask decides) or use gradual train --num-gpus" >&2
  exit 2
fi
[[ -n ${NUM_GPUS:-} ]] && args=(--num_gpus "$NUM_GPUS" "${args[@]}")
run_deepspeed "${args[@]}"
