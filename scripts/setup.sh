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
# The Debian package (scripts/build-deb.sh, tests/test_deb.py) needs the debhelper toolchain,
# Debian's python3.11 with venv and the pip/setuptools/wheel wheels, lintian and man (man-db).
APT_PACKAGES=(docker-registry skopeo podman zstd systemd uidmap python3-venv locales acl
    debhelper dpkg-dev fakeroot lintian man-db python3.11-venv python3-pip-whl
    python3-setuptools-whl python3-wheel-whl)
# tool -> the package that ships it
declare -A TOOLS=(
    [docker-registry]=docker-registry [skopeo]=skopeo [podman]=podman [zstd]=zstd
    [pzstd]=zstd [systemctl]=systemd [newuidmap]=uidmap [locale-gen]=locales [setfacl]=acl
    [dh]=debhelper [dpkg-buildpackage]=dpkg-dev [fakeroot]=fakeroot [lintian]=lintian [man]=man-db
)
# files -> the package that ships them (packages without a command of their own)
declare -A FILES=(
    [/usr/lib/python3.11/venv/__init__.py]=python3.11-venv
    [/usr/share/python-wheels/pip-*.whl]=python3-pip-whl
    [/usr/share/python-wheels/setuptools-*.whl]=python3-setuptools-whl
    [/usr/share/python-wheels/wheel-*.whl]=python3-wheel-whl
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
for pattern in "${!FILES[@]}"; do
    compgen -G "$pattern" >/dev/null || missing+=("${FILES[$pattern]}")
done
PY=$(pick_python || true)
if [ -z "$PY" ] || ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

# Root, or sudo for the system changes (apt, the locale).
SUDO=()
need_root() {
    [ "$(id -u)" -eq 0 ] && return 0
    command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: $1"; exit 1; }
    SUDO=(sudo)
}

if [ ${#missing[@]} -gt 0 ]; then
    log "missing: ${missing[*]}; installing ${APT_PACKAGES[*]}"
    need_root "install ${APT_PACKAGES[*]} by hand"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${APT_PACKAGES[@]}"
    PY=$(pick_python) || { log "no python3 >= 3.11 found (set PYTHON=...)"; exit 1; }
fi

# BitBake (tests/test_bitbake_build.py runs the real runner) refuses to start without the
# en_US.UTF-8 locale. Generated once: listed in /etc/locale.gen (so a later locale-gen keeps it).
if ! locale -a 2>/dev/null | grep -qix 'en_US\.utf-\?8'; then
    log "generating the en_US.UTF-8 locale (BitBake needs it)"
    need_root "generate the en_US.UTF-8 locale by hand (locale-gen)"
    if ! grep -qx 'en_US.UTF-8 UTF-8' /etc/locale.gen 2>/dev/null; then
        if grep -qx '# *en_US.UTF-8 UTF-8' /etc/locale.gen 2>/dev/null; then
            "${SUDO[@]}" sed -i 's/^# *\(en_US\.UTF-8 UTF-8\)$/\1/' /etc/locale.gen
        else
            echo 'en_US.UTF-8 UTF-8' | "${SUDO[@]}" tee -a /etc/locale.gen >/dev/null
        fi
    fi
    "${SUDO[@]}" locale-gen >/dev/null
    locale -a 2>/dev/null | grep -qix 'en_US\.utf-\?8' || { log "locale-gen did not make en_US.UTF-8"; exit 1; }
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
