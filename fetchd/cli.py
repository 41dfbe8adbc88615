"""The ``fetchd`` command: ``serve`` runs the daemon; the other commands ask it over its socket.

Client commands go through ``fetchd_client`` (the same library builds use) and import
nothing heavy, so they start fast. Expected failures print one line, ``fetchd: error: ...``
with what to do, and exit non-zero; there are no tracebacks for them.

Exit codes: 0 success, 1 an error the daemon or the client reported, 2 bad usage,
3 daemon not reachable, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from .errors import printable

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", metavar="PATH", default=None,
        help="the daemon's socket (default: $FETCHD_SOCKET or /run/fetchd/fetchd.sock)",
    )
    parser = argparse.ArgumentParser(
        prog="fetchd",
        description="Container images for embedded Linux builds: one shared layer store, "
                    "per-architecture docker-archive .zst files handed back as hard links.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the daemon in the foreground")
    serve.add_argument("--store", metavar="DIR", help="the layer store directory (default from the config)")
    serve.add_argument("--config", metavar="FILE", help="config file (default $FETCHD_CONFIG or /etc/fetchd/config.toml)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="after SIGTERM, seconds running jobs get to finish before they are "
                            "parked (default from the config: server.shutdown_grace, 20); keep it "
                            "under systemd's TimeoutStopSec")

    pull = sub.add_parser("pull", parents=[common],
                          help="fetch one platform of an image as a zstd docker-archive")
    pull.add_argument("reference", metavar="REFERENCE",
                      help="image, e.g. debian:bookworm, quay.io/x/y:1@sha256:..., docker://host/img;tag=T")
    which = pull.add_mutually_exclusive_group()
    which.add_argument("--arch", metavar="DEBIAN_ARCH", help="Debian architecture, e.g. armhf, arm64, i386")
    which.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="OCI platform, e.g. linux/arm/v7")
    pull.add_argument("--zstd-level", type=int, default=3, metavar="N", help="zstd level 1-19 (default 3)")
    pull.add_argument("--tag", metavar="NAME:TAG", help="name:tag written into RepoTags (default: the reference's)")
    pull.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="where to put the .zst file")
    pull.add_argument("--offline", action="store_true", help="use only the store and the tag cache")
    pull.add_argument("--json", action="store_true", help="print the result as JSON")

    resolve = sub.add_parser("resolve", parents=[common], help="tag -> digest")
    resolve.add_argument("reference", metavar="REFERENCE")
    resolve.add_argument("--offline", action="store_true", help="answer from the tag cache only")
    resolve.add_argument("--json", action="store_true")

    deliver = sub.add_parser("deliver", parents=[common], help="place an archive the daemon has at OUTPUT")
    deliver.add_argument("archive_digest", metavar="DIGEST")
    deliver.add_argument("-o", "--output", required=True, metavar="OUTPUT")
    deliver.add_argument("--json", action="store_true")

    for name, text in (("status", "jobs, store usage, registry counters"),
                       ("ls", "images in the store"),
                       ("verify", "re-hash every blob of the store")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    gc = sub.add_parser("gc", parents=[common], help="remove unused blobs")
    gc.add_argument("--max-size", metavar="SIZE", help="shrink the store to at most SIZE (e.g. 10G)")
    gc.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        _say(f"fetchd {__version__}")
        return 0
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        return _serve(args)
    _ensure_client_importable()
    from fetchd_client import DaemonUnreachable, FetchdClientError

    try:
        return _COMMANDS[args.command](args)
    except DaemonUnreachable as e:
        _fail(e.message)
        return EXIT_UNREACHABLE
    except FetchdClientError as e:
        _fail(_with_hint(e.code, e.message, args.command))
        # also a daemon that went away mid-request and did not come back in time
        return EXIT_UNREACHABLE if e.code == "daemon-unreachable" else EXIT_ERROR
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as e:  # reading OUTPUT back to verify it, for example
        _fail(_os_error(e))
        return EXIT_ERROR


def _ensure_client_importable() -> None:
    """Running from a source checkout: the client library sits beside the package."""
    try:
        import fetchd_client  # noqa: F401
    except ImportError:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "client")
        if os.path.isdir(os.path.join(here, "fetchd_client")):
            sys.path.append(here)


def _say(*values: object, file: TextIO | None = None) -> None:
    """print(), with control characters escaped: the daemon's answers carry registry text
    (error messages, names), and an ESC or OSC sequence in them must not reach the terminal."""
    print(*(printable(str(v)) for v in values), file=file)


def _fail(message: str) -> None:
    _say(f"fetchd: error: {message}", file=sys.stderr)


_HINTS = {
    "platform-not-found": "choose one of the platforms the image offers (see 'skopeo inspect --raw')",
    "network-disabled": "run once without --offline (with network access) to fill the store",
    "permission-refused": "choose an OUTPUT in a directory you may write",
    "rate-limited": "wait, or configure a mirror or credentials for that registry",
}


_STORE_WIDE = ("gc", "verify")  # their permission-refused is about who may, not about OUTPUT


def _with_hint(code: str, message: str, command: str | None = None) -> str:
    hint = None if code == "permission-refused" and command in _STORE_WIDE else _HINTS.get(code)
    if hint and hint not in message:
        return f"{message} ({hint})"
    return message


def _printed_as_json(args: argparse.Namespace, answer: Any) -> bool:
    """With ``--json``, print ``answer`` as the daemon gave it and say so."""
    if args.json:
        # Not through _say: its escaping would break the JSON's own line breaks, and json.dumps
        # (ASCII only) already escapes every control, C1 and bidi character inside strings.
        print(json.dumps(answer, indent=2, sort_keys=True, ensure_ascii=True))
    return bool(args.json)


def _client(args: argparse.Namespace) -> Any:
    from fetchd_client import Client

    return Client(args.socket)


# -- serve ----------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from .config import Config
    from .errors import FetchdError

    _setup_logging(args.log_level)
    limit_malloc_arenas()
    try:
        from .server import serve, with_overrides

        if args.shutdown_grace is not None and not args.shutdown_grace >= 0:
            _fail(f"--shutdown-grace {args.shutdown_grace}: give seconds >= 0")
            return EXIT_USAGE
        config = with_overrides(Config.load(args.config), socket_path=args.socket, store=args.store,
                                shutdown_grace=args.shutdown_grace)
        tune_garbage_collector()
        asyncio.run(serve(config))
    except FetchdError as e:
        _fail(e.message)
        return EXIT_ERROR
    except OSError as e:  # e.g. a store or socket directory this user may not create
        _fail(f"cannot start the daemon: {_os_error(e)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
    return 0


GC_YOUNG_THRESHOLD = 10_000  # allocations between two collections of the youngest objects


def tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector's pauses on the event loop short.

    A full collection scans every tracked object and runs in whichever thread allocates
    when it is due, mostly the event loop's. In a 1000-layer pull (issue 14) one took ~25 ms
    of the loop, however little garbage there was, and the default young threshold (700)
    made it due every ~70k allocations. So: the objects of the daemon's start (modules,
    classes, functions, most of them aiohttp's and the standard library's) are frozen (they
    live as long as the process; a collection scans only what the daemon made since: jobs,
    tasks, connections), and the youngest generation is collected every ``GC_YOUNG_THRESHOLD``
    allocations, so full collections come ~14 times less often (young collections of 10k
    objects take ~1-2 ms). Garbage in cycles lives a little longer: a few MB at most.
    """
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the daemon; True if applied.

    glibc gives a thread that contends for malloc an arena of its own (up to 8 per core) and
    seldom returns their free memory. The daemon's worker threads (pack, hashing, ingest
    writes) left 30-40 MB of peak RSS there on the benchmarks' all-platforms request; two
    arenas cost no measurable speed. Call it before the threads start. An explicit
    ``MALLOC_ARENA_MAX`` in the environment is the user's choice and is left alone; on
    another C library this does nothing.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"


def _setup_logging(level: str) -> None:
    import logging

    class OneLine(logging.Formatter):
        """One event, one line: a traceback or a multi-line message is folded with `` | ``."""

        def format(self, record: logging.LogRecord) -> str:
            # One line per event, and no terminal control sequence from anything logged (a
            # registry's text inside an exception, a header): escaped, not obeyed.
            return " | ".join(printable(line) for line in super().format(record).splitlines()
                              if line.strip())

    # Under systemd the journal stamps the time itself.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# -- pull -----------------------------------------------------------------------------------------


def _pull(args: argparse.Namespace) -> int:
    from fetchd_client import FetchdClientError, verify_file

    output = os.path.abspath(args.output)
    progress = Progress(sys.stderr) if sys.stderr.isatty() else None
    try:
        result = _client(args).fetch(
            args.reference,
            platform=args.platform,
            arch=args.arch,
            level=args.zstd_level,
            repo_tag=args.tag,
            dest=output,
            offline=args.offline,
            on_event=progress.on_event if progress else _warnings_only,
        )
    finally:
        if progress:
            progress.close()
    # Exit 0 only for a complete, verified OUTPUT: hash what is actually there.
    size = os.stat(output).st_size
    if size != result.get("size"):
        raise FetchdClientError("size-mismatch", f"{output} has {size} bytes, expected {result.get('size')}")
    verify_file(output, str(result["archive_digest"]))
    if not _printed_as_json(args, result):
        _say(f"{output}: {result['repo_tag']} {result['platform']} "
              f"{_human(int(result['size']))} ({result['delivery']}) {result['archive_digest']}")
    return 0


def _warnings_only(event: dict[str, Any]) -> None:
    if event.get("event") == "warning":
        _say(f"fetchd: warning: {event.get('message')}", file=sys.stderr)
    elif event.get("event") == "reconnect":  # the daemon restarted: "daemon restarted, resuming"
        _say(f"fetchd: {event.get('message')}", file=sys.stderr)


class Progress:
    """Per-layer and total progress bars (bytes, rate, ETA) redrawn in place on a terminal."""

    def __init__(self, stream: TextIO, interval: float = 0.2) -> None:
        self.stream = stream
        self.interval = interval
        self.layers: dict[str, dict[str, Any]] = {}
        self.status = "resolving"
        self.started = time.monotonic()
        self._drawn = 0
        self._last = 0.0
        self.packed: dict[str, int] = {}
        self.pack_started: float | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "warning":
            self._clear()
            _say(f"fetchd: warning: {event.get('message')}", file=self.stream)
        elif kind == "reconnect":
            self._clear()
            _say(f"fetchd: {event.get('message')}", file=self.stream)
            self.status = "waiting for the daemon" if event.get("state") == "lost" else "resuming"
        elif kind == "manifest":
            self.status = f"{event.get('platform')}: {event.get('layers')} layers"
        elif kind == "layer":
            digest = str(event.get("digest"))
            layer = self.layers.setdefault(digest, {"bytes": 0, "total": int(event.get("size") or 0),
                                                    "t0": time.monotonic(), "b0": 0})
            layer["state"] = event.get("state")
            if event.get("state") in ("done", "cached", "frame-cached"):
                layer["bytes"] = layer["total"]
            if event.get("state") in ("cached", "frame-cached"):
                layer["b0"] = layer["total"]  # nothing fetched: not part of the rate
        elif kind == "progress":
            digest = str(event.get("digest"))
            layer = self.layers.setdefault(digest, {"bytes": 0, "total": 0, "t0": time.monotonic(),
                                                    "state": "downloading"})
            if "b0" not in layer:
                layer["b0"] = int(event.get("bytes") or 0)
            layer["bytes"] = int(event.get("bytes") or 0)
            layer["total"] = int(event.get("total") or layer["total"])
        elif kind == "pack":
            self._on_pack(event)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._draw()

    def _on_pack(self, event: dict[str, Any]) -> None:
        state = event.get("state")
        if self.pack_started is None:
            self.pack_started = time.monotonic()
        if state in ("layer-progress", "layer-done") and isinstance(event.get("bytes"), int):
            self.packed[str(event.get("diff_id"))] = event["bytes"]
        if state == "done":
            self.status = "packed"
            return
        done = sum(self.packed.values())
        elapsed = time.monotonic() - self.pack_started
        rate = f", {_human(int(done / elapsed))}/s" if elapsed > 0 and done else ""
        self.status = f"packing: {_human(done)} of layers compressed{rate}"

    def _lines(self) -> list[str]:
        now = time.monotonic()
        lines = []
        done = total = fetched_all = 0
        for digest, layer in self.layers.items():
            done += layer["bytes"]
            total += layer["total"]
            fetched_all += layer["bytes"] - layer.get("b0", 0)
            state = layer.get("state") or ""
            if state in ("cached", "frame-cached"):
                lines.append(f"  {digest[7:19]}  {'cached':>42}")
                continue
            fetched = layer["bytes"] - layer.get("b0", 0)
            lines.append(f"  {digest[7:19]}  " + _bar(layer["bytes"], layer["total"], fetched,
                                                        now - layer["t0"]))
        head = f"fetchd: {self.status}"
        lines.append(f"  {'total':12}  " + _bar(done, total, fetched_all, now - self.started)
                     if self.layers else "")
        return [head, *[line for line in lines if line]]

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        lines = self._lines()
        self._clear()
        self.stream.write("\n".join(printable(line) for line in lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)

    def close(self) -> None:
        self._draw()


def _bar(done: int, total: int, fetched: int, elapsed: float, width: int = 20) -> str:
    share = min(1.0, done / total) if total else 0.0
    filled = int(share * width)
    rate = fetched / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 and total > done else 0.0
    return (f"[{'#' * filled}{'.' * (width - filled)}] {_human(done):>9} / {_human(total):<9} "
            f"{_human(int(rate)):>9}/s  ETA {_duration(eta)}")


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    """``m:ss`` under an hour, else ``h h mm min`` or ``d d h h`` (uptimes, ETAs, ages)."""
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -- the small commands ---------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> int:
    result = _client(args).resolve(args.reference, offline=args.offline)
    if not _printed_as_json(args, result):
        _say(f"{result['digest']}{' (cached)' if result.get('cached') else ''}")
    return 0


def _deliver(args: argparse.Namespace) -> int:
    from fetchd_client import verify_file

    output = os.path.abspath(args.output)
    result = _client(args).deliver(args.archive_digest, output)
    verify_file(output, args.archive_digest)
    if not _printed_as_json(args, result):
        _say(f"{output}: {args.archive_digest} ({result.get('delivery')})")
    return 0


def _status(args: argparse.Namespace) -> int:
    status = _client(args).status()
    if _printed_as_json(args, status):
        return 0
    _say(f"fetchd {status.get('version')} pid {status.get('pid')} on {status.get('socket')}, "
          f"up {_duration(float(status.get('uptime') or 0))}, store {status.get('store_path')}")
    lag = status.get("loop_lag")
    if isinstance(lag, dict):
        _say(f"event loop lag: max {lag.get('max_ms')} ms, p99 {lag.get('p99_ms')} ms over the "
             f"last {lag.get('window_s'):g} s")
    jobs = status.get("jobs") or []
    _say(f"jobs: {len(jobs)} running, {status.get('completed')} completed, {status.get('failed')} failed")
    for job in jobs:
        _say(f"  {job.get('reference')} {job.get('platform')} level {job.get('level')}: "
              f"{job.get('state')} ({job.get('waiters')} waiting)")
    _say("store:")
    _print_mapping(status.get("store"), "  ")
    registries = status.get("registries")
    if registries:
        _say("registries:")
        _print_mapping(registries, "  ")
    fleet = status.get("fleet")
    if fleet:
        _say("fleet frame cache:")
        _print_mapping(fleet, "  ")
    return 0


def _print_mapping(obj: Any, indent: str) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, dict):
                _say(f"{indent}{key}:")
                _print_mapping(value, indent + "  ")
            else:
                shown = _human(value) if _is_size(key, value) else value
                _say(f"{indent}{key}: {shown}")
    elif obj is not None:
        _say(f"{indent}{obj}")


def _is_size(key: str, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (
        key.endswith("bytes") or key.endswith("size"))


def _ls(args: argparse.Namespace) -> int:
    answer = _client(args).ls()
    images = answer.get("images") or []
    if _printed_as_json(args, answer):
        return 0
    store = answer.get("store")
    if isinstance(store, dict) and isinstance(store.get("bytes"), int):
        _say(f"store: {store.get('blobs')} blobs, {_human(store['bytes'])}")
    if not images:
        _say("no images in the store")
        return 0
    now = time.time()
    for image in images:
        if not isinstance(image, dict):
            _say(image)
            continue
        size = image.get("size")
        parts = [str(image.get(k)) for k in ("reference", "platform") if image.get(k) is not None]
        if image.get("level") is not None:
            parts.append(f"zstd-{image['level']}")
        if isinstance(size, int):
            parts.append(_human(size))
        elif image.get("present") is False:
            parts.append("(collected)")
        last_used = image.get("last_used")
        if isinstance(last_used, (int, float)):
            parts.append(f"used {_duration(max(0.0, now - last_used))} ago")
        digest = image.get("archive_digest") or image.get("archive")
        if digest:
            parts.append(str(digest))
        _say("  ".join(parts) if parts else json.dumps(image, sort_keys=True))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from fetchd_client import parse_size

    max_size = parse_size(args.max_size) if args.max_size else None
    report = _client(args).gc(max_size)
    if not _printed_as_json(args, report):
        _print_mapping(report, "")
    return 0


def _verify(args: argparse.Namespace) -> int:
    report = _client(args).verify()
    if not _printed_as_json(args, report):
        _print_mapping(report, "")
    corrupt = report.get("corrupt") if isinstance(report, dict) else None
    if corrupt:
        _fail(f"{len(corrupt)} corrupt blob(s) moved to quarantine; they are fetched again when "
              "next needed (check the disk: files under blobs/ are read-only)")
        return EXIT_ERROR
    return 0


_COMMANDS = {
    "pull": _pull,
    "resolve": _resolve,
    "deliver": _deliver,
    "status": _status,
    "ls": _ls,
    "gc": _gc,
    "verify": _verify,
}
