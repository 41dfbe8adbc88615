"""Turn a registry's failed answer into the fetchd error a person can act on.

The OCI distribution spec's error body is ``{"errors": [{"code", "message", "detail"}]}``;
it is read with a 64 KiB cap and used to pick the error kind and enrich the message.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Protocol

from .errors import (
    BlobUnknown,
    Denied,
    FetchdError,
    ManifestUnknown,
    NameUnknown,
    RateLimited,
    RegistryError,
    Unauthorized,
)
from .reference import Reference

MAX_ERROR_BODY = 64 * 1024


class _Content(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class _Response(Protocol):
    @property
    def status(self) -> int: ...

    @property
    def content(self) -> _Content: ...


async def read_capped(content: _Content, cap: int,
                      fed: Callable[[int], object] | None = None) -> bytes:
    """Read a body until EOF or ``cap`` bytes, whichever comes first (one read may be short);
    ``fed`` is told each chunk's size as it arrives (a progress deadline)."""
    parts: list[bytes] = []
    held = 0
    while held < cap:
        chunk = await content.read(cap - held)
        if not chunk:
            break
        if fed is not None:
            fed(len(chunk))
        parts.append(chunk)
        held += len(chunk)
    return b"".join(parts)


def parse_error_body(body: bytes) -> list[tuple[str, str]]:
    """(code, message) pairs of a registry error body; empty when it is not the spec's JSON."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return []
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return []
    out = []
    for item in errors:
        if isinstance(item, dict):
            code, message = item.get("code"), item.get("message")
            out.append((str(code or "").upper(), str(message or "")[:300]))
    return out


async def error_from_response(
    resp: _Response, source: str, ref: Reference, what: str, retry_after: float | None = None
) -> FetchdError:
    """The error for a non-success answer; ``source`` names the registry or mirror."""
    try:
        body = await read_capped(resp.content, MAX_ERROR_BODY)
    except Exception:  # noqa: BLE001 - the status alone still makes a useful error
        body = b""
    return error_for(resp.status, parse_error_body(body), source, ref, what, retry_after)


def error_for(
    status: int,
    errors: list[tuple[str, str]],
    source: str,
    ref: Reference,
    what: str,
    retry_after: float | None = None,
) -> FetchdError:
    codes = {code for code, _ in errors}
    said = "; ".join(f"{c}: {m}" if m else c for c, m in errors) or f"HTTP {status}"
    target = ref.target if what == "manifest" else "blob"
    if "NAME_UNKNOWN" in codes:
        return NameUnknown(
            f"{source}: repository {ref.repository} not found ({said}). Check the image name "
            f"{ref.name}; a private repository also answers this way without a login")
    if "MANIFEST_UNKNOWN" in codes or (status == 404 and what == "manifest"):
        return ManifestUnknown(
            f"{source}: {ref.name} has no manifest {target} ({said}). Check the tag or digest")
    if "BLOB_UNKNOWN" in codes or (status == 404 and what == "blob"):
        return BlobUnknown(
            f"{source}: {ref.name} is missing a blob it references ({said}). The image is "
            "incomplete in the registry; push it again or use another tag")
    if status == 401 or "UNAUTHORIZED" in codes:
        return Unauthorized(
            f"{source}: {what} of {ref.name} needs a login ({said}). Log in with 'podman login' "
            "or 'docker login', or set auth_file in the fetchd config")
    if status == 403 or "DENIED" in codes:
        return Denied(
            f"{source}: access to {ref.name} denied ({said}). The account lacks pull rights "
            "for this repository")
    if status == 429 or "TOOMANYREQUESTS" in codes:
        when = f" (the registry asked to wait {retry_after:.0f}s)" if retry_after else ""
        return RateLimited(
            f"{source}: rate limit reached for {ref.name}{when} ({said}). Wait, log in for a "
            "higher quota, or configure a mirror")
    if status == 404:
        return NameUnknown(f"{source}: {ref.name} not found ({said})")
    return RegistryError(
        f"{source}: {what} of {ref.name} failed: HTTP {status} ({said}); try again later")
