"""When and how long to wait before trying a registry request again.

Pure: parses ``Retry-After`` and rate-limit headers and computes backoff delays.
The client owns the loop; this module only answers "retry?" and "how long?".
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# 408 Request Timeout, 429 Too Many Requests, and server errors are worth another try;
# 501 Not Implemented and 505 HTTP Version Not Supported never get better.
_NEVER_RETRY_5XX = frozenset({501, 505})


def retryable_status(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in _NEVER_RETRY_5XX)


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more tries after the first; delays grow as base * 2**n up to cap, with jitter."""

    retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0).

        A server's Retry-After wins over the backoff, but never beyond ``retry_after_cap``.
        Jitter ("equal jitter": half fixed, half random) keeps parallel layers from
        hammering a recovering registry in lockstep.
        """
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_cap))
        ceiling = min(self.backoff_cap, self.backoff_base * (2 ** min(attempt, 30)))
        return float(ceiling / 2 + random.uniform(0, ceiling / 2))


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def parse_ratelimit(value: str | None) -> int | None:
    """``ratelimit-remaining: 76;w=21600`` -> 76 (Docker Hub's header); None if absent/bad."""
    if not value:
        return None
    head = value.split(";", 1)[0].split(",", 1)[0].strip()
    return int(head) if head.isdigit() else None
