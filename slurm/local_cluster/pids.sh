# Shared by up.sh and down.sh (sourced): is a recorded PID still the daemon we started?
# A record is "alive" only if the PID exists and its command name is the expected daemon
# binary, so a recycled PID is never mistaken for ours.

expected_comm() {
    case "$1" in
        munged) echo munged ;;
        slurmctld) echo slurmctld ;;
        slurmd.*) echo slurmd ;;
        *) return 1 ;;
    esac
}

# A PID counts as running only if it exists, is not a zombie (a container's
# PID 1 may reap exited daemons late) and runs the expected daemon binary.
pid_is() {
    local pid="$1" want="$2" stat rest
    [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
    stat="$(cat "/proc/${pid}/stat" 2>/dev/null)" || return 1
    rest="${stat##*) }"
    case "${rest:0:1}" in Z | X | x) return 1 ;; esac
    [[ "$(cat "/proc/${pid}/comm" 2>/dev/null || true)" == "${want}" ]]
}
