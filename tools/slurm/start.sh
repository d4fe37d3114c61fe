#!/usr/bin/env bash
# Start (or check) a real Slurm cluster for tests on this one machine: munged, MariaDB, slurmdbd, slurmctld, and
# one slurmd per node (OEL_SLURM_NODES nodes, default 2, named <cluster>-n1, <cluster>-n2, ...).
#
#   tools/slurm/start.sh [STATE_DIR]          (default: ${OEL_SLURM_STATE:-/tmp/oel-slurm})
#   eval "$(tools/slurm/start.sh | tail -1)"  # sets SLURM_CONF in the calling shell
#
# Idempotent: installs the Debian packages if missing, (re)writes the configs, starts only the daemons that are
# not running (pid file + /proc/<pid>/exe), waits for the nodes and a smoke job on every node, and prints
# `export SLURM_CONF=<state>/slurm.conf` as its last line on stdout (progress goes to stderr).
# Everything lives in STATE_DIR; outside it only apt's packages and one marked /etc/hosts line that makes the node
# names resolve (for MASTER_ADDR). Stop with tools/slurm/stop.sh.
# Ports (override by env): OEL_SLURM_DB_PORT (MariaDB, 3316), OEL_SLURM_PORT (slurmctld; slurmdbd +2; node i's
# slurmd +2+i; default 6817). OEL_SLURM_CLUSTER (oel) names the cluster and its nodes. A running cluster with
# another node set is restarted (refused while it has jobs). Usage and pitfalls: tools/slurm/README.md.
set -euo pipefail

T0=$(date +%s.%N)
STATE=${1:-${OEL_SLURM_STATE:-/tmp/oel-slurm}}
case "$STATE" in -h|--help) sed -n '2,15p' "$0"; exit 0;; esac
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd -P)
DB_PORT=${OEL_SLURM_DB_PORT:-3316}
CTLD_PORT=${OEL_SLURM_PORT:-6817}
DBD_PORT=$((CTLD_PORT + 2))
CLUSTER=${OEL_SLURM_CLUSTER:-oel}
NODES=${OEL_SLURM_NODES:-2}
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

. "$(dirname "$0")/lib.sh"
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
# die DAEMON LOG MESSAGE: name the daemon, show the tail of its log, exit non-zero.
die() {
    local daemon=$1 log=$2; shift 2
    echo "[oel-slurm] ERROR: $daemon: $*" >&2
    if [[ -n "$log" && -r "$log" ]]; then
        echo "[oel-slurm] ---- last lines of $log ----" >&2
        tail -n 25 "$log" >&2
        echo "[oel-slurm] ----" >&2
    elif [[ -n "$log" ]]; then
        echo "[oel-slurm] (no log at $log)" >&2
    fi
    exit 1
}
[[ $(id -u) == 0 ]] || die start.sh "" "must run as root (the daemons run as root/munge/mysql)"
# the cluster's ports are P..P+9: slurmctld P, slurmdbd P+2, node i's slurmd P+2+i (i = 1..7)
[[ $NODES =~ ^[1-7]$ ]] || die start.sh "" "OEL_SLURM_NODES=$NODES: must be 1 to 7 (node i's slurmd listens on OEL_SLURM_PORT+2+i)"
[[ $CLUSTER =~ ^[a-z][a-z0-9]*$ ]] || die start.sh "" "OEL_SLURM_CLUSTER=$CLUSTER: lower-case letters and digits only (it names the nodes, which must be host names)"
NODE_NAMES=()
for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("$CLUSTER-n$i"); done
NODE_LIST=$(IFS=,; echo "${NODE_NAMES[*]}")

# ---------------------------------------------------------------------------------------------- packages
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        apt-get update -q >&2 || die apt-get "" "apt-get update failed"
    fi
    apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 || die apt-get "" "install failed"
fi

# ---------------------------------------------------------------------------------------------- layout
exec 9>"$STATE/.lock"
flock -w 120 9 || die start.sh "" "another start/stop holds $STATE/.lock"

MUNGE_DIR=$STATE/munge          # munge:munge 711 (700 fails: "Socket is inaccessible")
MUNGE_SOCK=$MUNGE_DIR/munge.socket.2
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_PID=$MUNGE_DIR/munged.pid
MUNGE_LOG=$MUNGE_DIR/munged.log
DB_DIR=$STATE/mysql             # mysql-owned: data, socket, pid, log
DB_DATA=$DB_DIR/data
DB_SOCK=$DB_DIR/mysqld.sock
DB_PID=$DB_DIR/mysqld.pid
DB_LOG=$DB_DIR/log/mariadb.log
RUN=$STATE/run
LOG=$STATE/log
CONF=$STATE/slurm.conf
DBD_CONF=$STATE/slurmdbd.conf
export SLURM_CONF=$CONF

# munged (user munge) and mariadbd (user mysql) must be able to pass through every folder above STATE
d=$STATE
while [[ $d != / ]]; do
    d=$(dirname "$d")
    [[ $(stat -c %A "$d") == *x ]] || [[ $(stat -c %A "$d") == *t ]] \
        || die start.sh "" "$d is not searchable by other users (munge, mysql): choose a STATE_DIR elsewhere"
done
install -d -m 755 "$STATE" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool"
for n in "${NODE_NAMES[@]}"; do install -d -m 755 "$STATE/spool/$n"; done
install -d -m 711 -o munge -g munge "$MUNGE_DIR"
install -d -m 750 -o mysql -g mysql "$DB_DIR" "$DB_DIR/log"
# mysql-owned folder, but the munge and slurm daemons must pass through STATE itself: keep it 755.
chmod 755 "$STATE"
if [[ ! -s $MUNGE_KEY ]]; then
    (umask 077; dd if=/dev/urandom of="$MUNGE_KEY.tmp" bs=1024 count=1 status=none)
    mv "$MUNGE_KEY.tmp" "$MUNGE_KEY"
fi
chown munge:munge "$MUNGE_KEY"; chmod 400 "$MUNGE_KEY"
if [[ ! -s $STATE/dbpass ]]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/dbpass")
fi
DB_PASS=$(cat "$STATE/dbpass")

# ---------------------------------------------------------------------------------------------- configs
NODE=$(hostname -s)
# `slurmd -C` gives the node's CPUs/sockets/cores/threads; RealMemory at 95 % or the node drains ("Low RealMemory").
node_hw=$(slurmd -C 2>/dev/null | head -1) || die slurmd "" "slurmd -C failed"
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_hw")
hw=$(tr ' ' '\n' <<<"$node_hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
[[ -n $mem && -n $hw ]] || die slurmd "" "cannot parse 'slurmd -C': $node_hw"
mem=$((mem * 95 / 100))
# Every node declares the whole machine (its CPUs and memory): the nodes share the same cores, oversubscribed N
# times -- a cluster for correctness, not speed. So a job that fitted the one-node cluster (1 node x 2 tasks on a
# 2-core machine) fits any node, and slurmd finds the hardware it declares (else it drains the node).
node_lines=
for ((i = 1; i <= NODES; i++)); do
    node_lines+="NodeName=${NODE_NAMES[i-1]} NodeHostname=$NODE NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 2 + i)) ${hw}RealMemory=$mem State=UNKNOWN"$'\n'
done
# the node set of the config a running cluster was started with: slurmctld must restart when it changes
old_nodes=
[[ -f $CONF ]] && old_nodes=$(sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF" | paste -sd, -)
nodes_changed=0
if [[ -n $old_nodes && $old_nodes != "$NODE_LIST" ]]; then
    nodes_changed=1
    # slurmctld and every slurmd restart with the new node set: refuse while jobs could be lost
    if running "$RUN/slurmctld.pid" /usr/sbin/slurmctld >/dev/null \
        && [[ -n $(squeue -h -o %A 2>/dev/null) ]]; then
        die start.sh "" "the running cluster in $STATE has nodes $old_nodes, not $NODE_LIST, and jobs in its queue: stop it first (tools/slurm/stop.sh $STATE)"
    fi
fi

# write_if_changed FILE MODE: stdin -> FILE, only when the content differs; returns 0 when it changed.
write_if_changed() {
    local f=$1 mode=$2 tmp
    tmp=$(mktemp "$f.XXXXXX")
    cat >"$tmp"; chmod "$mode" "$tmp"
    if [[ -f $f ]] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; chmod "$mode" "$f"; return 1; fi
    mv "$tmp" "$f"; return 0
}

conf_changed=0
write_if_changed "$CONF" 644 <<EOF && conf_changed=1
# Written by tools/slurm/start.sh; edits are overwritten.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
# cred_expire: a requeued job may start again only once its old credential expired (default 120 s); short here
# so preemption tests need not wait two minutes
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
# %n = the node name: one spool, pid file and log per slurmd (all on this machine)
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups, no systemd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
# CR_LLN: a job goes to the least loaded node, so an array's tasks spread over the nodes (rather than filling n1)
SelectTypeParameters=CR_Core,CR_LLN
# jobs: arrays up to index 10000, requeue, quick kill, preemption by partition tier (job is requeued; its
# --signal is sent at preemption time)
MaxArraySize=10001
MaxJobCount=100000
JobRequeue=1
KillWait=2
MinJobAge=300
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# accounting through slurmdbd (sacct)
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
${node_lines}PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=$NODE_LIST MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF

write_if_changed "$DBD_CONF" 600 <<EOF || true
# Written by tools/slurm/start.sh; edits are overwritten.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdAddr=127.0.0.1
DbdHost=$NODE
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF

# ---------------------------------------------------------------------------------------------- processes
# wait_for SECONDS DAEMON LOG PIDFILE EXE WHAT CMD...: poll CMD until it succeeds; fail if the daemon died.
wait_for() {
    local secs=$1 daemon=$2 log=$3 pidfile=$4 exe=$5 what=$6; shift 6
    local start; start=$(date +%s)
    local end=$(( start + secs ))
    while ! "$@" >/dev/null 2>&1; do
        # (a daemon may take a moment to write its pid file: judge it dead only after a grace of 5 s)
        if [[ -n $pidfile ]] && (( $(date +%s) > start + 5 )) && ! running "$pidfile" "$exe" >/dev/null; then
            die "$daemon" "$log" "exited while waiting for: $what"
        fi
        (( $(date +%s) < end )) || die "$daemon" "$log" "timed out after ${secs}s waiting for: $what"
        sleep 0.1
    done
}

MUNGED=/usr/sbin/munged
MARIADBD=/usr/sbin/mariadbd
SLURMDBD=/usr/sbin/slurmdbd
SLURMCTLD=/usr/sbin/slurmctld
SLURMD=/usr/sbin/slurmd
started=()

# munged, as the munge user, socket/key/pid/log in the state folder
if pid=$(running "$MUNGE_PID" "$MUNGED"); then
    say "munged running (pid $pid)"
else
    rm -f "$MUNGE_PID"
    setpriv --reuid=munge --regid=munge --init-groups "$MUNGED" --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" \
        --pid-file="$MUNGE_PID" --log-file="$MUNGE_LOG" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG/munged.out" 2>&1 9>&- || die munged "$MUNGE_LOG" "failed to start (see also $LOG/munged.out)"
    started+=(munged)
fi
munge_ok() { munge -n --socket="$MUNGE_SOCK" | unmunge --socket="$MUNGE_SOCK"; }
wait_for 20 munged "$MUNGE_LOG" "$MUNGE_PID" "$MUNGED" "munge credential round trip" munge_ok

# MariaDB on 127.0.0.1:$DB_PORT, data in the state folder
if [[ ! -d $DB_DATA/mysql ]]; then
    say "initialising MariaDB in $DB_DATA"
    rm -rf "$DB_DATA"
    install -d -m 750 -o mysql -g mysql "$DB_DATA"
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATA" --auth-root-authentication-method=socket \
        --skip-test-db >>"$LOG/mariadb-install.log" 2>&1 \
        || die mariadb-install-db "$LOG/mariadb-install.log" "failed"
fi
if pid=$(running "$DB_PID" "$MARIADBD"); then
    say "mariadbd running (pid $pid)"
else
    rm -f "$DB_PID"
    setsid "$MARIADBD" --no-defaults --user=mysql --datadir="$DB_DATA" --socket="$DB_SOCK" --pid-file="$DB_PID" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve --log-error="$DB_LOG" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
        --max-connections=100 </dev/null >>"$LOG/mariadbd.out" 2>&1 9>&- &
    started+=(mariadbd)
fi
db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }
wait_for 60 mariadbd "$DB_LOG" "$DB_PID" "$MARIADBD" "MariaDB answering on $DB_SOCK" db -e 'SELECT 1'
db <<SQL || die mariadbd "$DB_LOG" "cannot create the slurm database user"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL

# slurmdbd, then the cluster in the database before slurmctld starts
if pid=$(running "$RUN/slurmdbd.pid" "$SLURMDBD"); then
    say "slurmdbd running (pid $pid)"
else
    rm -f "$RUN/slurmdbd.pid"
    "$SLURMDBD" </dev/null >>"$LOG/slurmdbd.out" 2>&1 9>&- || die slurmdbd "$LOG/slurmdbd.log" "failed to start"
    started+=(slurmdbd)
fi
wait_for 60 slurmdbd "$LOG/slurmdbd.log" "$RUN/slurmdbd.pid" "$SLURMDBD" "sacctmgr reaching slurmdbd" \
    sacctmgr -n -P list cluster format=cluster
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 \
        || die slurmdbd "$LOG/slurmdbd.log" "sacctmgr add cluster $CLUSTER failed (see $LOG/sacctmgr.log)"
fi

# A new node set (OEL_SLURM_NODES changed, or a state folder of the one-node start.sh): slurmctld cannot add or
# remove nodes on `scontrol reconfigure`, and the old slurmd (run/slurmd.pid) has the old name; restart them all.
if ((nodes_changed)); then
    say "nodes $old_nodes -> $NODE_LIST: restarting slurmctld and the slurmd daemons"
    for pidfile in "$RUN"/slurmd.pid "$RUN"/slurmd.*.pid; do
        if pid=$(running "$pidfile" "$SLURMD"); then stop_pid slurmd "$pid" "$(readlink -f "$SLURMD")" || true; fi
        rm -f "$pidfile"
    done
    if pid=$(running "$RUN/slurmctld.pid" "$SLURMCTLD"); then
        stop_pid slurmctld "$pid" "$(readlink -f "$SLURMCTLD")" || die slurmctld "$LOG/slurmctld.log" "would not stop"
    fi
fi

# slurmctld
if pid=$(running "$RUN/slurmctld.pid" "$SLURMCTLD"); then
    say "slurmctld running (pid $pid)"
    if ((conf_changed)); then
        say "slurm.conf changed: scontrol reconfigure"
        scontrol reconfigure >&2 || die slurmctld "$LOG/slurmctld.log" "scontrol reconfigure failed"
    fi
else
    rm -f "$RUN/slurmctld.pid"
    "$SLURMCTLD" </dev/null >>"$LOG/slurmctld.out" 2>&1 9>&- || die slurmctld "$LOG/slurmctld.log" "failed to start"
    started+=(slurmctld)
fi
wait_for 60 slurmctld "$LOG/slurmctld.log" "$RUN/slurmctld.pid" "$SLURMCTLD" "scontrol ping" \
    bash -c 'scontrol ping | grep -q "is UP"'

# the node names resolve to this machine (MASTER_ADDR of a multi-node job is its first node's name)
hosts_set "$STATE" "${NODE_NAMES[@]}" || die start.sh "" "cannot write the node names into $HOSTS_FILE"
for n in "${NODE_NAMES[@]}"; do
    getent hosts "$n" >/dev/null || die start.sh "" "node name $n does not resolve after adding it to $HOSTS_FILE"
done

# one slurmd per node: `slurmd -N <node>` takes that node's Port=, spool, pid file and log (%n)
for n in "${NODE_NAMES[@]}"; do
    if pid=$(running "$RUN/slurmd.$n.pid" "$SLURMD"); then
        say "slurmd $n running (pid $pid)"
    else
        rm -f "$RUN/slurmd.$n.pid"
        "$SLURMD" -N "$n" </dev/null >>"$LOG/slurmd.$n.out" 2>&1 9>&- \
            || die "slurmd $n" "$LOG/slurmd.$n.log" "failed to start"
        started+=("slurmd:$n")
    fi
done
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -1; }
t_node=$(date +%s)
end=$(( t_node + 60 ))
resumed=" "
for n in "${NODE_NAMES[@]}"; do
    while ! [[ $(node_state "$n") =~ ^(idle|mixed|allocated|completing)$ ]]; do
        st=$(node_state "$n")
        if [[ $resumed != *" $n "* && $st =~ drain|down|fail ]] && running "$RUN/slurmd.$n.pid" "$SLURMD" >/dev/null; then
            reason=$(sinfo -h -N -n "$n" -o %E 2>/dev/null | head -1)
            say "node $n is $st (reason: ${reason:-none}); resuming it"
            scontrol update NodeName="$n" State=RESUME >&2 || true
            resumed+="$n "
        fi
        running "$RUN/slurmd.$n.pid" "$SLURMD" >/dev/null || (( $(date +%s) <= t_node + 5 )) \
            || die "slurmd $n" "$LOG/slurmd.$n.log" "exited before the node came up (node state: $st)"
        (( $(date +%s) < end )) || die "slurmd $n" "$LOG/slurmd.$n.log" "node $n not up after 60s (state: ${st:-?})"
        sleep 0.2
    done
done

# ---------------------------------------------------------------------------------------------- smoke job
# on every node: a job step on each (srun), so each slurmd has started a task
jid=$(sbatch --parsable -J oel-smoke -o /dev/null -e /dev/null --chdir="$STATE" -t 1 --nodes="$NODES" \
    --ntasks-per-node=1 --wrap "srun true" 2>&1) \
    || die slurmctld "$LOG/slurmctld.log" "sbatch of the smoke job failed: $jid"
jid=${jid%%;*}
end=$(( $(date +%s) + 60 ))
st=
while :; do
    st=$(scontrol -o show job "$jid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    [[ -n $st ]] || st=$(sacct -X -n -P -j "$jid" --format=State 2>/dev/null | head -1 | cut -d' ' -f1)
    [[ $st == COMPLETED ]] && break
    [[ $st =~ ^(FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)$ ]] \
        && die slurmd "$LOG/slurmd.log" "smoke job $jid ended $st"
    (( $(date +%s) < end )) || die slurmctld "$LOG/slurmctld.log" "smoke job $jid not COMPLETED after 60s (state: ${st:-?})"
    sleep 0.1
done
# ... and accounting saw it (slurmctld -> slurmdbd is asynchronous)
end=$(( $(date +%s) + 30 ))
until [[ $(sacct -X -n -P -j "$jid" --format=State 2>/dev/null | head -1) == COMPLETED ]]; do
    (( $(date +%s) < end )) || die slurmdbd "$LOG/slurmdbd.log" "sacct does not show smoke job $jid COMPLETED after 30s"
    sleep 0.2
done

say "cluster $CLUSTER ($NODES nodes: $NODE_LIST) up in $(elapsed)s (started: ${started[*]:-none}; smoke job $jid COMPLETED; state $STATE)"
echo "export SLURM_CONF=$CONF"
