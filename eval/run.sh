#!/usr/bin/env bash
# Start this machine's nodes of an experiment. Run it on every machine at once:
#
#   eval/run.sh CONFIG MACHINE_ID [IP_FILE] [extra `dflsplit run` options]
#
# MACHINE_ID is this machine's key in IP_FILE (a JSON object {"0": "10.0.0.1", ...});
# nodes find each other through it, and each machine writes its own nodes' results
# under run.out_dir. Example, two machines:
#   machine 0:  eval/run.sh eval/configs/default.yaml 0 eval/ip.json --set run.machines=2
#   machine 1:  eval/run.sh eval/configs/default.yaml 1 eval/ip.json --set run.machines=2
set -euo pipefail
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
case "${1:-}" in -h|--help) usage; exit 0 ;; esac
if [ $# -lt 2 ]; then usage >&2; exit 2; fi
config=$1; machine=$2; shift 2
ip=()
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then ip=(--set "run.ip_file=$(realpath "$1")"); shift; fi
here=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$here/.venv/bin/dflsplit" ]; then dfl="$here/.venv/bin/dflsplit"; else dfl=dflsplit; fi
exec "$dfl" run "$config" --machine-id "$machine" "${ip[@]}" "$@"
