#!/usr/bin/env bash
# Stop the cluster tests/slurm/start.sh started: exactly the PIDs it recorded in
# $SLURM_TEST_DIR/pids (never by name), slurmd first, then slurmctld, then munged if it
# was started there. Then remove the job state so the next start is clean, and the
# /etc/slurm/slurm.conf link to this cluster.
# Safe to rerun: nothing recorded, nothing to do. Leaves the packages installed.
set -uo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/captioning-slurm}

stop() {  # stop NAME: SIGTERM the recorded PID, wait up to 10 s, then SIGKILL
    local f="$DIR/pids/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $1 ($pid) ignored SIGTERM, killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$f"
    echo "stop.sh: stopped $1 ($pid)"
}

# Cancel what is still queued or running first, so no job step outlives slurmd.
if [ -s "$DIR/pids/slurmctld.pid" ] && kill -0 "$(cat "$DIR/pids/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF="$DIR/slurm.conf"
    jobs=$(squeue -h -o %i 2>/dev/null)
    if [ -n "$jobs" ]; then
        scancel $jobs 2>/dev/null
        for _ in $(seq 50); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi
stop slurmd
stop slurmctld
stop munged
rm -rf "$DIR/state" "$DIR/spool"
# The /etc/slurm/slurm.conf link start.sh made to this cluster's config.
if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$DIR/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
fi
exit 0
