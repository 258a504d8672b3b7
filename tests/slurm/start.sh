#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine, for tests/test_slurm.py.
#
# Needs root. Installs slurmctld, slurmd, slurm-client and munge with apt-get when they are
# missing, writes slurm.conf for one node (this host: its CPU count and memory) in one
# partition, and starts munged, slurmctld and slurmd by hand (no systemd), each in the
# foreground under setsid, so the PID recorded is the daemon itself and stop.sh can end
# exactly what this script started. Safe to rerun: a cluster it already started is reused.
#
# Everything lives in $SLURM_TEST_DIR (default /tmp/captioning-slurm): slurm.conf, the
# daemons' logs, pids/*.pid, and jobcomp.log (one line per finished job, the proof that
# jobs went through SLURM). /etc/slurm/slurm.conf becomes a link to $SLURM_TEST_DIR/slurm.conf:
# SLURM_CONF alone is not enough, because Snakemake's job-step plugin drops every SLURM_*
# variable before the srun inside each job. An /etc/slurm/slurm.conf this script did not write
# is never replaced: it stops instead.
#
# Settings (environment): SLURM_TEST_DIR, SLURM_TEST_PARTITION (default: test),
# SLURM_TEST_TIMEOUT (seconds to wait for the node to come up, default 60).
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/captioning-slurm}
PARTITION=${SLURM_TEST_PARTITION:-test}
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}
export SLURM_CONF="$DIR/slurm.conf"

die() { echo "start.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

alive() {  # alive NAME: the daemon recorded under NAME is still running
    local f="$DIR/pids/$1.pid"
    [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null
}

node_idle() { sinfo -h -p "$PARTITION" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'; }

# --- 1. packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
        || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "SLURM is not installed and apt-get is missing"
    # Stop the packages' maintainer scripts from starting daemons with their own config:
    # this script starts them itself. (Docker images ship this file already.)
    added_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    pkgs="slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q $pkgs >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q $pkgs >/dev/null; } \
        || { [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d; die "apt-get install $pkgs failed"; }
    [ -n "$added_policy" ] && rm -f /usr/sbin/policy-rc.d
fi

# --- 2. already running? -----------------------------------------------------------------
if alive slurmctld && alive slurmd && node_idle; then
    echo "start.sh: cluster already running (SLURM_CONF=$SLURM_CONF)"
    exit 0
fi
# Half a cluster (a daemon died, or a previous start failed): stop what is left, start clean.
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true

mkdir -p "$DIR/pids" "$DIR/state" "$DIR/spool"

# --- 3. slurm.conf -----------------------------------------------------------------------
NODE=$(hostname -s)
CPUS=$(nproc)
MEM_TOTAL=$(free -m | awk '/^Mem:/ {print $2}')
# Leave room for the OS and the daemons: 10% of memory, at least 512 MB.
MARGIN=$(( MEM_TOTAL / 10 > 512 ? MEM_TOTAL / 10 : 512 ))
MEM=$(( MEM_TOTAL - MARGIN ))
cat > "$SLURM_CONF" <<EOF
# Written by tests/slurm/start.sh: one node ($NODE), one partition ($PARTITION).
ClusterName=captioning-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/state/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# No cgroups here: track processes by their parent pid, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: no accounting (so no sacct); finished jobs are logged to a text file instead.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
# Cores and memory are both consumable, so jobs share the node by what they ask for.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that names no memory gets 1 GB per CPU, not the whole node.
DefMemPerCPU=1024
ReturnToService=2
# Keep finished jobs in scontrol show job for an hour, so a test can inspect them.
MinJobAge=3600
# Time limits as tests need them: a job is stopped at its limit (no grace minutes), and one that
# ignores SIGTERM is killed 5 s later (not 30), so a test of a timed-out job waits less.
# (slurmctld itself looks at time limits about every 30 s.)
OverTimeLimit=0
KillWait=5
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# Another SLURM on this machine (a cluster another test run started, say) holds the ports: ours
# would not start, and every client here would quietly reach that one instead.
if scontrol ping >/dev/null 2>&1; then
    die "a SLURM controller already answers on this machine (port 6817): another cluster is running here; stop it first"
fi

# The default place, for clients that do not see SLURM_CONF (see the top of this file).
ETC_CONF=/etc/slurm/slurm.conf
if [ -L "$ETC_CONF" ] || [ -e "$ETC_CONF" ]; then
    # Ours: a link whose target is gone (an old test folder) or carries our first line.
    if [ -e "$ETC_CONF" ] && ! head -1 "$ETC_CONF" | grep -q '^# Written by tests/slurm/start.sh'; then
        die "$ETC_CONF exists and was not written by this script: not replacing a real SLURM setup"
    fi
    [ -L "$ETC_CONF" ] || die "$ETC_CONF is a file, not this script's link: remove it by hand"
fi
mkdir -p /etc/slurm
ln -sfn "$SLURM_CONF" "$ETC_CONF"

# --- 4. daemons --------------------------------------------------------------------------
start() {  # start NAME CMD...: run CMD in the foreground of its own session, record its PID
    local name=$1; shift
    setsid "$@" > "$DIR/$name.out" 2>&1 < /dev/null &
    echo $! > "$DIR/pids/$name.pid"
}

# munge: reuse a working munged (a system one, say); else start ours as the munge user.
if ! (munge -n | unmunge) >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    for _ in $(seq 50); do (munge -n | unmunge) >/dev/null 2>&1 && break; sleep 0.2; done
    (munge -n | unmunge) >/dev/null 2>&1 || die "munged did not start: see $DIR/munged.out"
fi

start slurmctld slurmctld -D -i -f "$SLURM_CONF"
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
start slurmd slurmd -D -f "$SLURM_CONF"

# --- 5. wait for the node ----------------------------------------------------------------
for _ in $(seq "$TIMEOUT"); do
    for d in slurmctld slurmd; do
        alive $d || die "$d exited (another SLURM on ports 6817/6818?): see $DIR/$d.out and $DIR/$d.log"
    done
    if node_idle; then
        echo "start.sh: cluster up: node $NODE, $CPUS CPUs, $MEM MB, partition $PARTITION (SLURM_CONF=$SLURM_CONF)"
        exit 0
    fi
    sleep 1
done
die "node $NODE not idle after ${TIMEOUT}s: $(sinfo -h -N -o '%N %t %E' 2>&1); see $DIR/slurmd.log"
