"""The few error kinds of fetchd, each with a stable machine code.

Errors are raised where the fact is known, with a message a person can act on
(what happened, which image/digest/registry, what to do next). They are
translated in exactly two places: the server's error middleware (to JSON
``{"code", "message"}`` plus an HTTP status) and the clients (to an exit code
and one line, or to bitbake's FetchError family).

Messages never contain credentials, tokens or URL userinfo, nor control characters: a
registry's error text reaches terminals and logs, so ``FetchdError`` escapes every control
character in its message (``printable``), whoever built it.
"""

from __future__ import annotations

import errno
import re

# C0, DEL, C1, and the bidirectional overrides/isolates that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character as a visible escape (``\\x1b``, ``\\n``, ``\\u202e``).

    For text from outside (a registry's error body, a header, a path) on its way to a terminal
    or a log: ESC/OSC sequences cannot recolour, retitle or rewrite what the reader sees.
    """
    return _CONTROL.sub(_escape, text)


def _escape(m: re.Match[str]) -> str:
    return m.group().encode("unicode_escape").decode("ascii")


class FetchdError(Exception):
    """Base of every error fetchd raises on purpose."""

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str) -> None:
        message = printable(message)
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidReference(FetchdError, ValueError):
    code = "invalid-reference"
    http_status = 400


class InvalidPlatform(FetchdError, ValueError):
    code = "invalid-platform"
    http_status = 400


class InvalidRequest(FetchdError, ValueError):
    code = "invalid-request"
    http_status = 400


class ConfigError(FetchdError, ValueError):
    code = "invalid-config"
    http_status = 500


class PlatformNotFound(FetchdError):
    code = "platform-not-found"
    http_status = 404


class NameUnknown(FetchdError):
    code = "name-unknown"
    http_status = 404


class ManifestUnknown(FetchdError):
    code = "manifest-unknown"
    http_status = 404


class BlobUnknown(FetchdError):
    code = "blob-unknown"
    http_status = 404


class UnsupportedManifest(FetchdError):
    code = "unsupported-manifest"
    http_status = 422


class ManifestInvalid(FetchdError):
    code = "manifest-invalid"
    http_status = 502


class DigestMismatch(FetchdError):
    code = "digest-mismatch"
    http_status = 502


class SizeMismatch(FetchdError):
    code = "size-mismatch"
    http_status = 502


class DiffIdMismatch(FetchdError):
    code = "diffid-mismatch"
    http_status = 502


class LayerTooLarge(FetchdError):
    """A layer expands beyond what the daemon allows (``[pack] max_layer_size`` and
    ``max_layer_ratio``): a decompression bomb, or a legitimately huge layer."""

    code = "layer-too-large"
    http_status = 422


class Unauthorized(FetchdError):
    code = "unauthorized"
    http_status = 502


class Denied(FetchdError):
    code = "denied"
    http_status = 502


class RateLimited(FetchdError):
    code = "rate-limited"
    http_status = 503


class RegistryError(FetchdError):
    """The registry failed in a way retries did not fix (5xx, cut connections, timeouts)."""

    code = "registry-error"
    http_status = 502


class RegistryStalled(RegistryError):
    """A registry (or a job waiting on one) made no progress within its deadline."""

    code = "registry-stalled"
    http_status = 504


class Overloaded(FetchdError):
    """A per-user or daemon-wide limit is reached (connections, clients of one job)."""

    code = "too-many-connections"
    http_status = 503


class InsecureRegistry(FetchdError):
    code = "insecure-registry"
    http_status = 502


class NetworkDisabled(FetchdError):
    """An offline request needed something that is not in the store or tag cache."""

    code = "network-disabled"
    http_status = 409


class StoreError(FetchdError):
    """The store cannot take a write (disk full, read-only, permissions)."""

    code = "store-error"
    http_status = 507


def store_error(exc: OSError, root: object, what: str) -> StoreError:
    """The StoreError for an OSError met writing the store at ``root``: names the store,
    the operation and the remedy (disk full, read-only, permissions)."""
    code = exc.errno or 0
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "the filesystem is full: free space, run `fetchd gc` or lower store.max_size"
    elif code == errno.EROFS:
        hint = "the filesystem is mounted read-only: remount it read-write or move the store"
    elif code in (errno.EACCES, errno.EPERM):
        hint = "permission denied: run fetchd as the store's owner or fix the ownership"
    else:
        hint = "check the disk and the kernel log"
    where = f" ({exc.filename})" if exc.filename else ""
    return StoreError(f"store {root}: cannot {what}{where}: {exc.strerror or exc}; {hint}")


class PermissionRefused(FetchdError):
    code = "permission-refused"
    http_status = 403


class CompressionLevelInvalid(FetchdError, ValueError):
    code = "invalid-level"
    http_status = 400


class ShuttingDown(FetchdError):
    code = "shutting-down"
    http_status = 503
