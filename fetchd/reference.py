"""Image references, parsed and normalized as Docker does.

Accepted forms::

    [host[:port]/]path[:tag][@sha256:hex]          (Docker / OCI)
    docker://[host[:port]/]path[;tag=T][;digest=D]  (Isar's SRC_URI)

Normalization: no host -> ``docker.io``; a single path component on docker.io
-> ``library/<name>``. The first component is a host when it contains ``.`` or
``:`` or is ``localhost``. Parsing either returns a complete ``Reference`` or
raises ``InvalidReference``; there are no half-parsed values.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from .digest import Digest
from .errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
# Docker and skopeo write these as docker.io.
_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$"
)
_MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    """A normalized image reference. ``str()`` round-trips through ``parse()``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not isinstance(text, str) or not text:
            raise InvalidReference("empty image reference: give e.g. 'debian:bookworm'")
        if text.startswith("docker://"):
            return cls.parse_isar(text)
        if any(c.isspace() for c in text):
            raise InvalidReference(f"invalid image reference {text!r}: contains whitespace")
        rest, digest = text, None
        if "@" in rest:
            rest, _, digest_text = rest.partition("@")
            digest = _parse_digest(text, digest_text)
        name, tag = rest, None
        last = rest.rfind(":")
        if last > rest.rfind("/"):
            name, tag = rest[:last], rest[last + 1 :]
            _check_tag(text, tag)
        registry, repository = split_name(name, original=text)
        return cls(registry, repository, tag, digest)

    @classmethod
    def parse_isar(cls, url: str) -> Reference:
        """Parse Isar's ``docker://[host/]image[;tag=..][;digest=..]``; tag defaults to latest."""
        body = url[len("docker://") :] if url.startswith("docker://") else url
        name, *params = body.split(";")
        tag: str | None = None
        digest: Digest | None = None
        for param in params:
            if not param:
                continue
            key, eq, value = param.partition("=")
            if not eq:
                raise InvalidReference(f"invalid parameter {param!r} in {url!r}: expected key=value")
            if key == "tag":
                _check_tag(url, value)
                tag = value
            elif key == "digest":
                digest = _parse_digest(url, value)
            elif key in ("name", "protocol", "downloadfilename"):
                continue  # bitbake's own parameters
            else:
                raise InvalidReference(
                    f"unknown parameter {key!r} in {url!r}: docker:// URLs take tag= and digest="
                )
        if "@" in name or (":" in name.rsplit("/", 1)[-1] and "/" in name):
            raise InvalidReference(
                f"invalid docker:// URL {url!r}: give the tag as ';tag=T' and the digest as ';digest=D'"
            )
        registry, repository = split_name(name.rstrip("/"), original=url)
        return cls(registry, repository, tag or DEFAULT_TAG, digest)

    @property
    def name(self) -> str:
        """Fully qualified name, e.g. ``docker.io/library/debian``."""
        return f"{self.registry}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The host[:port] the registry API answers on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def tag_or_default(self) -> str:
        return self.tag or DEFAULT_TAG

    @property
    def target(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else self.tag_or_default

    def with_digest(self, digest: Digest | None) -> Reference:
        return replace(self, digest=digest)

    def with_tag(self, tag: str | None) -> Reference:
        return replace(self, tag=tag)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += ":" + self.tag
        if self.digest:
            text += "@" + str(self.digest)
        return text


def split_name(name: str, original: str | None = None) -> tuple[str, str]:
    """Split ``[host/]path`` into (registry, repository) with Docker's defaults."""
    shown = original if original is not None else name
    if not name:
        raise InvalidReference(f"invalid image reference {shown!r}: no image name")
    first, slash, remainder = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _HOST.match(registry):
            raise InvalidReference(f"invalid image reference {shown!r}: bad registry host {registry!r}")
        _check_host(shown, registry)
    else:
        registry, path = DOCKER_HUB, name
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not path:
        raise InvalidReference(f"invalid image reference {shown!r}: no repository after the host")
    if registry == DOCKER_HUB and "/" not in path:
        path = "library/" + path
    for component in path.split("/"):
        if not _COMPONENT.match(component):
            hint = " (repository names are lowercase)" if component.lower() != component else ""
            raise InvalidReference(
                f"invalid image reference {shown!r}: bad path component {component!r}{hint}"
            )
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise InvalidReference(f"invalid image reference {shown!r}: name longer than {_MAX_NAME}")
    return registry, path


def _check_host(shown: str, registry: str) -> None:
    """The port is 1..65535 and a bracketed host is an IPv6 address (the pattern admits more)."""
    m = re.fullmatch(r"(?P<host>\[[^\]]*\]|[^:]*)(?::(?P<port>[0-9]+))?", registry)
    host, port = (m["host"], m["port"]) if m else (registry, None)
    if port and not 1 <= int(port) <= 65535:
        raise InvalidReference(
            f"invalid image reference {shown!r}: port {port} of {registry!r} is not in 1..65535")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidReference(
                f"invalid image reference {shown!r}: {host} is not an IPv6 address") from None


def _check_tag(original: str, tag: str) -> None:
    if not _TAG.match(tag):
        raise InvalidReference(
            f"invalid image reference {original!r}: bad tag {tag!r} "
            "(letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')"
        )


def _parse_digest(original: str, text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidReference as e:
        raise InvalidReference(f"invalid image reference {original!r}: {e.message}") from e
