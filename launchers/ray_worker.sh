#!/usr/bin/env bash
# Join this machine to a running Ray cluster as a worker node.
#   usage: launchers/ray_worker.sh ADDRESS [--node-ip-address IP] [--num-cpus N] [--num-gpus N]
#                                  [--memory BYTES] [--object-store-memory BYTES] [--temp-dir DIR]
#                                  [other `ray start` flags, passed as written]
#   ADDRESS is what launchers/ray_head.sh printed (HOST:PORT of the head); default $RAY_ADDRESS.
# Environment (a flag wins): RAY_NODE_IP, RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_MEMORY,
# RAY_OBJECT_STORE_MEMORY (unset: detected by Ray), RAY_TEMP_DIR (default Ray's, /tmp/ray; a second
# node on the same machine needs its own), RAY_BIN, PRINT_ONLY=1 (print the command and stop).
# The node runs in a session of its own, recorded in <temp dir>/launchers/;
# launchers/ray_stop.sh --temp-dir DIR stops exactly that node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_common.sh"
for arg in "$@"; do case $arg in -h|--help) usage; exit 0 ;; esac; done

address=${RAY_ADDRESS:-}
if (($#)) && [[ $1 != -* ]]; then
  address=$1
  shift
fi
[[ -n $address ]] || die "give the head's address (HOST:PORT, printed by launchers/ray_head.sh) or set RAY_ADDRESS"
[[ $address =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "the head's address must be HOST:PORT, got '$address'"
parse_node_args "$@"
find_ray
resource_args
start_node worker --address "$address" "${node_args[@]}" "${extra[@]}"
echo "[$me] worker node joined $address (session $node_sid, temp dir $temp_dir); stop: launchers/ray_stop.sh --temp-dir $temp_dir" >&2
