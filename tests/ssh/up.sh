#!/usr/bin/env bash
# A throwaway sshd for the ssh backend's tests (tests/integration/test_ssh_backend.py).
#
# Three "hosts" on loopback (Linux routes all of 127/8 to lo), one sshd each on ${PORT}:
#   127.0.0.1, 127.0.0.2  see the whole filesystem: the shared run dir is ${DIR}/runs;
#   127.0.0.3             runs in a mount namespace where ${DIR}/runs is an empty tmpfs: a host
#                         that does not share the run dir (skipped when unshare is not allowed).
# Host and user keys are generated into ${DIR}; ${DIR}/ssh_config is the client side
# (`ssh -F ${DIR}/ssh_config 127.0.0.2`). Installs openssh-server with apt when it is missing
# and we are root. Only loopback addresses are used. Stop with down.sh.
set -euo pipefail

DIR="${DIST_FT_SSHD_DIR:-/tmp/dist-ft-sshd}"
PORT="${DIST_FT_SSHD_PORT:-22022}"
export PATH="${PATH}:/usr/sbin:/sbin"
log() { printf '[sshd-up] %s\n' "$*" >&2; }

if ! command -v sshd >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        log "installing openssh-server"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server >/dev/null; }
    else
        log "sshd is not installed (and cannot be installed here)"; exit 1
    fi
fi

bash "$(dirname "${BASH_SOURCE[0]}")/down.sh" >/dev/null 2>&1 || true
mkdir -p "${DIR}/runs" /run/sshd
chmod 700 "${DIR}"
rm -f "${DIR}"/host_key* "${DIR}"/id "${DIR}"/id.pub
ssh-keygen -q -t ed25519 -N '' -f "${DIR}/host_key"
ssh-keygen -q -t ed25519 -N '' -f "${DIR}/id"
cp "${DIR}/id.pub" "${DIR}/authorized_keys"
chmod 600 "${DIR}/authorized_keys"

write_config() {  # $1: name, $2...: listen addresses
    local name="$1"; shift
    {
        echo "Port ${PORT}"
        for addr in "$@"; do echo "ListenAddress ${addr}"; done
        echo "HostKey ${DIR}/host_key"
        echo "AuthorizedKeysFile ${DIR}/authorized_keys"
        echo "PidFile ${DIR}/${name}.pid"
        echo "PasswordAuthentication no"
        echo "KbdInteractiveAuthentication no"
        echo "PubkeyAuthentication yes"
        echo "PermitRootLogin prohibit-password"
        echo "UsePAM no"
        echo "StrictModes no"
        echo "X11Forwarding no"
        echo "PrintMotd no"
        echo "MaxStartups 50"
    } > "${DIR}/${name}_config"
}

write_config sshd_shared 127.0.0.1 127.0.0.2
"$(command -v sshd)" -f "${DIR}/sshd_shared_config" -E "${DIR}/sshd_shared.log"
hosts="127.0.0.1 127.0.0.2"

write_config sshd_isolated 127.0.0.3
if unshare --mount --propagation private true 2>/dev/null; then
    unshare --mount --propagation private bash -c \
        "mount -t tmpfs tmpfs '${DIR}/runs' && exec '$(command -v sshd)' -f '${DIR}/sshd_isolated_config' -E '${DIR}/sshd_isolated.log'"
    hosts="${hosts} 127.0.0.3"
else
    log "unshare --mount is not allowed here: no host without the shared run dir (127.0.0.3)"
fi

cat > "${DIR}/ssh_config" <<CONF
Host ${hosts}
    Port ${PORT}
    User $(id -un)
    IdentityFile ${DIR}/id
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
CONF

for host in ${hosts}; do
    for _ in $(seq 50); do
        ssh -F "${DIR}/ssh_config" "${host}" true 2>/dev/null && break
        sleep 0.1
    done
    ssh -F "${DIR}/ssh_config" "${host}" true || { log "sshd on ${host}:${PORT} does not answer"; exit 1; }
done
echo "${hosts}" > "${DIR}/hosts"
log "sshd up on ${hosts} port ${PORT}: ssh -F ${DIR}/ssh_config HOST"
