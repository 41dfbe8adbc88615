"""HTTP byte ranges for blob downloads: request headers, Content-Range checks, part splits.

Pure. Offsets are half-open ``[start, end)`` everywhere in fetchd; only the HTTP
header text uses HTTP's inclusive ``a-b``.
"""

from __future__ import annotations

import re

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


def range_header(start: int, end: int | None = None) -> str:
    """``Range`` value for ``[start, end)`` (``end`` None: to the end of the blob)."""
    return f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes a-b/size`` -> (a, b + 1, size or None); None when absent or malformed."""
    if not value:
        return None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None
    start, last = int(m.group(1)), int(m.group(2))
    if last < start:
        return None
    total = None if m.group(3) == "*" else int(m.group(3))
    return start, last + 1, total


def content_range_matches(value: str | None, start: int, end: int, size: int) -> bool:
    """True when a 206 answer covers exactly ``[start, end)`` of a blob of ``size`` bytes.

    A server may legally send less than asked (short range); that is accepted as long
    as it starts at ``start`` - the caller resumes for the rest.
    """
    parsed = parse_content_range(value)
    if parsed is None:
        return False
    got_start, got_end, total = parsed
    return got_start == start and start < got_end <= end and total in (None, size)


def split(start: int, end: int, parts: int, min_part: int = 1024 * 1024) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into at most ``parts`` contiguous pieces of at least ``min_part``.

    The pieces cover the span exactly, in order, without overlap.
    """
    length = end - start
    if length <= 0:
        return []
    count = max(1, min(parts, length // max(1, min_part)))
    step, extra = divmod(length, count)
    out: list[tuple[int, int]] = []
    pos = start
    for i in range(count):
        nxt = pos + step + (1 if i < extra else 0)
        out.append((pos, nxt))
        pos = nxt
    return out
