"""Tables for the pure helpers of the registry client: Retry-After, rate limits, backoff, ranges."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from fetchd.ranges import content_range_matches, parse_content_range, range_header, split
from fetchd.retry import RetryPolicy, parse_ratelimit, parse_retry_after, retryable_status

NOW = 1_700_000_000.0

RETRY_AFTER = [
    ("120", 120.0),
    (" 0 ", 0.0),
    (formatdate(NOW + 30, usegmt=True), 30.0),          # HTTP date, 30 s ahead
    ("Tue, 14 Nov 2023 22:14:00 GMT", 1_700_000_040 - NOW),
    (formatdate(NOW - 100, usegmt=True), 0.0),          # in the past: now
    ("soon", None),
    ("-5", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize("value,seconds", RETRY_AFTER)
def test_parse_retry_after_in_both_forms(value: str | None, seconds: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    assert got == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("value,remaining", [
    ("76;w=21600", 76), ("0;w=21600", 0), ("100", 100), ("", None), (None, None), ("x;w=1", None),
])
def test_parse_ratelimit(value: str | None, remaining: int | None) -> None:
    assert parse_ratelimit(value) == remaining


@pytest.mark.parametrize("status,retry", [
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True), (501, False),
    (505, False), (400, False), (401, False), (403, False), (404, False), (200, False),
])
def test_retryable_status(status: int, retry: bool) -> None:
    assert retryable_status(status) is retry


def test_backoff_grows_with_jitter_and_caps() -> None:
    policy = RetryPolicy(retries=5, backoff_base=1.0, backoff_cap=8.0, retry_after_cap=60.0)
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (4, 8), (4, 8)]):
        delays = {policy.delay(attempt) for _ in range(50)}
        assert all(low <= d <= high for d in delays) and len(delays) > 1
    assert policy.delay(0, retry_after=30) == 30
    assert policy.delay(0, retry_after=600) == 60  # capped


def test_range_header() -> None:
    assert range_header(100) == "bytes=100-"
    assert range_header(0, 1) == "bytes=0-0"
    assert range_header(10, 20) == "bytes=10-19"


@pytest.mark.parametrize("value,parsed", [
    ("bytes 0-99/1000", (0, 100, 1000)),
    ("bytes 500-999/*", (500, 1000, None)),
    ("BYTES 1-1/2", (1, 2, 2)),
    ("bytes 9-3/20", None),
    ("bytes */1000", None),
    ("items 0-1/2", None),
    (None, None),
])
def test_parse_content_range(value: str | None, parsed: tuple[int, int, int | None] | None) -> None:
    assert parse_content_range(value) == parsed


@pytest.mark.parametrize("value,start,end,size,ok", [
    ("bytes 100-199/1000", 100, 200, 1000, True),
    ("bytes 100-149/1000", 100, 200, 1000, True),    # short range: resumed for the rest
    ("bytes 101-199/1000", 100, 200, 1000, False),   # wrong start
    ("bytes 100-299/1000", 100, 200, 1000, False),   # more than asked
    ("bytes 100-199/999", 100, 200, 1000, False),    # another blob size
    ("bytes 100-199/*", 100, 200, 1000, True),
])
def test_content_range_matches(value: str, start: int, end: int, size: int, ok: bool) -> None:
    assert content_range_matches(value, start, end, size) is ok


@pytest.mark.parametrize("start,end,parts,min_part,count", [
    (0, 100, 8, 1, 8), (0, 100, 8, 50, 2), (0, 10, 8, 100, 1), (37, 1000, 3, 1, 3), (5, 5, 4, 1, 0),
])
def test_split_covers_the_span_exactly(start: int, end: int, parts: int, min_part: int, count: int) -> None:
    spans = split(start, end, parts, min_part)
    assert len(spans) == count
    if spans:
        assert spans[0][0] == start and spans[-1][1] == end
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        sizes = [b - a for a, b in spans]
        assert max(sizes) - min(sizes) <= 1
