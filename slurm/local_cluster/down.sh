#!/usr/bin/env bash
# Stop the single-host SLURM cluster started by up.sh.
#
# Kills exactly the PIDs that up.sh recorded in ${DIST_FT_SLURM_DIR}/run
# (checking that each PID still belongs to the expected daemon), waits for them
# to exit and removes the pid files. Safe to run when nothing is running.
#
# Before stopping the daemons, jobs still in the cluster are cancelled through
# slurmctld (scancel) so that no job processes/slurmstepd outlive the cluster;
# set DIST_FT_SLURM_DOWN_CANCEL=0 to skip that.
set -euo pipefail

STATE_DIR="${DIST_FT_SLURM_DIR:-/tmp/dist-ft-slurm}"
CONF="${STATE_DIR}/slurm.conf"
RUN_DIR="${STATE_DIR}/run"
WAIT_S="${DIST_FT_SLURM_DOWN_TIMEOUT:-30}"
export PATH="${PATH}:/usr/sbin:/sbin"

log() { printf '[slurm-down] %s\n' "$*" >&2; }

source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

recorded_pid() {
    local name="$1" pidfile="${RUN_DIR}/$1.pid" pid want
    [[ -f "${pidfile}" ]] || return 1
    pid="$(cat "${pidfile}" 2>/dev/null || true)"
    want="$(expected_comm "${name}")" || return 1
    pid_is "${pid}" "${want}" || return 1
    echo "${pid}"
}

cancel_jobs() {
    [[ "${DIST_FT_SLURM_DOWN_CANCEL:-1}" == 1 ]] || return 0
    [[ -f "${CONF}" ]] || return 0
    recorded_pid slurmctld >/dev/null || return 0
    command -v squeue >/dev/null 2>&1 || return 0
    export SLURM_CONF="${CONF}"
    local jobs
    jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
    [[ -n "${jobs}" ]] || return 0
    log "cancelling remaining jobs: ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086 # job ids are whitespace-separated on purpose
    scancel ${jobs} >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 20))
    while ((SECONDS < deadline)); do
        # Jobs leave squeue once their processes are gone (COMPLETING -> gone).
        [[ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ]] && return 0
        sleep 0.5
    done
    log "WARNING: some jobs still listed after 20 s; stopping daemons anyway"
}

# Send SIGTERM to the recorded daemon NAME and wait; SIGKILL after WAIT_S.
stop_one() {
    local name="$1" pid
    if ! pid="$(recorded_pid "${name}")"; then
        rm -f "${RUN_DIR}/${name}.pid"
        return 0
    fi
    log "stopping ${name} (pid ${pid})"
    kill -TERM "${pid}" 2>/dev/null || true
    local deadline=$((SECONDS + WAIT_S))
    while recorded_pid "${name}" >/dev/null; do
        if ((SECONDS >= deadline)); then
            log "${name} (pid ${pid}) ignored SIGTERM for ${WAIT_S} s; sending SIGKILL"
            kill -KILL "${pid}" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.1
    done
    rm -f "${RUN_DIR}/${name}.pid"
}

main() {
    if [[ ! -d "${RUN_DIR}" ]]; then
        log "nothing recorded in ${RUN_DIR}; nothing to stop"
        return 0
    fi
    cancel_jobs
    local f name
    # slurmd first, then slurmctld (it saves state on SIGTERM), munged last.
    for f in "${RUN_DIR}"/slurmd.*.pid; do
        [[ -e "${f}" ]] || continue
        name="$(basename "${f}" .pid)"
        stop_one "${name}"
    done
    stop_one slurmctld
    stop_one munged
    # Daemon-written pid files (removed by the daemons on a clean exit anyway).
    rm -f "${STATE_DIR}"/slurmctld.pid "${STATE_DIR}"/slurmd.*.pid \
        "${STATE_DIR}/munge/munged.pid"
    log "cluster stopped"
}

main "$@"
