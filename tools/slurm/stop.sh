#!/usr/bin/env bash
# Stop the test cluster that tools/slurm/start.sh started.
#
#   tools/slurm/stop.sh [--purge] [STATE_DIR]     (default: ${OEL_SLURM_STATE:-/tmp/oel-slurm})
#
# Cancels the jobs still queued or running, then stops slurmd, slurmctld, slurmdbd, mariadbd and munged -- only
# the processes named by the pid files in STATE_DIR whose /proc/<pid>/exe is the expected daemon (never by name)
# -- and waits until they are gone. Idempotent. The state stays, so the next start is quick; --purge deletes
# STATE_DIR (job ids then restart at 1).
set -euo pipefail

PURGE=0
STATE=
for a in "$@"; do
    case "$a" in
        --purge) PURGE=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        -*) echo "[oel-slurm] unknown option $a" >&2; exit 2 ;;
        *) STATE=$a ;;
    esac
done
STATE=${STATE:-${OEL_SLURM_STATE:-/tmp/oel-slurm}}
. "$(dirname "$0")/lib.sh"
if [[ ! -d $STATE ]]; then
    say "no state folder $STATE: nothing to stop"
    exit 0
fi
STATE=$(cd "$STATE" && pwd -P)
CONF=$STATE/slurm.conf
if [[ -e $CONF ]] && ! grep -q '^# Written by tools/slurm/start.sh' "$CONF"; then
    say "ERROR: $CONF was not written by tools/slurm/start.sh; refusing to touch $STATE"
    exit 1
fi
[[ $(id -u) == 0 ]] || { say "ERROR: must run as root"; exit 1; }
export SLURM_CONF=$CONF
RUN=$STATE/run

exec 9>>"$STATE/.lock"
flock -w 120 9 || { say "ERROR: another start/stop holds $STATE/.lock"; exit 1; }

# stop_pid NAME PID EXE: SIGTERM, wait up to 30 s (zombies count as gone), then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 exe=$3 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
        alive "$pid" "$exe" || { say "stopped $name (pid $pid)"; return 0; }
        sleep 0.1
    done
    say "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" "$exe" || return 0; sleep 0.1; done
    say "WARNING: $name (pid $pid) is still there"
    return 1
}
# our_stepds: slurmstepd processes of this cluster (they inherit SLURM_CONF=<state>/slurm.conf from our slurmd).
STEPD=$(readlink -f /usr/sbin/slurmstepd 2>/dev/null || echo /usr/sbin/slurmstepd)
our_stepds() {
    local d pid
    for d in /proc/[0-9]*; do
        pid=${d#/proc/}
        alive "$pid" "$STEPD" || continue
        tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && echo "$pid"
    done
    return 0
}

rc=0
# Jobs first, so that no job process outlives the cluster.
if pid=$(running "$RUN/slurmctld.pid" /usr/sbin/slurmctld) && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
    if [[ -n ${ids// /} ]]; then
        say "cancelling jobs: $ids"
        # shellcheck disable=SC2086
        scancel $ids 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [[ -z $(squeue -h -o %A 2>/dev/null) && -z $(our_stepds) ]] && break
            sleep 0.1
        done
    fi
fi

for spec in "slurmd:$RUN/slurmd.pid:/usr/sbin/slurmd" \
            "slurmctld:$RUN/slurmctld.pid:/usr/sbin/slurmctld" \
            "slurmdbd:$RUN/slurmdbd.pid:/usr/sbin/slurmdbd" \
            "mariadbd:$STATE/mysql/mysqld.pid:/usr/sbin/mariadbd" \
            "munged:$STATE/munge/munged.pid:/usr/sbin/munged"; do
    IFS=: read -r name pidfile exe <<<"$spec"
    exe=$(readlink -f "$exe")
    if pid=$(running "$pidfile" "$exe"); then
        stop_pid "$name" "$pid" "$exe" || rc=1
    fi
    # slurmd's job steps: left over only if a job could not be cancelled above
    if [[ $name == slurmd ]]; then
        for pid in $(our_stepds); do stop_pid slurmstepd "$pid" "$STEPD" || rc=1; done
    fi
done

if ((PURGE)); then
    ((rc == 0)) || { say "ERROR: not purging $STATE: some daemon is still running"; exit 1; }
    rm -rf -- "$STATE"
    say "purged $STATE"
else
    say "stopped (state kept in $STATE)"
fi
exit "$rc"
