"""Names and values of Isar's ``docker://`` fetcher, computed without BitBake.

Pure functions (standard library only, Python >= 3.9) so they can be tested
without a datastore. Invariants:

- the WORKDIR file name is exactly Isar's ``<name with / -> .>:<tag>.zst``;
- the DL_DIR file name is exactly Isar's
  ``container-images/<arch>[/<variant>]/<name with / -> .>_<digest with : -> - | tag>.zst``
  at the default zstd level (3); any other level adds ``.level<N>`` before
  ``.zst``, so a level change is a different file and BitBake fetches again;
- the arch directory is Isar's ``ud.arch[/ud.variant]``: ``arm/v7`` and ``arm/v6``
  for armhf and armel, PACKAGE_ARCH itself otherwise (``i386``, ``ppc64el``, ...),
  so no two Debian architectures share a directory. Only the platform asked of
  the daemon uses the OCI name (i386 -> ``linux/386``), which is where Isar was
  wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TAG = "latest"
DEFAULT_LEVEL = 3
# The levels the daemon makes (fetchd.compress_budget.MIN_LEVEL/MAX_LEVEL; a test checks they are equal):
# zstd's --fast and --ultra levels beyond them are refused when the recipe is parsed.
MIN_LEVEL = 1
MAX_LEVEL = 19

# Debian architecture (PACKAGE_ARCH) -> (OCI architecture, variant). Must equal
# fetchd.platform.DEBIAN_ARCHES (a test checks it); duplicated because this
# layer runs in BitBake's python, where the fetchd package is not importable.
DEBIAN_ARCHES: dict[str, tuple[str, str | None]] = {
    "amd64": ("amd64", None),
    "arm64": ("arm64", "v8"),
    "armhf": ("arm", "v7"),
    "armel": ("arm", "v6"),
    "i386": ("386", None),
    "mipsel": ("mipsle", None),
    "mips64el": ("mips64le", None),
    "ppc64el": ("ppc64le", None),
    "riscv64": ("riscv64", None),
    "s390x": ("s390x", None),
    "loong64": ("loong64", None),
}

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

# zstd options that do not change the compressed bytes (threads never do with
# libzstd's multithreaded mode at threads >= 1, FACTS.md section 6).
_HARMLESS = {"-f", "--force", "--rm", "-k", "--keep", "-q", "--quiet", "-v", "--verbose",
             "--ultra", "--no-progress", "-c", "--stdout", "-z", "--compress"}


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture's files live and which platform the daemon is asked for."""

    package_arch: str
    arch: str                 # Isar's ud.arch (directory level 1): PACKAGE_ARCH, or arm
    variant: str | None       # Isar's ud.variant (directory level 2, armhf/armel only)
    platform: str             # linux/<oci arch>[/<variant>], for the daemon

    @property
    def directory(self) -> str:
        return self.arch + ("/" + self.variant if self.variant else "")


def arch_spec(package_arch: str) -> ArchSpec:
    """Map PACKAGE_ARCH to Isar's DL_DIR directory and the OCI platform.

    An unknown name is passed through as Isar does (OCI arch = the name itself);
    the daemon then says which platforms the image has.
    """
    if package_arch in ("armhf", "armel"):
        variant = "v7" if package_arch == "armhf" else "v6"
        return ArchSpec(package_arch, "arm", variant, "linux/arm/" + variant)
    oci_arch, oci_variant = DEBIAN_ARCHES.get(package_arch, (package_arch, None))
    platform = "linux/" + oci_arch + ("/" + oci_variant if oci_variant else "")
    return ArchSpec(package_arch, package_arch, None, platform)


def zstd_level(zstd_defaults: str | None, compression_level: str | None) -> tuple[int, list[str]]:
    """The compression level Isar's ``zstd $ZSTD_DEFAULTS`` would use, and the options ignored.

    ``ZSTD_DEFAULTS`` ("--threads=N -3") wins when it names a level, else
    ``ZSTD_COMPRESSION_LEVEL`` ("-3"), else zstd's default 3. Thread counts do
    not change the bytes and are dropped; options that would change the format
    (``--long``, ``--format=`` ...) cannot be honoured and are returned so the
    caller can warn.
    """
    level: int | None = None
    ignored: list[str] = []
    tokens = (zstd_defaults or "").split()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        parsed = _parse_level_token(tok)
        if parsed is not None:
            level = parsed
        elif tok in ("-T", "--threads"):
            i += 1  # the count follows
        elif re.match(r"^(-T\d+|--threads=\d+)$", tok) or tok in _HARMLESS:
            pass
        else:
            ignored.append(tok)
        i += 1
    if level is None:
        for tok in (compression_level or "").split():
            parsed = _parse_level_token(tok)
            if parsed is None and re.match(r"^-?\d+$", tok):
                parsed = abs(int(tok))
            if parsed is not None:
                level = parsed
            else:
                ignored.append(tok)
    if level is None:
        level = DEFAULT_LEVEL
    return check_level(level, "ZSTD_COMPRESSION_LEVEL / ZSTD_DEFAULTS"), ignored


def check_level(level: int, where: str) -> int:
    """``level`` if fetchd makes it, else ValueError naming ``where`` it came from."""
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(
            f"zstd level {level} is out of fetchd's range ({MIN_LEVEL}..{MAX_LEVEL}): "
            f"check {where}"
        )
    return level


def _parse_level_token(tok: str) -> int | None:
    m = re.match(r"^-(\d+)$", tok)
    if m:
        return int(m.group(1))
    if tok == "--fast":
        return -1
    m = re.match(r"^--fast=(\d+)$", tok)
    if m:
        return -int(m.group(1))
    return None


def container_name(host: str, path: str) -> str:
    """Isar's ud.container_name: bitbake puts the first component in host."""
    return host + (path if path != "/" else "")


def local_name(name: str) -> str:
    return name.replace("/", ".")


def localfile(name: str, tag: str, digest: str | None, arch: ArchSpec, level: int) -> str:
    """The file under DL_DIR (Isar's name at level 3, ``.level<N>`` before ``.zst`` otherwise)."""
    ident = digest.replace(":", "-") if digest else tag
    suffix = ".zst" if level == DEFAULT_LEVEL else f".level{level}.zst"
    return f"container-images/{arch.directory}/{local_name(name)}_{ident}{suffix}"


def workdir_name(name: str, tag: str) -> str:
    """The file in WORKDIR after unpack; Isar's container-loader recomputes it, keep it exact."""
    return f"{local_name(name)}:{tag}.zst"


def checksum_line(name: str, digest: str, tag: str | None) -> str:
    """A ready-to-paste SRC_URI line pinning ``name`` to ``digest`` (and ``tag`` when given)."""
    url = f"docker://{name};digest={digest}"
    if tag:
        url += f";tag={tag}"
    return f'SRC_URI = "{url}"'


def check_digest(text: str) -> bool:
    return bool(_DIGEST.match(text))


def check_tag(text: str) -> bool:
    return bool(_TAG.match(text))
