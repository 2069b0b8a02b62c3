#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine (loopback only) for the SLURM integration test.
# Partitions `cpu` (default) and `gpu` on one node with two fake GPUs (GRES on /dev/null, /dev/zero), so
# --gpus=1 is accepted; MariaDB + slurmdbd so `sacct` (the executor plugin's status query) works.
# Daemons are started detached and their PIDs recorded in $SLURM_LOCAL_DIR; tests/slurm/down.sh stops exactly
# those. Needs root and Debian packages (installed when missing). Idempotent.
set -euo pipefail
D=${SLURM_LOCAL_DIR:-/run/slurm-local}
TMO=${SLURM_LOCAL_TIMEOUT:-60}
log() { printf '[slurm-up] %s\n' "$*"; }
die() { log "ERROR: $*"; exit 1; }

pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p "$D" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm /run/munge
chown munge:munge /run/munge

alive() {  # our recorded PID for NAME runs NAME and is not a zombie
  local f="$D/$1.pid" pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f")
  [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$1" ] || return 1
  [ "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ]
}
start() {
  local name=$1; shift
  if alive "$name"; then log "$name already running"; return 0; fi
  setsid "$@" >"$D/$name.out" 2>&1 </dev/null &
  echo $! >"$D/$name.pid"
  log "started $name (pid $!)"
}
waitfor() {
  local desc=$1; shift; local end=$(( $(date +%s) + TMO ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || die "timeout waiting for $desc (see $D/*.out, /var/log/slurm/)"
    sleep 0.25
  done
}

H=$(hostname -s)
HW=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ RealMemory=[0-9]+//')
MEM=$(slurmd -C | head -1 | sed -E 's/.*RealMemory=([0-9]+).*/\1/')
MEM=$(( MEM * 95 / 100 ))  # a node reporting less memory than configured gets drained
CONF=$(cat <<EOC
# written by liverseg tests/slurm/up.sh: one node, loopback only
ClusterName=liversegci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu,gres/gpu:fake
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=${H} NodeAddr=127.0.0.1 ${HW} RealMemory=${MEM} Gres=gpu:fake:2 State=UNKNOWN
PartitionName=cpu Nodes=${H} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=${H} Default=NO MaxTime=INFINITE State=UP
EOC
)
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$CONF" ]; then
  if alive slurmctld || alive slurmd; then die "slurm.conf would change while slurmctld/slurmd run: run down.sh first"; fi
  printf '%s\n' "$CONF" >/etc/slurm/slurm.conf
fi
printf 'NodeName=%s Name=gpu Type=fake File=/dev/null\nNodeName=%s Name=gpu Type=fake File=/dev/zero\n' "$H" "$H" >/etc/slurm/gres.conf

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
waitfor munge bash -c 'munge -n | unmunge'

mkdir -p /run/mysqld && chown mysql:root /run/mysqld
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
start mariadbd /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid
waitfor mariadb mariadb-admin --socket=/run/mysqld/mysqld.sock ping
mariadb --socket=/run/mysqld/mysqld.sock -e "
  CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
cat >/etc/slurm/slurmdbd.conf <<'EOC'
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOC
chmod 600 /etc/slurm/slurmdbd.conf
start slurmdbd /usr/sbin/slurmdbd -D
waitfor slurmdbd sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx liversegci || sacctmgr -i add cluster liversegci >/dev/null

start slurmctld /usr/sbin/slurmctld -D -i
waitfor slurmctld scontrol ping
start slurmd /usr/sbin/slurmd -D
end=$(( $(date +%s) + TMO )); resumed=0
while :; do
  s=$(sinfo -h -n "$H" -o %t 2>/dev/null | sort -u | tr -d '\n')
  case "$s" in
    idle|mix|alloc|comp) scontrol show node "$H" 2>/dev/null | grep -q 'SlurmdStartTime=[0-9]' && break ;;
    *drain*|*down*|*inval*|*fail*)
      [ $resumed = 0 ] && { scontrol update nodename="$H" state=resume 2>/dev/null || true; resumed=1; } ;;
  esac
  [ "$(date +%s)" -lt "$end" ] || die "node $H state '$s'"
  sleep 0.25
done
log "cluster up: node $H ($s), partitions cpu and gpu"
