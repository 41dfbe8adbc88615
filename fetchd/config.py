"""fetchd's configuration: one optional TOML file turned into frozen values.

Every setting has a default, so no file is needed. Where the file comes from:
``--config`` (the ``path`` argument), else ``$FETCHD_CONFIG``, else
``/etc/fetchd/config.toml``. A missing default file is fine; a missing file
that was named explicitly is an error. Unknown keys are errors naming the key,
so a typo never silently falls back to a default.

Invariant: ``Config.load`` either returns a complete, validated ``Config`` or
raises ``ConfigError``. Nothing here touches the network.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

DEFAULT_CONFIG_PATH = "/etc/fetchd/config.toml"
DEFAULT_STORE_PATH = "/var/cache/fetchd"
DEFAULT_SOCKET_PATH = "/run/fetchd/fetchd.sock"

MiB = 1024 * 1024
MIN_LAYER_LIMIT = 64 * MiB  # any layer may expand this far, whatever its ratio

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


@dataclass(frozen=True)
class StoreConfig:
    path: str = DEFAULT_STORE_PATH
    max_size: int | None = None          # bytes; None means no limit (gc only on demand)
    high_watermark: float = 0.9          # gc starts when the store exceeds this share of max_size
    low_watermark: float = 0.7           # ... and removes unused blobs down to this share
    stale_ingest_age: float = 86400.0    # seconds after which an untouched partial download is removed
    # Bytes of idle partial downloads (failed or interrupted) one uid may leave in ingest/;
    # beyond it the oldest are removed. Partials count in max_size; gc reaps idle ones first.
    max_ingest_per_uid: int = 16 * 1024**3
    # Downloads with files open at once (a lock and a .part each); the others wait without
    # any. More than the connections of all registry hosts gains nothing.
    max_open_ingests: int = 32


@dataclass(frozen=True)
class ServerConfig:
    socket: str = DEFAULT_SOCKET_PATH
    socket_mode: int = 0o660
    socket_group: str | None = None
    # Jobs that talk to registries at once (a job takes its slot before its first registry
    # request and keeps it to its end). Not a CPU knob: downloads are bounded by
    # network.max_connections per host and compressions by the daemon's CompressionBudget,
    # so this only keeps a burst of distinct requests from holding unbounded state.
    max_jobs: int = 32
    # Seconds that running jobs get to finish after SIGTERM before they are parked (their
    # partial downloads kept for the next daemon). Keep it well under systemd's
    # TimeoutStopSec (fetchd.service: 90 s), or systemd kills the daemon first.
    shutdown_grace: float = 20.0
    # ... of which one uid may hold at most this many; jobs answered from the store (offline,
    # fully cached) take no slot at all, so they never wait behind network work.
    max_jobs_per_uid: int = 16
    # Connections open at once (in total, and of one peer uid); the daemon keeps the total
    # below its file descriptor limit. reserved_connections more are admitted beyond the caps
    # for status, health and metrics only, so `fetchd status` answers while it is full.
    max_connections: int = 1024
    max_connections_per_uid: int = 128
    reserved_connections: int = 16
    # Clients streaming one job's progress at once (the rest get 503 and retry).
    max_waiters_per_job: int = 128
    # Progress events a job keeps for clients that join late (older ones are summarized).
    max_job_events: int = 4096
    # Layers an image may have; a longer layer list is refused before any per-layer work.
    max_layers: int = 4096
    # Members of this group (besides root and the daemon's own user) may run store-wide
    # operations: gc below the watermark policy, verify. None: nobody else.
    admin_group: str | None = None
    # A job (one client request) that makes no progress at all for this many seconds (no
    # byte downloaded, no layer compressed, no step done) fails, naming the registry it
    # waited on; a job waiting for a job slot is not stalled. 0: no deadline.
    job_stall_timeout: float = 900.0
    # The event loop's lag is sampled every this many seconds (status, /metrics): a timer
    # due then measures how late it runs. Shorter catches shorter stalls, at one callback
    # per sample (the benchmarks use 0.005).
    loop_lag_interval: float = 0.1


@dataclass(frozen=True)
class NetworkConfig:
    max_connections: int = 8             # per registry host, shared by every pull of the daemon
    # Blobs at least this big are fetched as parallel ranges: WAN links often cap each TCP
    # flow, so even a layer of a few MiB arrives faster on several connections.
    range_threshold: int = 4 * MiB
    range_parts: int = 8
    # ... except from a near host: one that answered within this many seconds (loopback, the
    # same LAN) and serves its blobs itself (no redirect to a CDN). A single TCP flow over
    # such a path is not window-limited, so more connections would not make a blob arrive
    # sooner; they would only cost the registry a request per piece (and this host CPU).
    # 0: parallel ranges for every host.
    near_latency: float = 0.010
    connect_timeout: float = 30.0
    read_timeout: float = 60.0           # between two reads of a body, not for the whole body
    # Progress deadline of every registry request: its response headers must come within
    # stall_timeout seconds, then its body must bring stall_bytes in every stall_timeout
    # seconds (a tarpit sending a byte now and then is cut off), else it counts as a failed
    # try (retried, then the error names the registry). 0: no deadline.
    stall_timeout: float = 60.0
    stall_bytes: int = 64 * 1024
    retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0
    tag_cache_ttl: float = 300.0
    max_blob_size: int = 64 * 1024 * MiB
    # A mirror that sends no response headers (or no body bytes) within this many seconds is
    # given up for that request: the next mirror or the upstream is asked instead.
    mirror_timeout: float = 5.0
    # After a connection failure or a timeout a mirror is skipped for this many seconds, so a
    # dead mirror costs one timeout per cooldown, not one per request.
    mirror_cooldown: float = 30.0
    # Extra whole transfers of a blob, manifest or config whose bytes failed their size or
    # digest check (from the registry itself; a mirror that did is skipped for that content
    # instead). Each is counted as ``corrupt`` and logged.
    corrupt_retries: int = 2


@dataclass(frozen=True)
class BasicCredentials:
    """A user name and password (or token). ``repr`` hides the secret."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MirrorConfig:
    url: str                              # scheme://host[:port][/prefix]; /v2/ is appended,
    #                                       unless the path has a /v2 segment: see repository_prefix
    digest_only: bool = False             # never ask this mirror for a tag
    # May hold a token (Authorization, X-Registry-Auth): kept out of repr like credentials.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    ns: bool = False                      # add ?ns=<upstream registry> (containerd's convention)
    insecure: bool = False                # allow plain HTTP and skip TLS certificate checks
    credentials: BasicCredentials | None = None
    timeout: float | None = None          # overrides network.mirror_timeout for this mirror
    # Parallel Range requests for big blobs. Off by default: a pull-through cache answering
    # Range requests for a blob it does not hold yet fetches it from its upstream once per
    # request (distribution 2.8: 3x the blob's size for one cold blob), and a LAN mirror's
    # single stream is fast anyway.
    ranges: bool = False

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def base(self) -> str:
        """``scheme://host[:port][/prefix]`` that ``/v2/...`` is appended to."""
        return self.url[: len(self.url) - len(self._v2_tail)] if self._v2_tail else self.url

    @property
    def repository_prefix(self) -> str:
        """Put in front of every repository: ``https://harbor/v2/hub-proxy`` -> ``hub-proxy``.

        A URL whose path contains a ``/v2`` segment names the API root itself (containerd's
        ``override_path``); what follows it prefixes repositories (Harbor's proxy-cache
        projects: ``/v2/<project>/library/debian/...``).
        """
        return self._v2_tail[len("/v2"):].strip("/")

    @property
    def _v2_tail(self) -> str:
        path = urlsplit(self.url).path
        index = f"{path}/".find("/v2/")
        return path[index:] if index >= 0 else ""


@dataclass(frozen=True)
class RegistryConfig:
    host: str
    insecure: bool = False
    auth_file: str | None = None
    mirrors: tuple[MirrorConfig, ...] = ()
    max_connections: int | None = None    # overrides network.max_connections for this host
    requests_per_second: float | None = None
    # Images from this registry may be private (pulled with the daemon's credentials): their
    # blobs and archives are kept 0400 in the store and handed back only as the caller's own
    # copy (mode 0600), never as a shared hard link or a store path. See docs/SECURITY.md.
    private: bool = False


@dataclass(frozen=True)
class PackConfig:
    """The ``[pack]`` bounds: what a layer may expand to when it is decompressed
    (decompression bombs), and how far a pack works ahead of its archive.

    A layer may expand to ``max_layer_ratio`` times its compressed size, and always to 64 MiB
    (tiny layers of empty files compress extremely well), but never beyond ``max_layer_size``.
    The decompression stops as soon as a layer passes its bound (``layer-too-large``).
    ``window``: see ``pack.window_size``.
    """

    max_layer_size: int = 64 * 1024 * MiB
    max_layer_ratio: float = 100.0
    # layers a pack works on ahead of its archive's write position (compressing, or finished
    # and held open until the archive reaches them); 0: 4 x the compression workers, >= 16
    window: int = 0

    def layer_limit(self, compressed_size: int) -> int:
        """The most bytes a layer of ``compressed_size`` bytes may expand to."""
        ratio = int(compressed_size * self.max_layer_ratio)
        return min(self.max_layer_size, max(MIN_LAYER_LIMIT, ratio))


@dataclass(frozen=True)
class FleetConfig:
    """The fleet's shared cache of layer frames: a repository in an OCI registry (off: None).

    ``frame_cache`` is ``http(s)://host[:port]/<repository>``; credentials come from the usual
    auth files for that host (or ``auth_file``). The cache is never trusted: every frame is
    verified in full before use (see ``frame_check``).
    """

    frame_cache: str | None = None
    push: bool = False                    # push the frames this host makes (needs push rights)
    insecure: bool = False                # allow plain HTTP and skip certificate checks
    auth_file: str | None = None
    timeout: float = 2.0                  # seconds for a lookup, and for each read of a frame
    cooldown: float = 30.0                # after a timeout or no connection: not asked for this long
    push_concurrency: int = 2             # frames uploaded at once
    push_bandwidth: int = 32 * MiB        # bytes/s for all uploads together; 0: no limit

    @property
    def host(self) -> str:
        return urlsplit(self.frame_cache or "").netloc

    @property
    def base(self) -> str:
        """``scheme://host[:port]`` that ``/v2/...`` is appended to."""
        parts = urlsplit(self.frame_cache or "")
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def repository(self) -> str:
        return urlsplit(self.frame_cache or "").path.strip("/")


@dataclass(frozen=True)
class Config:
    store: StoreConfig = StoreConfig()
    server: ServerConfig = ServerConfig()
    network: NetworkConfig = NetworkConfig()
    registries: tuple[RegistryConfig, ...] = ()
    source: str | None = None             # the file it was read from, for messages
    fleet: FleetConfig = FleetConfig()
    pack: PackConfig = PackConfig()

    @classmethod
    def load(cls, path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
        """Read the config file (see the module docstring for where it comes from)."""
        env = os.environ if env is None else env
        explicit = path or env.get("FETCHD_CONFIG") or None
        chosen = explicit or DEFAULT_CONFIG_PATH
        try:
            with open(chosen, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            if explicit:
                raise ConfigError(
                    f"config file {chosen} does not exist: create it or drop --config/FETCHD_CONFIG"
                ) from None
            return cls.from_dict({}, source=None, env=env)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {chosen} is not valid TOML: {e}") from e
        except OSError as e:
            raise ConfigError(f"cannot read config file {chosen}: {e.strerror}") from e
        return cls.from_dict(data, source=chosen, env=env)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str | None = None, env: Mapping[str, str] | None = None
    ) -> Config:
        env = os.environ if env is None else env
        where = source or "config"
        _check_keys(data, {"store", "server", "network", "registries", "fleet", "pack"}, where)
        store_data = dict(_table(data, "store", where))
        store_data.setdefault("path", env.get("FETCHD_STORE") or DEFAULT_STORE_PATH)
        server_data = dict(_table(data, "server", where))
        server_data.setdefault("socket", env.get("FETCHD_SOCKET") or DEFAULT_SOCKET_PATH)
        store = _build(StoreConfig, store_data, f"{where} [store]")
        server = _build(ServerConfig, server_data, f"{where} [server]")
        network = _build(NetworkConfig, _table(data, "network", where), f"{where} [network]")
        _validate(store, server, network, where)
        registries = tuple(
            _registry(host, value, where) for host, value in _table(data, "registries", where).items()
        )
        fleet = _fleet(_table(data, "fleet", where), f"{where} [fleet]")
        pack = _build(PackConfig, _table(data, "pack", where), f"{where} [pack]")
        if pack.max_layer_ratio < 1:
            raise ConfigError(f"{where} [pack] max_layer_ratio: must be at least 1")
        if pack.window < 0:
            raise ConfigError(f"{where} [pack] window: must be 0 (automatic) or a number of "
                              "layers")
        return cls(store, server, network, registries, source, fleet, pack)

    def registry(self, host: str) -> RegistryConfig:
        """Settings for ``host`` (``host[:port]`` as in the image reference); defaults if absent."""
        key = _normalize_host(host)
        for reg in self.registries:
            if _normalize_host(reg.host) == key:
                return reg
        return RegistryConfig(host=host)


def permission_warnings(config: Config, uid: int | None = None, gid: int | None = None) -> list[str]:
    """Why the config file's protection falls short, one sentence each (empty: it is fine).

    The file may hold mirror credentials and headers, and it decides where images come from:
    nobody but the daemon's user (``uid``, default: this process) and group, and root, may
    write it or its directory; nobody else may read it when it holds secrets. A world-readable
    file without secrets is fine (Debian installs /etc files 0644).
    """
    if config.source is None:
        return []
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    out = []
    secret = any(m.credentials is not None or m.headers
                 for reg in config.registries for m in reg.mirrors)
    path = os.path.abspath(config.source)
    for target, is_dir in ((path, False), (os.path.dirname(path), True)):
        try:
            st = os.stat(target)
        except OSError:
            continue
        what = f"the config directory {target}" if is_dir else f"the config file {target}"
        owners = {0, uid}
        if st.st_uid not in owners:
            out.append(f"{what} belongs to uid {st.st_uid}, who can change it")
        if st.st_mode & 0o002 and not (is_dir and st.st_mode & 0o1000):
            out.append(f"{what} is writable by every user")
        if st.st_mode & 0o020 and st.st_gid not in (0, gid):
            out.append(f"{what} is writable by group {st.st_gid}")
        if secret and not is_dir:
            if st.st_mode & 0o004:
                out.append(f"{what} holds mirror credentials or headers and every user may read it")
            elif st.st_mode & 0o040 and st.st_gid not in (0, gid):
                out.append(f"{what} holds mirror credentials or headers and group {st.st_gid} "
                           "may read it")
    return out


def parse_size(value: object, what: str) -> int:
    """``1048576``, ``"32MiB"``, ``"20G"``, ``"512k"`` -> bytes (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: size must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ConfigError(f"{what}: expected a size such as 1048576, '32MiB' or '20G', got {value!r}")


def _normalize_host(host: str) -> str:
    host = host.lower()
    return "docker.io" if host in ("registry-1.docker.io", "index.docker.io") else host


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must be a table")
    return value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r}; allowed here: {', '.join(sorted(allowed))}"
            )


_SIZE_FIELDS = {"max_size", "range_threshold", "max_blob_size", "stall_bytes", "push_bandwidth",
                "max_ingest_per_uid", "max_layer_size"}


def _build(cls: type[Any], data: Mapping[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    _check_keys(data, set(known), where)
    values: dict[str, Any] = {}
    for key, value in data.items():
        what = f"{where} {key}"
        default = getattr(cls(), key)
        if key in _SIZE_FIELDS:
            values[key] = parse_size(value, what)
        elif key == "socket_mode":
            values[key] = _mode(value, what)
        elif isinstance(default, bool):
            values[key] = _typed(value, bool, what)
        elif isinstance(default, int):
            values[key] = _typed(value, int, what)
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{what}: expected a number, got {value!r}")
            values[key] = float(value)
        else:
            values[key] = _typed(value, str, what)
    return cls(**values)


def _typed(value: object, kind: type[Any], what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def _mode(value: object, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3,4}", value):
        mode = int(value.replace("o", ""), 8)
    else:
        raise ConfigError(f"{what}: expected an octal mode such as \"0660\" or 0o660, got {value!r}")
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{what}: mode {mode:o} out of range")
    return mode


def _validate(store: StoreConfig, server: ServerConfig, net: NetworkConfig, where: str) -> None:
    if not 0 < store.low_watermark <= store.high_watermark <= 1:
        raise ConfigError(f"{where} [store]: need 0 < low_watermark <= high_watermark <= 1")
    if store.max_open_ingests < 1:
        raise ConfigError(f"{where} [store] max_open_ingests: must be at least 1")
    for name in ("max_jobs", "max_jobs_per_uid", "max_job_events", "max_layers", "max_connections",
                 "max_connections_per_uid", "max_waiters_per_job"):
        if getattr(server, name) < 1:
            raise ConfigError(f"{where} [server] {name}: must be at least 1")
    for name in ("max_connections", "range_parts"):
        if getattr(net, name) < 1:
            raise ConfigError(f"{where} [network] {name}: must be at least 1")
    if server.reserved_connections < 0:
        raise ConfigError(f"{where} [server] reserved_connections: must not be negative")
    if not 0.001 <= server.loop_lag_interval <= 60:
        raise ConfigError(f"{where} [server] loop_lag_interval: must be between 0.001 and 60 seconds")
    if server.job_stall_timeout < 0:
        raise ConfigError(f"{where} [server] job_stall_timeout: must not be negative")
    if net.mirror_timeout <= 0:
        raise ConfigError(f"{where} [network] mirror_timeout: must be positive")
    for name in ("retries", "corrupt_retries"):
        if getattr(net, name) < 0:
            raise ConfigError(f"{where} [network] {name}: must not be negative")
    if server.shutdown_grace < 0:
        raise ConfigError(f"{where} [server] shutdown_grace: must not be negative")
    for name in ("connect_timeout", "read_timeout", "backoff_base", "backoff_cap", "retry_after_cap",
                 "tag_cache_ttl", "mirror_cooldown", "near_latency", "stall_timeout"):
        if getattr(net, name) < 0:
            raise ConfigError(f"{where} [network] {name}: must not be negative")


def _registry(host: str, value: object, where: str) -> RegistryConfig:
    what = f'{where} [registries."{host}"]'
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: must be a table")
    if not host or "/" in host or any(c.isspace() for c in host):
        raise ConfigError(f"{what}: the key must be a registry host[:port], e.g. \"quay.io\"")
    _check_keys(value, {"insecure", "auth_file", "mirrors", "max_connections",
                        "requests_per_second", "private"}, what)
    mirrors_data = value.get("mirrors", [])
    if not isinstance(mirrors_data, list):
        raise ConfigError(f"{what} mirrors: expected a list of tables")
    max_conn = value.get("max_connections")
    if max_conn is not None and (_typed(max_conn, int, f"{what} max_connections") < 1):
        raise ConfigError(f"{what} max_connections: must be at least 1")
    rps = value.get("requests_per_second")
    if rps is not None and (isinstance(rps, bool) or not isinstance(rps, int | float) or rps <= 0):
        raise ConfigError(f"{what} requests_per_second: expected a positive number, got {rps!r}")
    auth_file = value.get("auth_file")
    return RegistryConfig(
        host=host,
        insecure=_typed(value.get("insecure", False), bool, f"{what} insecure"),
        auth_file=None if auth_file is None else _typed(auth_file, str, f"{what} auth_file"),
        mirrors=tuple(_mirror(m, f"{what} mirrors[{i}]") for i, m in enumerate(mirrors_data)),
        max_connections=max_conn,
        requests_per_second=None if rps is None else float(rps),
        private=_typed(value.get("private", False), bool, f"{what} private"),
    )


def _mirror(value: object, what: str) -> MirrorConfig:
    if isinstance(value, str):
        value = {"url": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: expected a table with at least url")
    _check_keys(value, {"url", "digest_only", "headers", "ns", "insecure", "credentials", "timeout",
                        "ranges"}, what)
    url = value.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{what}: 'url' is required, e.g. \"https://mirror.example.com\"")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{what} url {url!r}: expected http(s)://host[:port][/prefix]")
    if parts.username or parts.password:
        raise ConfigError(f"{what} url: put credentials in 'credentials', not in the URL")
    headers = value.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ConfigError(f"{what} headers: expected a table of strings")
    creds = value.get("credentials")
    credentials = None
    if creds is not None:
        if not isinstance(creds, dict):
            raise ConfigError(f"{what} credentials: expected {{username = ..., password = ...}}")
        _check_keys(creds, {"username", "password"}, f"{what} credentials")
        credentials = BasicCredentials(
            _typed(creds.get("username"), str, f"{what} credentials username"),
            _typed(creds.get("password", ""), str, f"{what} credentials password"),
        )
    timeout = value.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or timeout <= 0):
        raise ConfigError(f"{what} timeout: expected a positive number of seconds, got {timeout!r}")
    return MirrorConfig(
        url=url.rstrip("/"),
        digest_only=_typed(value.get("digest_only", False), bool, f"{what} digest_only"),
        headers=tuple(sorted(headers.items())),
        ns=_typed(value.get("ns", False), bool, f"{what} ns"),
        insecure=_typed(value.get("insecure", False), bool, f"{what} insecure"),
        credentials=credentials,
        timeout=None if timeout is None else float(timeout),
        ranges=_typed(value.get("ranges", False), bool, f"{what} ranges"),
    )


# A repository name as the distribution spec allows it: lowercase path components.
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


def _fleet(data: Mapping[str, Any], where: str) -> FleetConfig:
    fleet: FleetConfig = _build(FleetConfig, data, where)
    url = fleet.frame_cache
    if url is None:
        return fleet
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ConfigError(f"{where} frame_cache {url!r}: expected http(s)://host[:port]/<repository>, "
                          "e.g. \"https://cache.ci.example.com/fetchd-frames\"")
    if parts.username or parts.password:
        raise ConfigError(f"{where} frame_cache: no credentials in the URL; they come from the "
                          "auth files for that host (podman/docker login) or auth_file")
    repository = parts.path.strip("/")
    if not repository or not _REPOSITORY.match(repository) or len(repository) > 255:
        raise ConfigError(f"{where} frame_cache {url!r}: the path must name a repository "
                          "(lowercase, e.g. /fetchd-frames or /ci/fetchd-frames)")
    if fleet.timeout <= 0:
        raise ConfigError(f"{where} timeout: must be positive")
    if fleet.cooldown < 0:
        raise ConfigError(f"{where} cooldown: must not be negative")
    if fleet.push_concurrency < 1:
        raise ConfigError(f"{where} push_concurrency: must be at least 1")
    return fleet
