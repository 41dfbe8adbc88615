"""The TOML config: defaults without a file, every section, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fetchd.config import (
    DEFAULT_SOCKET_PATH,
    DEFAULT_STORE_PATH,
    BasicCredentials,
    Config,
    MirrorConfig,
    NetworkConfig,
    RegistryConfig,
    parse_size,
)
from fetchd.errors import ConfigError

FULL = """
[store]
path = "/srv/fetchd"
max_size = "20G"
high_watermark = 0.8
low_watermark = 0.5
stale_ingest_age = 3600

[server]
socket = "/tmp/f.sock"
socket_mode = "0600"
socket_group = "builders"
max_jobs = 2

[network]
max_connections = 4
range_threshold = "16MiB"
range_parts = 6
near_latency = 0.001
connect_timeout = 5
read_timeout = 20.5
retries = 3
backoff_base = 0.25
backoff_cap = 10
retry_after_cap = 30
tag_cache_ttl = 120

[registries."localhost:5000"]
insecure = true
auth_file = "/etc/fetchd/auth.json"
max_connections = 2
requests_per_second = 10

[[registries."docker.io".mirrors]]
url = "https://mirror.example.com/"
ns = true
headers = { X-Token = "abc" }
credentials = { username = "m", password = "pw" }

[[registries."docker.io".mirrors]]
url = "http://10.1.2.3:5000"
digest_only = true
insecure = true
"""


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return Config.load(str(path), env=env or {})


def test_no_file_gives_every_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fetchd.config.DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    config = Config.load(None, env={"FETCHD_CONFIG": ""})  # a missing default file is fine
    assert config.source is None
    assert config.store.path == DEFAULT_STORE_PATH
    assert config.server.socket == DEFAULT_SOCKET_PATH and config.server.socket_mode == 0o660
    assert config.server.max_jobs == 32  # not a CPU bound: the compression budget is
    assert config.network == NetworkConfig()
    assert config.network.max_connections == 8 and config.network.range_parts == 8
    assert config.network.range_threshold == 4 * 1024 * 1024
    assert config.registry("quay.io") == RegistryConfig(host="quay.io")


def test_environment_sets_the_store_and_socket_paths(tmp_path: Path) -> None:
    config = load(tmp_path, "", env={"FETCHD_STORE": "/s", "FETCHD_SOCKET": "/x.sock"})
    assert config.store.path == "/s" and config.server.socket == "/x.sock"
    config = load(tmp_path, '[store]\npath = "/file"\n', env={"FETCHD_STORE": "/s"})
    assert config.store.path == "/file"  # the file wins over the environment


def test_fetchd_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nmax_jobs = 7\n")
    assert Config.load(None, env={"FETCHD_CONFIG": str(path)}).server.max_jobs == 7


def test_full_file(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    assert config.store.path == "/srv/fetchd" and config.store.max_size == 20 * 1024**3
    assert (config.store.high_watermark, config.store.low_watermark) == (0.8, 0.5)
    assert config.server.socket_mode == 0o600 and config.server.socket_group == "builders"
    assert config.network.range_threshold == 16 * 1024 * 1024 and config.network.read_timeout == 20.5
    assert config.network.near_latency == 0.001
    assert config.network.connect_timeout == 5.0 and isinstance(config.network.connect_timeout, float)
    local = config.registry("localhost:5000")
    assert local.insecure and local.auth_file == "/etc/fetchd/auth.json"
    assert local.max_connections == 2 and local.requests_per_second == 10.0
    hub = config.registry("docker.io")
    assert hub.mirrors == (
        MirrorConfig(url="https://mirror.example.com", ns=True, headers=(("X-Token", "abc"),),
                     credentials=BasicCredentials("m", "pw")),
        MirrorConfig(url="http://10.1.2.3:5000", digest_only=True, insecure=True),
    )
    assert hub.mirrors[0].host == "mirror.example.com"
    assert config.registry("registry-1.docker.io") is hub
    assert "pw" not in repr(hub) and "abc" not in repr(config)  # header values may be tokens


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(None, env={"FETCHD_CONFIG": str(tmp_path / "nope.toml")})


BAD = [
    ("[stor]\n", "unknown key 'stor'"),
    ("[store]\nmax_sise = 1\n", "unknown key 'max_sise'"),
    ("[network]\nretries = 'five'\n", "retries: expected int"),
    ("[network]\nretries = true\n", "retries: expected int"),
    ("[network]\nmax_connections = 0\n", "max_connections: must be at least 1"),
    ("[network]\nrange_threshold = '12 parsecs'\n", "expected a size"),
    ("[network]\nconnect_timeout = -1\n", "connect_timeout: must not be negative"),
    ("[store]\nhigh_watermark = 0.5\nlow_watermark = 0.9\n", "low_watermark <= high_watermark"),
    ("[server]\nsocket_mode = 'rw'\n", "octal mode"),
    ('[registries."quay.io"]\ninsecur = true\n', "unknown key 'insecur'"),
    ('[registries."quay.io"]\ninsecure = "yes"\n', "insecure: expected bool"),
    ('[registries."quay.io"]\nrequests_per_second = 0\n', "positive number"),
    ('[[registries."quay.io".mirrors]]\nurl = "ftp://x"\n', "http"),
    ('[[registries."quay.io".mirrors]]\ndigest_only = true\n', "'url' is required"),
    ('[[registries."quay.io".mirrors]]\nurl = "https://u:p@m.io"\n', "credentials"),
    ('[[registries."quay.io".mirrors]]\nurl = "https://m.io"\nnss = true\n', "unknown key 'nss'"),
    ('[registries."a/b"]\n', "host"),
    ("[pack]\nmax_layer_ratio = 0.5\n", "max_layer_ratio: must be at least 1"),
    ("[server]\nloop_lag_interval = 0\n", "loop_lag_interval: must be between 0.001 and 60"),
    ("[pack]\nmax_layer_sise = '1G'\n", "unknown key 'max_layer_sise'"),
    ("[pack]\nmax_layer_size = 'huge'\n", "expected a size"),
    ("[pack]\nwindow = -1\n", "window: must be 0"),
    ("[pack]\nwindow = '8'\n", "expected int"),
    ("not toml = = 1", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load(tmp_path, text)
    assert str(tmp_path) in info.value.message  # the file is named


@pytest.mark.parametrize("value,size", [
    (0, 0), (1048576, 1048576), ("512", 512), ("512k", 512 * 1024), ("32MiB", 32 * 1024**2),
    ("20G", 20 * 1024**3), ("1.5GB", int(1.5 * 1024**3)), ("2t", 2 * 1024**4),
])
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value, "x") == size


@pytest.mark.parametrize("value", [-1, True, "ten", "5 XB", 1.5])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(value, "x")


def test_pack_bounds_how_far_a_layer_may_expand(tmp_path: Path) -> None:
    config = load(tmp_path, "[pack]\nmax_layer_size = '1G'\nmax_layer_ratio = 50\n")
    pack = config.pack
    assert (pack.max_layer_size, pack.max_layer_ratio) == (1 << 30, 50.0)
    assert pack.layer_limit(1000) == 64 << 20  # tiny layers may always expand to 64 MiB
    assert pack.layer_limit(10 << 20) == 500 << 20  # 50 times the compressed size ...
    assert pack.layer_limit(100 << 20) == 1 << 30  # ... never beyond max_layer_size
    assert Config.from_dict({}, env={}).pack.layer_limit(1 << 30) == 64 << 30  # the defaults


def test_pack_window_is_read(tmp_path: Path) -> None:
    assert load(tmp_path, "[pack]\nwindow = 8\n").pack.window == 8
    assert Config.from_dict({}, env={}).pack.window == 0  # automatic: see pack.window_size
