"""The benchmark harness runs end to end on tiny images, so it cannot rot unnoticed.

Asserts structure and correctness only (both sides produce valid, identical .zst archives,
bytes are counted, targets are evaluated), never timings: benchmarks live in bench/.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
import zstandard

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/ and tests.support are imported from the repo root
    sys.path.insert(0, str(REPO))

from bench import run as bench_run  # noqa: E402
from bench.scenarios import check_archive  # noqa: E402
from bench.wanproxy import WanProxy  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (shutil.which("skopeo") and shutil.which("zstd") and Path("/usr/bin/docker-registry").exists()),
    reason="needs skopeo, zstd and docker-registry (scripts/setup.sh)",
)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    args = bench_run.parse_args(["--tiny", "--fanin", "3", "--no-components", "-q",
                                 "--workdir", str(tmp_path_factory.mktemp("bench"))])
    return bench_run.run(args)


def test_no_errors_and_every_scenario_has_both_sides(tiny_results: dict) -> None:
    assert tiny_results["errors"] == []
    rows = {(r["scenario"], r["network"]): r for r in tiny_results["scenarios"]}
    for net in ("loopback", "wan"):
        for scen in ("cold", "all", "shared", "level", "warm", "warm-small", "fanin-one", "fanin"):
            row = rows[(scen, net)]
            for side in ("fetchd", "seed"):
                assert row[side]["median_s"] > 0, (scen, net, side)
                assert len(row[side]["runs_s"]) == 1
            assert row["fetchd"]["peak_rss_mb"] > 0, "daemon memory not sampled"
            assert row["seed"]["peak_rss_mb"] > 0, "seed memory not measured"
            assert isinstance(row["ratio_seed"], float)
        # The seed fetches everything from the registry; the counting proxy must see it.
        assert rows[("cold", net)]["seed"]["registry_bytes"] >= rows[("cold", net)]["expect_registry_bytes"]
        # the fleet frame cache's second host: same archive, every frame a hit, no layer bytes
        a, b = rows[("second-host-a", net)], rows[("second-host", net)]
        assert b["fetchd"]["extra"]["same_archive_as_a"] is True
        assert b["fetchd"]["extra"]["fleet"]["hits"] >= 1
        assert b["fetchd"]["extra"]["fleet"]["misses"] == 0
        assert a["fetchd"]["extra"]["fleet"]["pushes"] == b["fetchd"]["extra"]["fleet"]["hits"]
        assert b["fetchd"]["registry_bytes"] < a["fetchd"]["registry_bytes"]
        assert isinstance(b["ratio_host_a"], float) and isinstance(b["cpu_ratio_host_a"], float)


def test_both_sides_write_valid_identical_archives(tiny_results: dict) -> None:
    checks = tiny_results["checks"]
    assert set(checks) == {"cold", "level", "shared", "all", "fanin"}
    for scen, c in checks.items():
        for side in ("fetchd", "seed"):
            assert c[side]["valid"], (scen, side, c[side]["errors"])
            assert c[side]["repo_tags"], (scen, side)
        assert c["identical_tar"], scen
    assert checks["all"]["seed"]["files"] == 5
    assert checks["fanin"]["fetchd"]["files"] == 3


def test_targets_and_floors_are_reported(tiny_results: dict) -> None:
    names = {t["target"] for t in tiny_results["targets"]}
    assert {"cold, loopback", "cold, WAN-like", "memory",
            "second host (fleet frame cache), loopback"} <= names
    assert all(t["met"] in (True, False) for t in tiny_results["targets"])
    assert tiny_results["floors"]["level"]["level"] == 9
    assert tiny_results["floors"]["cold"]["zst_bytes"] > 0
    # The fetchd side asks the registry for nothing when only the zstd level changes.
    level = [r for r in tiny_results["scenarios"] if r["scenario"] == "level"]
    assert all(r["fetchd"]["registry_bytes"] == 0 for r in level)


def test_markdown_renders_the_table(tiny_results: dict) -> None:
    from bench.report import render_markdown

    md = render_markdown(tiny_results)
    assert "| target | wanted | measured |" in md
    assert "1. cold" in md and "nproc" in md


def test_check_archive_rejects_a_broken_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b"not a tar at all" * 100))
    result = check_archive(bad)
    assert not result.ok and result.error


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = int((await r.readline()).decode())
        w.write(b"x" * n)
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_wanproxy_counts_the_bytes_it_relays() -> None:
    loop = asyncio.new_event_loop()
    server, port = loop.run_until_complete(_echo_server())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        with WanProxy(f"127.0.0.1:{port}", rate=50e6, delay=0.001) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as s:
                s.sendall(b"300000\n")
                got = b""
                while chunk := s.recv(65536):
                    got += chunk
            assert got == b"x" * 300000
            stats = proxy.reset()
            assert stats.bytes_down == 300000 and stats.bytes_up == 7 and stats.connections == 1
            assert proxy.stats().bytes_down == 0
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


# --------------------------------------------------------------------------- bench.scale


@pytest.fixture(scope="module")
def scale_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from bench import scale

    args = scale.parse_args(["--quick", "-q", "--workdir", str(tmp_path_factory.mktemp("scale"))])
    return scale.run(args)


def test_scale_quick_run_measures_every_curve_without_errors(scale_results: dict) -> None:
    from bench import scale

    assert scale_results["errors"] == []
    plan = scale.QUICK
    assert [p["images"] for p in scale_results["store"]] == list(plan.sizes)
    assert [p["clients"] for p in scale_results["clients"]] == list(plan.clients)
    assert [p["layers"] for p in scale_results["layers"]] == list(plan.layers)
    assert len(scale_results["bytes"]) == len(plan.bytes_tar)
    for p in scale_results["store"]:
        # what the daemon lists is what was pulled; each image is 1 manifest, 1 config,
        # 1 archive and 1..3 layer blobs (base and middle layers are shared)
        assert p["ls_images"] == p["images"] and p["fill_error_count"] == 0
        assert 4 * p["images"] <= p["blobs"] <= 6 * p["images"]
        assert p["warm_pull_ms"] > 0 and p["status_ms"] > 0 and p["ls_ms"] > 0
        assert 0 < p["startup_s"] and p["index_bytes"] > 0 and p["sqlite_fds"] >= 1
        assert p["verify_corrupt"] == 0 and p["verify_checked"] == p["blobs"]
        assert p["gc_removed"] > 0 and 0 < p["gc_freed_bytes"] <= p["store_bytes"]
        assert p["loop_lag_max_ms"] is not None and p["loop_lag_max_ms"] >= 0
    for section in ("clients", "layers", "bytes"):
        for p in scale_results[section]:
            assert p["errors"] == 0, p["error_samples"]
            assert p["seconds"] > 0 and p["peak_rss_mb"] > 0 and p["peak_fds"] > 0
            assert p["loop_lag_max_ms"] is not None
    for p in scale_results["bytes"]:
        assert p["tar_bytes"] > p["blob_bytes"] > 0 and p["floor_s"] > 0 and p["ratio_floor"] > 0


def test_scale_targets_and_tables_are_rendered(scale_results: dict, tmp_path: Path) -> None:
    from bench import scale

    names = {t["target"] for t in scale_results["targets"]}
    assert {"loop lag", "errors under concurrency", "time per GB of one huge layer",
            "cold time per layer", "descriptors vs layer count"} <= names
    assert all(t["met"] in (True, False) for t in scale_results["targets"])
    md = scale.render_tables(scale_results)
    for title in ("### Store size", "### Concurrent clients", "### Layers in one image",
                  "### One big layer", "### Targets"):
        assert title in md
    # one table row per measured point
    assert md.count("\n| 4 |") + md.count("\n| 12 |") >= 2
    out = tmp_path / "out"
    assert scale.main(["--quick", "-q", "--sections", "layers", "--out", str(out)]) == 0
    assert json.loads((out / "scale_results.json").read_text())["layers"]
    assert "### Layers in one image" in (out / "scale_tables.md").read_text()


def test_scale_refuses_an_unknown_section() -> None:
    from bench import scale

    with pytest.raises(SystemExit):
        scale.parse_args(["--sections", "store,nonsense"])


def test_starvation_stall_steps_run_and_report_their_targets() -> None:
    """The loop-stall steps of bench.starvation (quick: a 20 MB image, 3 refusals): every
    20000-layer manifest is refused with the layer-cap error, the cold pull downloads its
    layer, both steps carry the daemon's lag over the step and the health probe's figures,
    and both targets are evaluated (timings are the bench's business, not asserted)."""
    from bench import starvation

    result = starvation.run(True, lambda line: None, ("stall",))
    stall = result["stall"]
    assert stall["reject"]["answers"] == ["manifest-invalid"] * 3
    assert stall["manifest_layers"] == 20000 and stall["manifest_bytes"] > 1_000_000
    assert stall["cold_big"]["blobs_downloaded"] == 1
    for step in (stall["reject"], stall["cold_big"]):
        assert step["loop_lag_max_ms"] >= step["loop_lag_p99_ms"] >= 0
        assert step["loop_lag_samples"] >= 1
        assert step["health_samples"] >= 0 and step["health_errors"] == 0
    rows = {name: met for name, _, _, met in starvation.targets(result)}
    assert set(rows) == {"loop stall, 20000-layer manifest refused",
                         "loop stall, cold pull of the big image"}
    assert all(met in (True, False) for met in rows.values())
