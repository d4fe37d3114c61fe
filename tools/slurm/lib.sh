# Shared by start.sh and stop.sh (sourced): messages and the process checks that make sure we only ever touch
# the daemons our own pid files name.

say() { echo "[oel-slurm] $*" >&2; }

# alive PID EXE: PID is a live (non-zombie) process whose executable is EXE (a resolved path).
alive() {
    local actual st
    actual=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    [[ ${actual% (deleted)} == "$2" ]] || return 1
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null)
    [[ -n $st && $st != Z && $st != X ]]
}

# running PIDFILE EXE: prints the pid when PIDFILE names a live (non-zombie) process running EXE.
running() {
    local pidfile=$1 exe pid
    exe=$(readlink -f "$2")
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid ]] || return 1
    alive "$pid" "$exe" || return 1
    echo "$pid"
}

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

# The node names must resolve (a multi-node job's MASTER_ADDR is its first node's name): one line per cluster in
# /etc/hosts, ending in a marker that names the state folder, so that start.sh can replace it and stop.sh remove
# it without touching anything else. /etc/hosts may be a bind mount (containers): rewritten in place, not renamed.
HOSTS_FILE=${OEL_SLURM_HOSTS_FILE:-/etc/hosts}
hosts_marker() { echo "# oel-slurm $1"; }

# hosts_set STATE NAME...: the marked line of STATE names NAME... (the line goes when no NAME is given).
hosts_set() {
    local state=$1 marker line content; shift
    marker=$(hosts_marker "$state")
    line=
    (($#)) && line="127.0.0.1 $* $marker"
    (
        # a lock on the file itself (read-only descriptor): other clusters' start/stop edit the same file
        flock -w 30 8 || { say "ERROR: cannot lock $HOSTS_FILE"; exit 1; }
        # every line but ours (ours: ends exactly with our marker; /tmp/oel-slurm is a prefix of /tmp/oel-slurm-x)
        content=$(awk -v m=" $marker" 'length($0) < length(m) || substr($0, length($0) - length(m) + 1) != m' \
            "$HOSTS_FILE")
        current=$(awk -v m=" $marker" 'length($0) >= length(m) && substr($0, length($0) - length(m) + 1) == m' \
            "$HOSTS_FILE")
        [[ $current == "$line" ]] && exit 0
        { [[ -z $content ]] || printf '%s\n' "$content"; [[ -z $line ]] || printf '%s\n' "$line"; } >"$HOSTS_FILE"
    ) 8<"$HOSTS_FILE"
}
