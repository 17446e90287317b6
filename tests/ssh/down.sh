#!/usr/bin/env bash
# Stop the sshd daemons started by up.sh (only the pids it recorded, checked to be sshd).
set -euo pipefail
DIR="${DIST_FT_SSHD_DIR:-/tmp/dist-ft-sshd}"
for name in sshd_shared sshd_isolated; do
    pidfile="${DIR}/${name}.pid"
    [[ -f "${pidfile}" ]] || continue
    pid="$(cat "${pidfile}" 2>/dev/null || true)"
    if [[ "${pid}" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == sshd ]]; then
        kill "${pid}" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "${pidfile}"
done
rm -f "${DIR}/hosts"
