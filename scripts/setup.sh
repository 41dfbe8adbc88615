#!/usr/bin/env bash
# Prepare this checkout on Debian 12 (bookworm): system tools + .venv with fetchd and its test deps.
#
# Idempotent and fast when nothing changed: apt runs only when a tool is missing, the venv is
# created only when absent or broken, and pip runs only when pyproject.toml changed.
# Runs as root, or through sudo otherwise. Environment: PYTHON=/path/to/python3 (>= 3.11).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
APT_PACKAGES=(docker-registry skopeo podman zstd systemd uidmap python3-venv)
# tool -> the package that ships it
declare -A TOOLS=(
    [docker-registry]=docker-registry [skopeo]=skopeo [podman]=podman [zstd]=zstd
    [pzstd]=zstd [systemctl]=systemd [newuidmap]=uidmap
)

log() { printf 'setup: %s\n' "$*" >&2; }

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" /usr/bin/python3 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

missing=()
for tool in "${!TOOLS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
PY=$(pick_python || true)
if [ -z "$PY" ] || ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ ${#missing[@]} -gt 0 ]; then
    log "missing: ${missing[*]}; installing ${APT_PACKAGES[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: install ${APT_PACKAGES[*]} by hand"; exit 1; }
        SUDO=(sudo)
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${APT_PACKAGES[@]}"
    PY=$(pick_python) || { log "no python3 >= 3.11 found (set PYTHON=...)"; exit 1; }
fi

# A venv that is missing, broken, or too old is made anew.
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
    log "creating $VENV with $PY"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
fi

# pip only when the project's dependencies changed (or the editable install points elsewhere).
stamp_file=$VENV/.fetchd-setup-stamp
stamp=$(cat pyproject.toml "$VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ] ||
    ! "$VENV/bin/python" -c 'import fetchd, sys; sys.exit(not fetchd.__file__.startswith(sys.argv[1]))' \
        "$ROOT/" >/dev/null 2>&1; then
    log "installing fetchd[test] into $VENV (log: $VENV/pip-install.log)"
    # pip's chatter goes to a log; it is shown only when the install fails.
    if ! "$VENV/bin/python" -m pip install -e "$ROOT[test]" >"$VENV/pip-install.log" 2>&1; then
        tail -n 60 "$VENV/pip-install.log" >&2
        log "pip install failed"
        exit 1
    fi
    echo "$stamp" >"$stamp_file"
fi
log "ready: $VENV ($("$VENV/bin/python" --version))"
