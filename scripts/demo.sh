#!/usr/bin/env bash
# fetchd end to end on this host, with nothing from the internet:
#   1. scripts/setup.sh (system tools + .venv),
#   2. a local docker-registry on a free loopback port holding a generated 9-platform image,
#   3. the daemon with a temporary store and socket,
#   4. `fetchd pull` for three Debian architectures into demo/, concurrent builds of one image,
#      a warm pull, and checks: `zstd -t`, hard links to the store, `skopeo inspect`,
#   5. everything stopped again (also on failure or Ctrl-C).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
./scripts/setup.sh

PY=$ROOT/.venv/bin/python
FETCHD=$ROOT/.venv/bin/fetchd
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fetchd-demo.XXXXXX")
SOCK=$WORK/run/fetchd.sock
OUT=$ROOT/demo
REGISTRY_PID=
DAEMON_PID=

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    local rc=$?
    [ -n "$DAEMON_PID" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
    [ -n "$REGISTRY_PID" ] && kill -TERM "$REGISTRY_PID" 2>/dev/null && wait "$REGISTRY_PID" 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "local registry with a generated multi-platform image"
# The registry helper pushes the image, writes its reference, then waits for SIGTERM and
# stops docker-registry on the way out.
"$PY" - "$WORK/reference" <<'EOF' &
import signal, sys
sys.path.insert(0, "tests")
from support.images import build_catalog, push_image
from support.registry import LocalRegistry

signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with LocalRegistry() as registry:
    image = next(i for i in build_catalog() if i.name == "multi-oci")
    image = push_image(registry, image)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(image.reference)
    import os
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    print(f"registry {registry.url}: {image.reference} ({len(image.platforms)} platforms)", flush=True)
    signal.pause()
EOF
REGISTRY_PID=$!
for _ in $(seq 600); do [ -s "$WORK/reference" ] && break; kill -0 "$REGISTRY_PID" || exit 1; sleep 0.1; done
REF=$(cat "$WORK/reference")

say "daemon: socket $SOCK, store $WORK/store"
: >"$WORK/config.toml"   # defaults only; never the host's /etc/fetchd/config.toml
"$FETCHD" serve --socket "$SOCK" --store "$WORK/store" --config "$WORK/config.toml" \
    2>"$WORK/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 300); do "$FETCHD" status --socket "$SOCK" >/dev/null 2>&1 && break; sleep 0.1; done
"$FETCHD" status --socket "$SOCK" | head -1

mkdir -p "$OUT"
NAME=multi-oci
say "fetchd pull $REF for amd64, armhf and arm64"
for arch in amd64 armhf arm64; do
    "$FETCHD" pull "$REF" --arch "$arch" -o "$OUT/$NAME-$arch.zst" --socket "$SOCK"
done

say "four builds ask for the same image at once: one job, one download"
for i in 1 2 3 4; do
    "$FETCHD" pull "$REF" --arch riscv64 -o "$WORK/build$i.zst" --socket "$SOCK" >/dev/null &
    pids[i]=$!
done
for i in 1 2 3 4; do wait "${pids[i]}"; done
echo "inodes of the four outputs: $(stat -c %i "$WORK"/build*.zst | sort -u | tr '\n' ' ')(one inode: hard links)"

say "warm pull (archive already packed)"
start=$(date +%s%N)
"$FETCHD" pull "$REF" --arch armhf -o "$OUT/$NAME.zst" --socket "$SOCK"
echo "took $(( ($(date +%s%N) - start) / 1000000 )) ms, including the CLI's start and its re-hash of the output"

say "checks"
for f in "$OUT"/$NAME*.zst; do zstd -q -t "$f" && echo "zstd -t ok: $f"; done
archive=$("$FETCHD" ls --socket "$SOCK" --json | "$PY" -c '
import json, sys
for image in json.load(sys.stdin)["images"]:
    if image["platform"] == "linux/arm/v7":
        print(image["archive_digest"].split(":")[1])')
if [ "$(stat -c %i "$OUT/$NAME.zst")" = "$(stat -c %i "$WORK/store/blobs/sha256/$archive")" ]; then
    echo "demo/$NAME.zst is a hard link to the store's archive (read-only: $(stat -c %A "$OUT/$NAME.zst"))"
fi
zstd -q -d -c "$OUT/$NAME.zst" >"$WORK/image.tar"
skopeo inspect "docker-archive:$WORK/image.tar" | "$PY" -c '
import json, sys
info = json.load(sys.stdin)
print("skopeo inspect:", info["Os"] + "/" + info["Architecture"], len(info["Layers"]), "layers")'
echo "RepoTags in manifest.json: $(tar -xOf "$WORK/image.tar" manifest.json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)[0]["RepoTags"])')"

say "daemon status"
"$FETCHD" status --socket "$SOCK"
echo
echo "demo done: outputs in $OUT/"
