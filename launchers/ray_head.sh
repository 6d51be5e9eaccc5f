#!/usr/bin/env bash
# Start the head node of a Ray cluster on this machine and print the address the other nodes join
# (on stdout, alone: ADDRESS=$(launchers/ray_head.sh ...)); what to run next goes to stderr.
#   usage: launchers/ray_head.sh [--port P] [--node-ip-address IP] [--num-cpus N] [--num-gpus N]
#                                [--memory BYTES] [--object-store-memory BYTES] [--temp-dir DIR]
#                                [other `ray start` flags, passed as written, e.g. --dashboard-port 8266]
#   e.g.   launchers/ray_head.sh --num-gpus 8          # then on the others: launchers/ray_worker.sh ADDRESS
# Environment (a flag wins): RAY_PORT (default 6379; 0 = any free port), RAY_NODE_IP (default: Ray's
# choice, the address of the default route), RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_MEMORY,
# RAY_OBJECT_STORE_MEMORY (unset: detected by Ray), RAY_TEMP_DIR (default Ray's, /tmp/ray),
# RAY_BIN (default .venv/bin/ray, else ray on PATH), PRINT_ONLY=1 (print the command and stop).
# The node runs in a session of its own (a Ctrl-C here does not reach it), recorded in
# <temp dir>/launchers/; launchers/ray_stop.sh --temp-dir DIR stops exactly that node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_common.sh"
for arg in "$@"; do case $arg in -h|--help) usage; exit 0 ;; esac; done

parse_node_args "$@"
find_ray
resource_args
start_node head --head --port "$port" "${node_args[@]}" "${extra[@]}"
address=$(cat "$temp_dir/ray_current_cluster" 2>/dev/null || true)
[[ -n $address ]] || { echo "error: the head started but wrote no address to $temp_dir/ray_current_cluster" >&2; exit 1; }
{
  echo "[$me] head node up at $address (session $node_sid, temp dir $temp_dir)"
  echo "  join:    launchers/ray_worker.sh $address [--num-gpus N ...]"
  echo "  use:     gradual probe --ray-address $address ...   (or RAY_ADDRESS=$address)"
  echo "  stop:    launchers/ray_stop.sh --temp-dir $temp_dir"
} >&2
echo "$address"
