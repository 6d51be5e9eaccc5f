#!/usr/bin/env bash
# CPU ranks on one machine (gloo + DeepSpeed's shm_comm): deepspeed --num_accelerators N ...
# Plain `deepspeed` would start one process per NUMA node on CPU, hence the explicit count.
#   launchers/train_cpu.sh train.yaml --set micro_batch_size=2
# Environment: NUM_PROCS (default 2), MASTER_PORT (29500), PRINT_ONLY=1 (print only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_train_common.sh"
run_deepspeed --num_accelerators "${NUM_PROCS:-2}" --master_port "$MASTER_PORT"
