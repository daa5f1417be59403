#!/usr/bin/env bash
# Start this machine's nodes of a run. Start the same command on every machine at once,
# or under SLURM with one task per node: srun --ntasks-per-node=1 eval/run.sh CONFIG
#
#   eval/run.sh [OPTIONS] CONFIG [MACHINE_ID [IP_FILE]] [dflsplit run options, e.g. --set k=v]
#
# Options (each can also come from the environment variable beside it):
#   -c, --config FILE        DFL_CONFIG      the experiment (YAML), instead of the CONFIG argument
#   -m, --machine-id N|auto  DFL_MACHINE_ID  this machine's id; default: auto, the ip file's entry whose
#                                            host is this machine (under SLURM: SLURM_NODEID)
#   -i, --ip-file FILE       DFL_IP_FILE     JSON {"0": "10.0.0.1", "1": "10.0.0.2"}; the run has one
#                                            machine per entry (under SLURM: the job's nodes)
#   -g, --graph FILE         DFL_GRAPH       a topology file (.edges or .adj): graph.file
#   -p, --procs N            DFL_PROCS       node processes on each machine: run.procs_per_machine
#   -r, --rounds N           DFL_ROUNDS      communication rounds: run.rounds
#   -l, --log-dir DIR        DFL_LOG_DIR     where run folders go: run.out_dir
#   -b, --base-port N        DFL_BASE_PORT   the first port: run.base_port
#   -h, --help               this text
#
# Two machines on this host (127.0.0.1 and 127.0.0.2 are both loopback), in two terminals:
#   eval/run.sh eval/configs/default.yaml 0 eval/ip_loopback2.json --set run.rounds=5
#   eval/run.sh eval/configs/default.yaml 1 eval/ip_loopback2.json --set run.rounds=5
# The same with flags, 4 nodes per machine:
#   eval/run.sh -m 0 -i eval/ip_loopback2.json -p 4 -r 5 eval/configs/default.yaml
#   eval/run.sh -m 1 -i eval/ip_loopback2.json -p 4 -r 5 eval/configs/default.yaml
# Both machines write into runs/<name>-<run id>/machine_<id>/; machine 0 writes the summary.
set -euo pipefail
usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "eval/run.sh: $*" >&2; exit 2; }

config=${DFL_CONFIG:-}
machine=${DFL_MACHINE_ID:-}
ip=${DFL_IP_FILE:-}
graph=${DFL_GRAPH:-}
procs=${DFL_PROCS:-}
rounds=${DFL_ROUNDS:-}
logdir=${DFL_LOG_DIR:-}
port=${DFL_BASE_PORT:-}
extra=()
positional=()
need() { [ $# -ge 2 ] || die "option $1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -c|--config) need "$@"; config=$2; shift 2 ;;
    -m|--machine-id) need "$@"; machine=$2; shift 2 ;;
    -i|--ip-file) need "$@"; ip=$2; shift 2 ;;
    -g|--graph) need "$@"; graph=$2; shift 2 ;;
    -p|--procs) need "$@"; procs=$2; shift 2 ;;
    -r|--rounds) need "$@"; rounds=$2; shift 2 ;;
    -l|--log-dir) need "$@"; logdir=$2; shift 2 ;;
    -b|--base-port) need "$@"; port=$2; shift 2 ;;
    --) shift; extra+=("$@"); break ;;
    -*) extra+=("$@"); break ;;  # the rest goes to `dflsplit run`
    *) positional+=("$1"); shift ;;
  esac
done
[ ${#positional[@]} -le 3 ] || die "too many arguments: ${positional[*]} (CONFIG [MACHINE_ID [IP_FILE]])"
[ ${#positional[@]} -ge 1 ] && config=${positional[0]}
[ ${#positional[@]} -ge 2 ] && machine=${positional[1]}
[ ${#positional[@]} -ge 3 ] && ip=${positional[2]}
[ -n "$config" ] || { usage >&2; exit 2; }
[ -f "$config" ] || die "config $config not found"

args=(run "$config")
[ -n "$machine" ] && args+=(--machine-id "$machine")
if [ -n "$ip" ]; then [ -f "$ip" ] || die "ip file $ip not found"; args+=(--ip-file "$ip"); fi
[ -n "$graph" ] && { [ -f "$graph" ] || die "graph file $graph not found"; args+=(--set "graph.file=$(realpath "$graph")"); }
[ -n "$procs" ] && args+=(--set "run.procs_per_machine=$procs")
[ -n "$rounds" ] && args+=(--set "run.rounds=$rounds")
[ -n "$logdir" ] && args+=(--set "run.out_dir=$(realpath -m "$logdir")")
[ -n "$port" ] && args+=(--set "run.base_port=$port")

here=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$here/.venv/bin/dflsplit" ]; then dfl="$here/.venv/bin/dflsplit"; else dfl=dflsplit; fi
exec "$dfl" "${args[@]}" ${extra[@]+"${extra[@]}"}
