"""Render ``bench/results.json`` as Markdown for docs/BENCHMARKS.md (the generated block)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCENARIO_TITLES = {
    "cold": "1. cold: big image, level 3, one platform",
    "all": "2. all platforms (5), fetchd concurrent, seed one per arch",
    "shared": "3. shared layers: second image after the first",
    "level": "4. level change: same image at level 9",
    "warm": "5. warm: same request, fresh destination (big image)",
    "warm-small": "5b. warm, smaller image (shared-b)",
    "fanin-one": "6a. fan-in baseline: one request",
    "fanin": "6. fan-in: concurrent requests for the same image",
    "second-host-a": "7a. fleet frame cache, host A: big image cold, pushes its frames",
    "second-host": "7. fleet frame cache, host B: same request, frames from the cache",
}


def _mb(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _s(side: dict[str, Any] | None) -> str:
    if not side:
        return "-"
    v = side["median_s"]
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.2f} s"


def _cpu(d: dict[str, Any] | None) -> str:
    return "-" if not d or "cpu_s" not in d else f"{d['cpu_s']:.2f}"


def _met(m: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[m]


def render_markdown(r: dict[str, Any]) -> str:
    m, st = r["machine"], r["settings"]
    lines = [
        f"Measured {m['date']} at commit `{m['commit']}`: {st['runs']} run(s) of each scenario"
        f"{' (quick)' if st['quick'] else ''}{' on tiny images' if st['tiny'] else ''}; "
        f"medians; total bench time {r['total_s']:.0f} s.",
        "",
        f"Machine: `nproc` = {m['nproc']}, CPU {m['cpu_model'] or '?'}, RAM {m['ram_gib']} GiB, "
        f"Linux {m['kernel']}, Python {m['python']}, {m['skopeo']}, zstd {m['zstd']}. "
        f"Load average (1 min) at start {m.get('loadavg_start', ['?'])[0]}, at end "
        f"{m.get('loadavg_end', ['?'])[0]}: a load above `nproc` means other work shared the "
        "cores, which inflates wall times (CPU seconds are less sensitive to it).",
        "",
        f"WAN-like: each TCP connection capped at {st['wan']['rate_MBps_per_connection']:.0f} MB/s, "
        f"{st['wan']['delay_ms']:.0f} ms before the first byte of each response. "
        f"Fan-in: {st['fanin']} concurrent requests.",
        "",
        "### Targets",
        "",
        "| target | wanted | measured | |",
        "|---|---|---|---|",
    ]
    for t in r["targets"]:
        lines.append(f"| {t['target']} | {t['wanted']} | {t['measured']} | {_met(t['met'])} |")
    lines += [
        "",
        "### Scenarios",
        "",
        "Times are wall medians; the ratios are medians of each run's ratio (fetchd and seed, "
        "and the floor, are measured minutes apart within a run). Registry MB = bytes the registry served through the counting "
        "proxy (headers included). RSS: fetchd = daemon peak (VmHWM after a reset, and VmRSS "
        "of its process tree polled every 20 ms); seed = largest `ru_maxrss` of its processes.",
        "",
        "| scenario | network | fetchd | seed | fetchd/seed | floor | fetchd/floor "
        "| CPU s fetchd / seed / floor | registry MB fetchd / seed | peak RSS MB fetchd / seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    floors = r["floors"]
    for row in r["scenarios"]:
        f, s = row.get("fetchd"), row.get("seed")
        floor = row.get("floor_s")
        lines.append(
            f"| {SCENARIO_TITLES.get(row['scenario'], row['scenario'])} | {row['network']} "
            f"| {_s(f)} | {_s(s)}{'*' if s and s.get('note') else ''} "
            f"| {row.get('ratio_seed', '-')} | {'-' if floor is None else f'{floor:.2f} s'} "
            f"| {row.get('ratio_floor', '-')} "
            f"| {_cpu(f)} / {_cpu(s)} / {_cpu(floors.get(row['scenario']))} "
            f"| {_mb(f['registry_bytes']) if f else '-'} / {_mb(s['registry_bytes']) if s else '-'} "
            f"| {f['peak_rss_mb'] if f else '-'} / {s['peak_rss_mb'] if s else '-'} |")
    lines += [
        "",
        "\\* the seed pipeline has no cache: a request into a fresh destination is a full run, "
        "so its warm figures are its cold (resp. shared) runs.",
        "",
        "### Compute floor (in-process: isal gunzip + 2x sha256 + zstd, all cores)",
        "",
        "| scenario | blob MB | tar MB | zst MB | level | seconds | CPU s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, fl in r["floors"].items():
        if name == "fanin-one":
            continue
        lines.append(f"| {name} | {_mb(fl['blob_bytes'])} | {_mb(fl['tar_bytes'])} "
                     f"| {_mb(fl['zst_bytes'])} | {fl['level']} | {fl['seconds']:.2f} "
                     f"| {fl.get('cpu_s', 0):.2f} |")
    lines += ["", "### Images", "", "| image | platforms | blob MB | tar MB |", "|---|---|---|---|"]
    for name, im in r["images"].items():
        lines.append(f"| {name} | {im['platforms']} | {_mb(im['blob_bytes'])} | {_mb(im['tar_bytes'])} |")
    lines += _timelines(r)
    if r.get("checks"):
        lines += ["", "### Output checks (first run, first network)", "",
                  "| scenario | fetchd valid | seed valid | same tar bytes |", "|---|---|---|---|"]
        for scen, c in r["checks"].items():
            fv = c.get("fetchd", {}).get("valid", "-")
            sv = c.get("seed", {}).get("valid", "-")
            lines.append(f"| {scen} | {fv} | {sv} | {c.get('identical_tar', '-')} |")
    if r.get("errors"):
        lines += ["", "### Errors", ""] + [f"- `{e.splitlines()[0][:300]}`" for e in r["errors"]]
    if r.get("components"):
        lines += ["", "### Component micro-benchmarks", ""]
        for name, data in r["components"].items():
            lines.append(f"- `{name}`: see `bench/results.json` -> components.{name}"
                         + (f" (error: {data['error'][:200]})" if isinstance(data, dict)
                            and "error" in data else ""))
    return "\n".join(lines)


def _span(t: dict[str, Any], first: str, last: str) -> str:
    a, b = t.get(first), t.get(last)
    return "-" if not a or not b else f"{a[0]:.2f}-{b[1]:.2f}"


def _timelines(r: dict[str, Any]) -> list[str]:
    """Where fetchd's time goes: the client's view of the daemon's progress events."""
    out = ["", "### Where fetchd's time goes (median run, seconds since the request)", "",
           "| scenario | network | request | downloads (first start - last done) "
           "| pack (start - done) | total |", "|---|---|---|---|---|---|"]
    for row in r["scenarios"]:
        if row["scenario"] not in ("cold", "all", "level", "shared", "fanin-one"):
            continue
        for t in (row.get("fetchd") or {}).get("extra", {}).get("timeline", []):
            out.append(f"| {row['scenario']} | {row['network']} | {t.get('platform')} "
                       f"| {_span(t, 'layer:downloading', 'layer:done')} "
                       f"| {_span(t, 'pack:start', 'pack:done')} | {t.get('seconds')} |")
    return out


def write_doc(doc: Path, block: str, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` (append both when absent)."""
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{block}\n{end}{tail}"
    else:
        text = f"{text.rstrip()}\n\n## Latest results\n\n{begin}\n{block}\n{end}\n".lstrip()
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.report RESULTS.json``: put those results into bench/results.json and
    the generated block of docs/BENCHMARKS.md (e.g. a run made with ``--out``)."""
    import json
    import shutil
    import sys

    from bench.run import BEGIN, DOC, END, RESULTS

    args = sys.argv[1:] if argv is None else argv
    src = Path(args[0]) if args else RESULTS
    results = json.loads(src.read_text())
    if src.resolve() != RESULTS.resolve():
        shutil.copyfile(src, RESULTS)
    write_doc(DOC, render_markdown(results), BEGIN, END)
    print(f"{RESULTS} and {DOC} now hold the results of {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
