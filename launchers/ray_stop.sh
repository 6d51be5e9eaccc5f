#!/usr/bin/env bash
# Stop the Ray nodes that launchers/ray_head.sh and ray_worker.sh started on this machine.
#   usage: launchers/ray_stop.sh [--temp-dir DIR]... [--grace-period SECONDS]
#          launchers/ray_stop.sh --all [ray stop flags]
#   Each node runs in a session of its own (GCS, raylet, agents, workers), recorded under
#   DIR/launchers/ when the node started. Every recorded session whose processes still belong to DIR
#   gets SIGTERM, then SIGKILL after the grace period (default 10 s: Ray's GCS can linger after
#   SIGTERM). DIR defaults to $RAY_TEMP_DIR, else Ray's default (/tmp/ray). Other Ray instances on
#   this machine (another user's, a test's, a `ray.init()` driver's) are left alone.
#   --all runs `ray stop`: it stops EVERY Ray process on this machine, whoever started it.
# Environment: RAY_TEMP_DIR, RAY_BIN (for --all).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_common.sh"
for arg in "$@"; do case $arg in -h|--help) usage; exit 0 ;; esac; done

if [[ ${1:-} == --all ]]; then
  shift
  find_ray
  printf '[%s] %s\n' "$me" "$(printf '%q ' "$RAY_BIN" stop "$@")" >&2
  exec "$RAY_BIN" stop "$@"
fi

dirs=() grace=10
while (($#)); do
  case $1 in
    --temp-dir) (($# >= 2)) || die "--temp-dir needs a value"; dirs+=("$2"); shift 2 ;;
    --temp-dir=*) dirs+=("${1#*=}"); shift ;;
    --grace-period) (($# >= 2)) || die "--grace-period needs a value"; grace=$2; shift 2 ;;
    --grace-period=*) grace=${1#*=}; shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ $grace =~ ^[0-9]+$ ]] || die "--grace-period must be a whole number of seconds, got '$grace'"
((${#dirs[@]})) || dirs=("${RAY_TEMP_DIR:-$(default_temp_dir)}")

# belongs SID DIR: a live process of the session names DIR on its command line (the GCS, the raylet
# and the agents do), so a recycled session id is never taken for the node's
belongs() {
  local p
  for p in $(members "$1"); do
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$2/" && return 0
  done
  return 1
}

sessions=() records=() heads=()
for dir in "${dirs[@]}"; do
  [[ -d $dir ]] || { echo "[$me] $dir: no such directory, nothing to stop there" >&2; continue; }
  dir=$(cd "$dir" && pwd)
  found=0
  for record in "$dir"/launchers/head-* "$dir"/launchers/worker-*; do
    sid=${record##*-}
    [[ -f $record && $sid =~ ^[0-9]+$ ]] || continue  # not the logs
    found=1
    records+=("$record")
    role=$(cat "$record")
    [[ $role == head ]] && heads+=("$dir")
    if belongs "$sid" "$dir"; then
      sessions+=("$sid")
      echo "[$me] stopping the $role node of $dir: session $sid, $(members "$sid" | wc -l) processes" >&2
    else
      echo "[$me] the $role node of $dir (session $sid) is not running" >&2
    fi
  done
  ((found)) || echo "[$me] $dir: no node started by ray_head.sh or ray_worker.sh is recorded there" >&2
done
if ((${#sessions[@]})); then
  stop_sessions "$grace" "${sessions[@]}"
fi
if ((${#records[@]})); then
  rm -f "${records[@]}"
fi
for dir in "${heads[@]}"; do
  rm -f "$dir/ray_current_cluster"  # a later ray.init() must not look for the stopped head there
done
exit 0
