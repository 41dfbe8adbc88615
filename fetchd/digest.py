"""Content digests (``sha256:<hex>``) and streaming verification."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import DigestMismatch, InvalidReference, SizeMismatch

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"^[a-f0-9]+$")


@dataclass(frozen=True, order=True)
class Digest:
    """An OCI digest; ``str()`` round-trips through ``parse()``."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidReference(
                f"invalid digest {text!r}: expected 'sha256:<64 hex digits>'"
            )
        want = _ALGORITHMS.get(algorithm)
        if want is None:
            raise InvalidReference(
                f"invalid digest {text!r}: unsupported algorithm {algorithm!r}, use sha256"
            )
        if len(hexpart) != want or not _HEX.match(hexpart):
            raise InvalidReference(
                f"invalid digest {text!r}: expected {want} lowercase hex digits after '{algorithm}:'"
            )
        return cls(algorithm, hexpart)

    @classmethod
    def from_header(cls, text: str | None) -> Digest | None:
        """A digest a server named in a header (``Docker-Content-Digest``); None when there
        is none or it is malformed (a header is a claim to check, never an error)."""
        if not text:
            return None
        try:
            return cls.parse(text.strip())
        except InvalidReference:
            return None

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Verifier:
    """Hashes a stream of chunks and checks it against an expected digest and size.

    Invariant: ``check()`` passes only when exactly ``size`` bytes were fed and
    their hash equals ``digest``. ``feed()`` raises as soon as more than
    ``size`` bytes arrive, so an endless body is cut off early.
    """

    def __init__(self, digest: Digest, size: int | None, what: str = "blob") -> None:
        self.digest = digest
        self.size = size
        self.what = what
        self.count = 0
        self._hash = digest.hasher()

    def feed(self, chunk: bytes | memoryview) -> None:
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise SizeMismatch(
                f"{self.what} {self.digest}: more than the expected {self.size} bytes received"
            )
        self._hash.update(chunk)

    def actual(self) -> Digest:
        return Digest(self.digest.algorithm, self._hash.hexdigest())

    def check(self) -> None:
        if self.size is not None and self.count != self.size:
            raise SizeMismatch(
                f"{self.what} {self.digest}: expected {self.size} bytes, got {self.count}"
            )
        actual = self.actual()
        if actual != self.digest:
            raise DigestMismatch(
                f"{self.what} {self.digest}: content hashes to {actual}; "
                "the source served wrong bytes, nothing was kept"
            )


@dataclass(frozen=True)
class BlobSpan:
    """``length`` bytes at ``offset`` of the blob ``digest`` (e.g. a pack frame inside an
    archive, or a whole frame blob: offset 0, its size)."""

    digest: Digest
    offset: int
    length: int
