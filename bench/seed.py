"""The seed pipeline: what Isar's ``docker://`` fetcher runs today (FACTS.md sections 1 and 8).

Per image and architecture, one after another:

1. ``skopeo copy --preserve-digests --override-arch A [--override-variant V] docker://REF dir:TMP``
2. ``skopeo copy dir:TMP docker-archive:TAR:NAME:TAG``
3. ``zstd -f --rm --threads=N -LEVEL TAR``

``--src-tls-verify=false`` is added because the benchmark registry is plain HTTP on loopback.
``NAME`` is given without the registry's ``host:port`` (upstream Isar keeps it, and skopeo then
fails on the colon: FACTS.md section 1 lists that defect; the benchmark measures speed, not it).

Peak memory comes from ``os.wait4``: the kernel's ``ru_maxrss`` of each child (the same value
``resource.getrusage(RUSAGE_CHILDREN)`` folds in), so it is exact and needs no polling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SKOPEO = "skopeo"
ZSTD = "zstd"


class SeedError(RuntimeError):
    """A command of the seed pipeline failed; the message has its stderr."""


@dataclass(frozen=True)
class StepResult:
    argv: tuple[str, ...]
    seconds: float
    maxrss_kb: int
    cpu_s: float


@dataclass(frozen=True)
class SeedResult:
    """One image x arch through the seed pipeline. ``output`` is the final ``.zst``."""

    output: Path
    seconds: float
    maxrss_kb: int
    steps: tuple[StepResult, ...]

    @property
    def cpu_s(self) -> float:
        return sum(s.cpu_s for s in self.steps)


def run_step(argv: Sequence[str], cwd: Path | None = None) -> StepResult:
    """Run one command to completion; its own peak RSS comes from ``wait4``."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()  # drain first: a full pipe would block the child
    proc.stderr.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SeedError(f"{' '.join(argv)} exited with {proc.returncode}: "
                        f"{err.decode(errors='replace')[-2000:]}")
    return StepResult(tuple(argv), seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime)


def oci_platform(arch: str) -> tuple[str, str | None]:
    """``arm/v7`` -> (``arm``, ``v7``); ``amd64`` -> (``amd64``, None)."""
    a, _, v = arch.partition("/")
    return a, (v or None)


def seed_pull(reference: str, arch: str, name_tag: str, workdir: Path, *, level: int = 3,
              threads: int | None = None, insecure: bool = True) -> SeedResult:
    """Run the three steps for ``reference`` (``host:port/repo:tag``) and one ``arch``.

    ``workdir`` is the DL_DIR stand-in: it must not hold a previous result (the pipeline
    shares nothing between runs, which is the behaviour being measured).
    Returns the path of ``<workdir>/<name>.tar.zst``.
    """
    threads = threads or os.cpu_count() or 1
    workdir.mkdir(parents=True, exist_ok=True)
    oci_arch, variant = oci_platform(arch)
    tmp = workdir / "dir"
    safe = name_tag.replace("/", ".").replace(":", "_")
    tar = workdir / f"{safe}.tar"
    copy1 = [SKOPEO, "copy", "--preserve-digests", "--override-arch", oci_arch]
    if variant:
        copy1 += ["--override-variant", variant]
    if insecure:
        copy1.append("--src-tls-verify=false")
    copy1 += [f"docker://{reference}", f"dir:{tmp}"]
    steps = [run_step(copy1)]
    steps.append(run_step([SKOPEO, "copy", f"dir:{tmp}", f"docker-archive:{tar}:{name_tag}"]))
    shutil.rmtree(tmp)  # Isar removes its temporary dir: the disk cost is part of the run
    steps.append(run_step([ZSTD, "-q", "-f", "--rm", f"--threads={threads}", f"-{level}", str(tar)]))
    out = tar.with_name(tar.name + ".zst")
    if not out.exists():
        raise SeedError(f"zstd did not produce {out}")
    return SeedResult(out, sum(s.seconds for s in steps), max(s.maxrss_kb for s in steps),
                      tuple(steps))


def seed_pull_all(reference: str, arches: Sequence[str], name_tag: str, workdir: Path, *,
                  level: int = 3, threads: int | None = None) -> list[SeedResult]:
    """One pipeline run per arch, one after another, as Isar does (no reuse between arches)."""
    return [seed_pull(reference, a, name_tag, workdir / a.replace("/", "_"), level=level,
                      threads=threads) for a in arches]
