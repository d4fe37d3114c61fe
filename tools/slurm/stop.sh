#!/usr/bin/env bash
# Stop the test cluster that tools/slurm/start.sh started.
#
#   tools/slurm/stop.sh [--purge] [STATE_DIR]     (default: ${OEL_SLURM_STATE:-/tmp/oel-slurm})
#
# Cancels the jobs still queued or running, then stops every node's slurmd, slurmctld, slurmdbd, mariadbd and
# munged -- only the processes named by the pid files in STATE_DIR whose /proc/<pid>/exe is the expected daemon
# (never by name) -- waits until they are gone, and removes the cluster's marked /etc/hosts line. Idempotent. The
# state stays, so the next start is quick; --purge deletes STATE_DIR (job ids then restart at 1).
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

# every node's slurmd (run/slurmd.<node>.pid; run/slurmd.pid: a state folder of the one-node start.sh)
slurmds=()
for pidfile in "$RUN"/slurmd.pid "$RUN"/slurmd.*.pid; do
    [[ -e $pidfile ]] && slurmds+=("slurmd:$pidfile:/usr/sbin/slurmd")
done
for spec in "${slurmds[@]}" "slurmd-steps::" \
            "slurmctld:$RUN/slurmctld.pid:/usr/sbin/slurmctld" \
            "slurmdbd:$RUN/slurmdbd.pid:/usr/sbin/slurmdbd" \
            "mariadbd:$STATE/mysql/mysqld.pid:/usr/sbin/mariadbd" \
            "munged:$STATE/munge/munged.pid:/usr/sbin/munged"; do
    IFS=: read -r name pidfile exe <<<"$spec"
    # slurmd's job steps, after every slurmd: left over only if a job could not be cancelled above
    if [[ $name == slurmd-steps ]]; then
        for pid in $(our_stepds); do stop_pid slurmstepd "$pid" "$STEPD" || rc=1; done
        continue
    fi
    exe=$(readlink -f "$exe")
    if pid=$(running "$pidfile" "$exe"); then
        stop_pid "$name" "$pid" "$exe" || rc=1
    fi
done
# the node names' /etc/hosts line (start.sh writes it again)
hosts_set "$STATE" || { say "WARNING: could not remove this cluster's line from $HOSTS_FILE"; rc=1; }

if ((PURGE)); then
    ((rc == 0)) || { say "ERROR: not purging $STATE: some daemon is still running"; exit 1; }
    rm -rf -- "$STATE"
    say "purged $STATE"
else
    say "stopped (state kept in $STATE)"
fi
exit "$rc"
