#!/usr/bin/env bash
# Build the Debian package fetchd_<version>_<arch>.deb from this tree and check it with lintian.
#
# Usage: scripts/build-deb.sh [-o OUTDIR] [--version VERSION] [--wheelhouse DIR] [--no-lintian]
#   -o OUTDIR         where the .deb goes (default: dist/); its path is printed last
#   --version V       package version (default: debian/changelog's); it must start with
#                     fetchd's own version (fetchd/__init__.py), e.g. 0.1.0+site1
#   --wheelhouse DIR  take the pinned dependencies' wheels from DIR, not from PyPI
#   --no-lintian      skip lintian (otherwise any lintian tag, pedantic ones too, fails the build)
#
# On Debian 12 with debhelper, dpkg-dev, python3.11-venv and lintian (scripts/setup.sh installs
# them). The build runs in a temporary copy of the tree (the files git knows, with local changes),
# so the checkout stays clean; root is not needed. When it fails: OUTDIR/fetchd-build.log.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
out=$ROOT/dist
version=
lint=1
wheelhouse=

die() { printf 'build-deb: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        -o) [ $# -ge 2 ] || die "-o needs a directory"; out=$2; shift 2 ;;
        --version) [ $# -ge 2 ] || die "--version needs a version"; version=$2; shift 2 ;;
        --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a directory"; wheelhouse=$2; shift 2 ;;
        --no-lintian) lint=0; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

for tool in dpkg-buildpackage dh python3.11; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing: run scripts/setup.sh (or apt-get install debhelper dpkg-dev python3.11-venv lintian)"
done
[ "$lint" = 0 ] || command -v lintian >/dev/null 2>&1 || die "lintian is missing: run scripts/setup.sh, or pass --no-lintian"
if [ -n "$wheelhouse" ]; then
    [ -d "$wheelhouse" ] || die "--wheelhouse $wheelhouse is not a directory"
    wheelhouse=$(cd "$wheelhouse" && pwd)
fi

upstream=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' fetchd/__init__.py)
[ -n "$upstream" ] || die "no __version__ in fetchd/__init__.py"
[ -n "$version" ] || version=$(dpkg-parsechangelog -l debian/changelog -S Version)
case "$version" in
    "$upstream"|"$upstream"[+~.]*) ;;
    *) die "version $version does not start with fetchd's own version $upstream (fetchd/__init__.py)" ;;
esac
dpkg --compare-versions "$version" gt 0 2>/dev/null || die "$version is not a Debian version"

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/fetchd-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/fetchd
mkdir "$src"

# The source: what git knows (tracked, and new files not ignored), as they are on disk.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -cf - | tar -C "$src" -xf -
else
    tar --exclude=./.venv --exclude=./.git --exclude=./dist --exclude=./build -cf - . |
        tar -C "$src" -xf -
fi

if [ "$version" != "$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)" ]; then
    maintainer=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)
    {
        printf 'fetchd (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * Built as %s by scripts/build-deb.sh.\n\n' "$version"
        printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
        cat "$src/debian/changelog"
    } >"$work/changelog"
    mv "$work/changelog" "$src/debian/changelog"
fi

log=$work/build.log
printf 'build-deb: building fetchd %s\n' "$version" >&2
if ! (cd "$src" && FETCHD_WHEELHOUSE=$wheelhouse dpkg-buildpackage -b -us -uc) >"$log" 2>&1; then
    cp "$log" "$out/fetchd-build.log"
    tail -n 40 "$log" >&2
    die "dpkg-buildpackage failed (whole log: $out/fetchd-build.log)"
fi
deb=$(find "$work" -maxdepth 1 -name "fetchd_${version#*:}_*.deb" | head -n 1)
if [ -z "$deb" ]; then
    cp "$log" "$out/fetchd-build.log"
    die "dpkg-buildpackage made no fetchd_${version}_*.deb (log: $out/fetchd-build.log)"
fi

if [ "$lint" = 1 ]; then
    # Any tag fails the build, pedantic ones too; every override in
    # debian/fetchd.lintian-overrides says why it is there.
    if ! lintian --fail-on error,warning,info,pedantic --info --pedantic "$deb" >"$work/lintian.txt" 2>&1; then
        cat "$work/lintian.txt" >&2
        die "lintian found problems in $(basename "$deb")"
    fi
    cat "$work/lintian.txt" >&2
fi

cp "$deb" "$out/"
printf '%s\n' "$out/$(basename "$deb")"
