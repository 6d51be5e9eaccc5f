# Sourced by ray_head.sh, ray_worker.sh and ray_stop.sh: help text, the ray executable, option
# parsing for a node, starting a node in a session of its own (recorded under its temp dir), and
# stopping recorded sessions.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
me=$(basename "$0")

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

# the venv's ray unless RAY_BIN names another
find_ray() {
  if [[ -z ${RAY_BIN:-} ]]; then
    RAY_BIN=$root/.venv/bin/ray
    [[ -x $RAY_BIN ]] || RAY_BIN=$(command -v ray || true)
  fi
  [[ -n $RAY_BIN && -x $RAY_BIN ]] || die "the ray executable is not installed (run launchers/setup_env.sh or set RAY_BIN)"
}

# Ray's own default: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray
default_temp_dir() { printf '%s/ray' "${RAY_TMPDIR:-${TMPDIR:-/tmp}}"; }

# parse_node_args ARGS...: sets port node_ip num_cpus num_gpus memory object_store_memory temp_dir
# (flags win over the RAY_* environment) and extra=(flags passed to `ray start` as written)
parse_node_args() {
  port=${RAY_PORT:-6379} node_ip=${RAY_NODE_IP:-} num_cpus=${RAY_NUM_CPUS:-} num_gpus=${RAY_NUM_GPUS:-}
  memory=${RAY_MEMORY:-} object_store_memory=${RAY_OBJECT_STORE_MEMORY:-} temp_dir=${RAY_TEMP_DIR:-}
  extra=()
  while (($#)); do
    local flag=$1 value
    case $flag in
      --port|--node-ip-address|--num-cpus|--num-gpus|--memory|--object-store-memory|--temp-dir)
        (($# >= 2)) || die "$flag needs a value"
        value=$2; shift 2 ;;
      --port=*|--node-ip-address=*|--num-cpus=*|--num-gpus=*|--memory=*|--object-store-memory=*|--temp-dir=*)
        value=${flag#*=}; flag=${flag%%=*}; shift ;;
      *) extra+=("$1"); shift; continue ;;
    esac
    case $flag in
      --port) port=$value ;;
      --node-ip-address) node_ip=$value ;;
      --num-cpus) num_cpus=$value ;;
      --num-gpus) num_gpus=$value ;;
      --memory) memory=$value ;;
      --object-store-memory) object_store_memory=$value ;;
      --temp-dir) temp_dir=$value ;;
    esac
  done
  local name unit
  for name in port num_cpus num_gpus memory object_store_memory; do
    unit=""; [[ $name == *memory ]] && unit=" of bytes"
    [[ -z ${!name} || ${!name} =~ ^[0-9]+$ ]] || die "--${name//_/-} must be a whole number$unit, got '${!name}'"
  done
  temp_dir=$(realpath -m -- "${temp_dir:-$(default_temp_dir)}")
}

# the `ray start` flags for what parse_node_args found
resource_args() {
  node_args=()
  [[ -n $node_ip ]] && node_args+=(--node-ip-address "$node_ip")
  [[ -n $num_cpus ]] && node_args+=(--num-cpus "$num_cpus")
  [[ -n $num_gpus ]] && node_args+=(--num-gpus "$num_gpus")
  [[ -n $memory ]] && node_args+=(--memory "$memory")
  [[ -n $object_store_memory ]] && node_args+=(--object-store-memory "$object_store_memory")
  node_args+=(--temp-dir "$temp_dir" --disable-usage-stats)
  return 0
}

# members SID: the live processes of a session (zombies, dead and waiting for their parent, excluded)
members() { ps -eo pid=,sid=,stat= | awk -v s="$1" '$2 == s && $3 !~ /^Z/ { print $1 }'; }

# signal_members SIGNAL SID...
signal_members() {
  local sig=$1 sid p; shift
  for sid in "$@"; do
    for p in $(members "$sid"); do kill "-$sig" "$p" 2>/dev/null || true; done
  done
}

# any_alive SID...: true while one of the sessions has a live process
any_alive() {
  local sid
  for sid in "$@"; do [[ -n $(members "$sid") ]] && return 0; done
  return 1
}

# start_node ROLE RAY_START_ARGS...: `ray start` in a new session, so that every process of the node
# (GCS, raylet, agents, and the workers, which get process groups of their own) shares one session
# id, recorded as $temp_dir/launchers/ROLE-SID.
start_node() {
  local role=$1; shift
  local cmd=("$RAY_BIN" start "$@")
  printf '[%s] %s\n' "$me" "$(printf '%q ' "${cmd[@]}")" >&2
  [[ ${PRINT_ONLY:-0} == 1 ]] && exit 0
  command -v setsid >/dev/null || die "setsid (util-linux) is needed to give the node a session of its own"
  local records=$temp_dir/launchers
  mkdir -p "$records" || die "cannot create $records"
  local log
  log=$(mktemp "$records/$role-start.XXXXXX.log")
  # a background child of a non-interactive shell is no process group leader: setsid makes it a
  # session leader without forking, so the node's session id is this pid
  setsid "${cmd[@]}" >"$log" 2>&1 </dev/null &
  local pid=$! rc=0
  wait "$pid" || rc=$?
  if ((rc != 0)); then
    tail -n 30 "$log" >&2
    if any_alive "$pid"; then  # what a failed start left running
      stop_sessions 5 "$pid" || true
    fi
    echo "error: ray start failed (exit $rc); log: $log" >&2
    exit 1
  fi
  any_alive "$pid" || { echo "error: ray start exited 0 but left no process running; log: $log" >&2; exit 1; }
  echo "$role" >"$records/$role-$pid"
  mv "$log" "$records/$role-$pid.log"
  node_sid=$pid
}

# stop_sessions GRACE SID...: SIGTERM to every process of the sessions, SIGKILL to what is left
# after GRACE seconds
stop_sessions() {
  local grace=$1 waited=0; shift
  signal_members TERM "$@"
  while any_alive "$@" && ((waited < grace * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if any_alive "$@"; then
    echo "[$me] still running after ${grace}s: SIGKILL" >&2
    signal_members KILL "$@"
    for _ in $(seq 50); do
      any_alive "$@" || return 0
      sleep 0.1
    done
    echo "error: processes of sessions $* still alive after SIGKILL" >&2
    return 1
  fi
}
