#!/usr/bin/env bash
# Stop the cluster started by tests/slurm/up.sh: cancel its jobs, then stop exactly the recorded PIDs.
set -uo pipefail
D=${SLURM_LOCAL_DIR:-/run/slurm-local}
alive() {
  local f="$D/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]
}
if alive slurmctld && scontrol ping >/dev/null 2>&1; then
  ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  # shellcheck disable=SC2086
  [ -n "${ids// /}" ] && scancel $ids 2>/dev/null
  for _ in $(seq 1 80); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.25; done
fi
for name in slurmd slurmctld slurmdbd mariadbd munged; do
  if alive "$name"; then
    pid=$(cat "$D/$name.pid")
    kill -TERM "$pid"
    for _ in $(seq 1 120); do alive "$name" || break; sleep 0.25; done
    alive "$name" && kill -KILL "$pid" 2>/dev/null
    echo "[slurm-down] stopped $name (pid $pid)"
  fi
  rm -f "$D/$name.pid"
done
