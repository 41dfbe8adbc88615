"""Table tests for platforms: every Debian architecture, parsing, and match ranking."""

from __future__ import annotations

import pytest

from fetchd.errors import InvalidPlatform
from fetchd.platform import DEBIAN_ARCHES, Platform, choose

DEBIAN = [
    ("amd64", "linux/amd64"),
    ("arm64", "linux/arm64/v8"),
    ("armhf", "linux/arm/v7"),
    ("armel", "linux/arm/v6"),
    ("i386", "linux/386"),
    ("mipsel", "linux/mipsle"),
    ("mips64el", "linux/mips64le"),
    ("ppc64el", "linux/ppc64le"),
    ("riscv64", "linux/riscv64"),
    ("s390x", "linux/s390x"),
    ("loong64", "linux/loong64"),
]


@pytest.mark.parametrize("arch,platform", DEBIAN)
def test_every_debian_arch_maps_to_its_oci_platform(arch: str, platform: str) -> None:
    assert str(Platform.from_debian(arch)) == platform
    assert Platform.from_user(arch) == Platform.from_debian(arch)


def test_the_table_covers_every_known_debian_arch() -> None:
    assert {a for a, _ in DEBIAN} == set(DEBIAN_ARCHES)


def test_unknown_debian_arch_lists_the_known_ones() -> None:
    with pytest.raises(InvalidPlatform, match="armhf"):
        Platform.from_debian("sparc64")


PARSE = [
    ("linux/amd64", Platform("linux", "amd64")),
    ("amd64", Platform("linux", "amd64")),
    ("linux/x86_64", Platform("linux", "amd64")),
    ("aarch64", Platform("linux", "arm64")),
    ("linux/arm64/v8", Platform("linux", "arm64", "v8")),
    ("linux/arm", Platform("linux", "arm", "v7")),
    ("linux/ARM/V6", Platform("linux", "arm", "v6")),
    ("windows/amd64", Platform("windows", "amd64")),
]


@pytest.mark.parametrize("text,want", PARSE)
def test_parse(text: str, want: Platform) -> None:
    assert Platform.parse(text) == want
    assert Platform.from_user(text) == want


@pytest.mark.parametrize("text", ["", "linux/", "/amd64", "a/b/c/d", "linux amd64", "linux//v7"])
def test_bad_platforms(text: str) -> None:
    with pytest.raises(InvalidPlatform):
        Platform.parse(text)


def P(text: str) -> Platform:
    os_name, arch, *variant = text.split("/")
    return Platform(os_name, arch, variant[0] if variant else None)


RANK = [
    # wanted, offered, index chosen (None: no match)
    ("linux/arm/v7", ["linux/arm/v6", "linux/arm/v7"], 1),
    ("linux/arm/v7", ["linux/arm/v5", "linux/arm/v6"], 1),       # v7 falls back to v6 first
    ("linux/arm/v7", ["linux/arm64/v8", "linux/amd64"], None),
    ("linux/arm/v6", ["linux/arm/v7"], None),                    # never upward
    ("linux/arm/v7", ["linux/arm"], 0),                          # no variant on arm means v7
    ("linux/arm64/v8", ["linux/arm64"], 0),                      # arm64 without variant
    ("linux/arm64/v8", ["linux/arm64", "linux/arm64/v8"], 1),    # exact variant preferred
    ("linux/arm64", ["linux/arm64/v8"], 0),
    ("linux/arm64/v8", ["linux/arm64/v9"], None),
    ("linux/amd64", ["linux/amd64/v3", "linux/amd64"], 1),       # plain preferred
    ("linux/amd64", ["unknown/unknown", "linux/amd64"], 1),      # attestations never match
    ("linux/386", ["linux/amd64"], None),
    ("linux/amd64", ["windows/amd64"], None),
]


@pytest.mark.parametrize("want,offered,chosen", RANK)
def test_choose(want: str, offered: list[str], chosen: int | None) -> None:
    assert choose(P(want), [P(o) for o in offered]) == chosen


def test_choose_skips_missing_platforms() -> None:
    assert choose(P("linux/amd64"), [None, P("linux/amd64")]) == 1
