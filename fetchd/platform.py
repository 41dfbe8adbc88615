"""Platforms (``os/arch[/variant]``), Debian architecture names, and index matching.

Matching follows containers/image: ``arm/v7`` accepts v7, then v6, then v5;
``arm64`` accepts v8 or no variant; entries for ``unknown/unknown``
(BuildKit attestations) never match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidPlatform

# Debian architecture -> (OCI architecture, variant). FACTS.md section 1.
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

# Common aliases people type, normalized as containerd does.
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i686": "386"}

_ARM_FALLBACK = {"v8": ["v8", "v7", "v6", "v5"], "v7": ["v7", "v6", "v5"], "v6": ["v6", "v5"],
                 "v5": ["v5"]}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch[/variant]`` (``arch`` alone means linux/arch)."""
        if not text or any(c.isspace() for c in text):
            raise InvalidPlatform(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/arm/v7")
        parts = text.split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) > 3 or not all(parts):
            raise InvalidPlatform(f"invalid platform {text!r}: expected os/arch[/variant], e.g. linux/arm/v7")
        os_name, arch = parts[0].lower(), parts[1].lower()
        variant = parts[2].lower() if len(parts) == 3 else None
        arch = _ARCH_ALIASES.get(arch, arch)
        if arch == "arm" and variant is None:
            variant = "v7"
        return cls(os_name, arch, variant)

    @classmethod
    def from_debian(cls, arch: str) -> Platform:
        """Map a Debian architecture (PACKAGE_ARCH) to its OCI platform."""
        try:
            oci_arch, variant = DEBIAN_ARCHES[arch]
        except KeyError:
            known = ", ".join(sorted(DEBIAN_ARCHES))
            raise InvalidPlatform(
                f"unknown Debian architecture {arch!r}: known are {known}; "
                "or give an OCI platform such as linux/arm/v7"
            ) from None
        return cls("linux", oci_arch, variant)

    @classmethod
    def from_user(cls, text: str) -> Platform:
        """Accept either a Debian architecture name or ``os/arch[/variant]``."""
        if text in DEBIAN_ARCHES:
            return cls.from_debian(text)
        return cls.parse(text)

    @classmethod
    def from_json(cls, obj: object) -> Platform | None:
        if not isinstance(obj, dict):
            return None
        os_name, arch = obj.get("os"), obj.get("architecture")
        if not isinstance(os_name, str) or not isinstance(arch, str):
            return None
        variant = obj.get("variant")
        return cls(os_name, arch, variant if isinstance(variant, str) and variant else None)

    def accepts(self, other: Platform) -> int | None:
        """Rank ``other`` as a match for this wanted platform: 0 is best, None is no match."""
        if other.os != self.os or other.architecture != self.architecture:
            return None
        if other.os == "unknown" or other.architecture == "unknown":
            return None
        if self.architecture == "arm64":
            if other.variant in (None, "v8"):
                return 0 if other.variant == self.variant else 1
            return None
        if self.architecture == "arm":
            order = _ARM_FALLBACK.get(self.variant or "v7", [self.variant or "v7"])
            variant = other.variant or "v7"
            return order.index(variant) if variant in order else None
        if self.variant is None:
            return 0 if other.variant is None else 1
        return 0 if other.variant == self.variant else None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


def choose(want: Platform, candidates: Sequence[Platform | None]) -> int | None:
    """Index of the best candidate for ``want`` (first of the best rank), or None."""
    best: tuple[int, int] | None = None
    for i, candidate in enumerate(candidates):
        if candidate is None:
            continue
        rank = want.accepts(candidate)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, i)
    return None if best is None else best[1]
