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
