#!/usr/bin/env bash
# Bring up a real single-host SLURM cluster (one slurmctld + two slurmd posing
# as node1 and node2) from Debian packages, without systemd.
#
# Idempotent: a second run finds the running daemons, waits for the nodes and
# exits 0. Stop it with down.sh (which kills only the PIDs recorded here).
#
# Environment:
#   DIST_FT_SLURM_DIR        state dir (default /tmp/dist-ft-slurm)
#   DIST_FT_SLURM_CPUS       CPUs per fake node (default 2)
#   DIST_FT_SLURM_MEM_MB     RealMemory per fake node (default min(8000, MemTotal/2))
#   DIST_FT_SLURM_CTLD_PORT  slurmctld port (default 6817)
#   DIST_FT_SLURM_NODE_PORTS slurmd port range start (default 17001 -> 17001-17002)
#   DIST_FT_SLURM_TIMEOUT    seconds to wait for both nodes to be idle (default 60)
set -euo pipefail

STATE_DIR="${DIST_FT_SLURM_DIR:-/tmp/dist-ft-slurm}"
CONF="${STATE_DIR}/slurm.conf"
RUN_DIR="${STATE_DIR}/run"        # PIDs recorded by this script (down.sh reads these)
MUNGE_DIR="${STATE_DIR}/munge"
MUNGE_KEY="/etc/munge/munge.key"
CPUS="${DIST_FT_SLURM_CPUS:-2}"
CTLD_PORT="${DIST_FT_SLURM_CTLD_PORT:-6817}"
NODE_PORT0="${DIST_FT_SLURM_NODE_PORTS:-17001}"
WAIT_TIMEOUT="${DIST_FT_SLURM_TIMEOUT:-60}"
NODES=(node1 node2)

log() { printf '[slurm-up] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- packages
ensure_packages() {
    local missing=0 cmd
    for cmd in slurmctld slurmd sbatch srun sinfo scontrol munged; do
        if ! command -v "${cmd}" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/${cmd}" ]]; then
            missing=1
        fi
    done
    [[ "${missing}" -eq 0 ]] && return 0

    [[ "$(id -u)" -eq 0 ]] || die "slurm-wlm/munge not installed and not root; install them first"
    command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge not installed and apt-get not available"

    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "${policy}" ]]; then
        # Keep the package scripts from starting daemons; we start our own.
        printf '#!/bin/sh\nexit 101\n' >"${policy}"
        chmod 0755 "${policy}"
        created_policy=1
    fi
    log "installing slurm-wlm and munge via apt-get"
    local t0=${SECONDS} rc=0
    {
        apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm munge >/dev/null
    } || rc=$?
    if [[ "${created_policy}" -eq 1 ]]; then
        rm -f "${policy}"
    fi
    [[ "${rc}" -eq 0 ]] || die "apt-get install failed (rc=${rc})"
    log "installed in $((SECONDS - t0)) s"
}

# --------------------------------------------------------------- munge key
ensure_munge_key() {
    [[ -s "${MUNGE_KEY}" ]] && return 0
    [[ "$(id -u)" -eq 0 ]] || die "${MUNGE_KEY} missing and not root"
    log "creating munge key ${MUNGE_KEY}"
    mkdir -p "$(dirname "${MUNGE_KEY}")"
    if command -v mungekey >/dev/null 2>&1 || [[ -x /usr/sbin/mungekey ]]; then
        PATH="${PATH}:/usr/sbin" mungekey --create --keyfile="${MUNGE_KEY}"
    else
        dd if=/dev/urandom of="${MUNGE_KEY}" bs=1024 count=1 status=none
    fi
    if id munge >/dev/null 2>&1; then
        chown munge:munge "${MUNGE_KEY}"
    fi
    chmod 0400 "${MUNGE_KEY}"
}

# ------------------------------------------------------------ pid handling
# Our record for daemon NAME lives in ${RUN_DIR}/NAME.pid. A record is "alive"
# only if the PID exists and its command name is the expected daemon binary,
# so a recycled PID is never mistaken for ours.
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

recorded_alive() {
    local name="$1" pidfile="${RUN_DIR}/$1.pid" pid
    [[ -f "${pidfile}" ]] || return 1
    pid="$(cat "${pidfile}" 2>/dev/null || true)"
    pid_is "${pid}" "$(expected_comm "${name}")"
}

any_recorded_alive() {
    local n
    for n in munged slurmctld "${NODES[@]/#/slurmd.}"; do
        recorded_alive "${n}" && return 0
    done
    return 1
}

# Start a self-daemonizing program, wait for its own pidfile, record the PID.
start_daemon() {
    local name="$1" daemon_pidfile="$2" logfile="$3"; shift 3
    if recorded_alive "${name}"; then
        log "${name} already running (pid $(cat "${RUN_DIR}/${name}.pid"))"
        return 0
    fi
    rm -f "${RUN_DIR}/${name}.pid" "${daemon_pidfile}"
    log "starting ${name}: $*"
    if ! "$@"; then
        tail -n 20 "${logfile}" >&2 2>/dev/null || true
        die "failed to start ${name}"
    fi
    local i pid=""
    for ((i = 0; i < 100; i++)); do
        pid="$(cat "${daemon_pidfile}" 2>/dev/null || true)"
        pid="${pid//[[:space:]]/}"
        if pid_is "${pid}" "$(expected_comm "${name}")"; then
            break
        fi
        pid=""
        sleep 0.1
    done
    if [[ -z "${pid}" ]]; then
        tail -n 20 "${logfile}" >&2 2>/dev/null || true
        die "${name} did not write ${daemon_pidfile}"
    fi
    echo "${pid}" >"${RUN_DIR}/${name}.pid"
    log "${name} started (pid ${pid})"
}

# ------------------------------------------------------------------ config
mem_mb() {
    if [[ -n "${DIST_FT_SLURM_MEM_MB:-}" ]]; then
        echo "${DIST_FT_SLURM_MEM_MB}"
        return
    fi
    local total
    total="$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)"
    total=$((total / 2))
    ((total > 8000)) && total=8000
    ((total < 100)) && total=100
    echo "${total}"
}

write_conf() {
    local host mem tmp
    host="$(hostname -s 2>/dev/null || hostname)"
    mem="$(mem_mb)"
    tmp="$(mktemp "${STATE_DIR}/slurm.conf.XXXXXX")"
    cat >"${tmp}" <<EOF
# Generated by dist-ft slurm/local_cluster/up.sh -- single-host test cluster.
ClusterName=distft
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_DIR}/munge.socket.2,cred_expire=10

StateSaveLocation=${STATE_DIR}/slurmctld
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmctldLogFile=${STATE_DIR}/slurmctld.log
SlurmdSpoolDir=${STATE_DIR}/slurmd.%n
SlurmdPidFile=${STATE_DIR}/slurmd.%n.pid
SlurmdLogFile=${STATE_DIR}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE_DIR}/jobcomp.txt

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=60

NodeName=node[1-2] NodeHostname=${host} NodeAddr=127.0.0.1 Port=[${NODE_PORT0}-$((NODE_PORT0 + 1))] CPUs=${CPUS} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f "${CONF}" ]] && cmp -s "${tmp}" "${CONF}"; then
        rm -f "${tmp}"
    elif [[ -f "${CONF}" ]] && any_recorded_alive; then
        rm -f "${tmp}"
        log "WARNING: daemons are running; keeping existing ${CONF} (run down.sh to apply changes)"
    else
        chmod 0644 "${tmp}"
        mv -f "${tmp}" "${CONF}"
        log "wrote ${CONF}"
    fi
}

link_etc_conf() {
    local etc=/etc/slurm/slurm.conf
    if [[ -e "${etc}" || -L "${etc}" ]]; then
        if [[ "$(readlink -f "${etc}" 2>/dev/null || true)" != "$(readlink -f "${CONF}")" ]]; then
            log "note: ${etc} exists and is not ours; client commands need SLURM_CONF=${CONF}"
        fi
        return 0
    fi
    if mkdir -p /etc/slurm 2>/dev/null && ln -s "${CONF}" "${etc}" 2>/dev/null; then
        log "linked ${etc} -> ${CONF}"
    else
        log "note: could not create ${etc}; client commands need SLURM_CONF=${CONF}"
    fi
}

# ------------------------------------------------------------ wait for idle
wait_for_nodes() {
    local deadline=$((SECONDS + WAIT_TIMEOUT)) out node state ok resumed=""
    while :; do
        ok=1
        out="$(sinfo -h -N -o '%N %t' 2>/dev/null || true)"
        for node in "${NODES[@]}"; do
            state="$(awk -v n="${node}" '$1 == n {print $2; exit}' <<<"${out}")"
            case "${state}" in
                idle | alloc | mix | comp) ;;   # up and usable (a job may be running)
                drain* | drng | down* | fail*)
                    ok=0
                    # Left over from an earlier run: the slurmd is ours and running.
                    if [[ " ${resumed} " != *" ${node} "* ]]; then
                        scontrol update NodeName="${node}" State=RESUME >/dev/null 2>&1 || true
                        resumed="${resumed} ${node}"
                    fi
                    ;;
                *) ok=0 ;;
            esac
        done
        if [[ "${ok}" -eq 1 ]]; then
            return 0
        fi
        if ((SECONDS >= deadline)); then
            log "nodes not ready after ${WAIT_TIMEOUT} s; sinfo says:"
            printf '%s\n' "${out}" >&2
            log "see logs in ${STATE_DIR}/*.log"
            return 1
        fi
        sleep 0.5
    done
}

# -------------------------------------------------------------------- main
main() {
    local t0=${SECONDS}
    [[ "${STATE_DIR}" == /* ]] || die "DIST_FT_SLURM_DIR must be an absolute path: ${STATE_DIR}"
    [[ ! "${STATE_DIR}" =~ [[:space:]] ]] ||
        die "DIST_FT_SLURM_DIR must not contain whitespace (slurm.conf can't express it): ${STATE_DIR}"
    ensure_packages
    export PATH="${PATH}:/usr/sbin:/sbin"
    ensure_munge_key

    mkdir -p "${STATE_DIR}" "${RUN_DIR}" "${STATE_DIR}/slurmctld" "${MUNGE_DIR}"
    # munged refuses group/other-writable directories on its socket path.
    chmod 0755 "${STATE_DIR}" "${MUNGE_DIR}"
    local node
    for node in "${NODES[@]}"; do
        mkdir -p "${STATE_DIR}/slurmd.${node}"
    done

    local already=1 n
    for n in munged slurmctld "${NODES[@]/#/slurmd.}"; do
        recorded_alive "${n}" || already=0
    done

    write_conf
    link_etc_conf
    export SLURM_CONF="${CONF}"

    # munged insists that the key belongs to the user it runs as: as root, run
    # it as the package's "munge" user (as the packaged service does).
    local -a as_munge=()
    if [[ "$(id -u)" -eq 0 ]] && id munge >/dev/null 2>&1 &&
        [[ "$(stat -c %U "${MUNGE_KEY}")" == munge ]]; then
        chown -R munge:munge "${MUNGE_DIR}"
        as_munge=(runuser -u munge --)
    fi
    start_daemon munged "${MUNGE_DIR}/munged.pid" "${MUNGE_DIR}/munged.log" \
        "${as_munge[@]}" munged --socket="${MUNGE_DIR}/munge.socket.2" \
        --key-file="${MUNGE_KEY}" \
        --pid-file="${MUNGE_DIR}/munged.pid" \
        --log-file="${MUNGE_DIR}/munged.log" \
        --seed-file="${MUNGE_DIR}/munged.seed"
    start_daemon slurmctld "${STATE_DIR}/slurmctld.pid" "${STATE_DIR}/slurmctld.log" \
        slurmctld -f "${CONF}"
    for node in "${NODES[@]}"; do
        start_daemon "slurmd.${node}" "${STATE_DIR}/slurmd.${node}.pid" \
            "${STATE_DIR}/slurmd.${node}.log" \
            slurmd -f "${CONF}" -N "${node}"
    done

    wait_for_nodes || die "cluster did not become ready"
    if [[ "${already}" -eq 1 ]]; then
        log "cluster already running (state dir ${STATE_DIR})"
    else
        log "cluster up in $((SECONDS - t0)) s (state dir ${STATE_DIR})"
    fi
    sinfo -N >&2 || true
    echo "export SLURM_CONF=${CONF}"
}

main "$@"
