"""The bytes of a docker-archive, exactly as skopeo 1.9 writes them (``docker-archive:OUT:NAME:TAG``).

Pure: takes bytes and digests, returns bytes. ``pack`` wraps these pieces in zstd frames.

Layout of the uncompressed tar (checked byte for byte against skopeo 1.9.3):

1. each distinct layer, in manifest order, as ``<diff_id hex>.tar`` (header, content, padding);
2. the config as ``<config digest hex>.json``, the registry's exact bytes;
3. per layer position (duplicates included), the legacy triple ``<id>/layer.tar`` (symlink to
   ``../<diff_id hex>.tar``), ``<id>/VERSION`` (``1.0``) and ``<id>/json``;
4. ``manifest.json`` and ``repositories``;
5. two zero blocks; no padding to a 10240-byte record.

Tar headers are USTAR as Go's archive/tar writes them: mode 0444 (symlinks 0), uid/gid 0, empty
uname/gname, mtime 0, device fields ``0000000\\0``, checksum as six octal digits, NUL, space.
A member of 8 GiB or more gets a PAX header carrying its size, as Go does.

Legacy image ids follow containers/image: chain_0 = diff_id_0, chain_i = sha256 of
``"<chain_{i-1}> <diff_id_i>"``; each layer's legacy config is ``{"parent": previous id}`` (the
top one also copies seven raw fields of the image config), the id is the sha256 of that config
plus ``"layer_id": chain_i``, marshalled as Go does (sorted keys, compact, ``<>&`` escaped).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .digest import Digest
from .errors import InvalidReference, InvalidRequest, ManifestInvalid
from .manifest import parse_config
from .reference import DEFAULT_TAG, Reference

BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
_USTAR_MAX_SIZE = 0o77777777777  # 11 octal digits: 8 GiB - 1

# The image config fields containers/image copies into the top legacy layer's json.
_TOP_LAYER_FIELDS = ("architecture", "config", "container", "container_config", "created",
                     "docker_version", "os")


@dataclass(frozen=True)
class LegacyLayer:
    """One ``<id>/`` directory of the legacy (docker save v1) part of the archive."""

    id: str
    diff_id: Digest
    json: bytes


# --------------------------------------------------------------------------- names


def normalize_repo_tag(repo_tag: str) -> tuple[str, str]:
    """``(name, tag)`` fully qualified as skopeo writes RepoTags.

    ``debian`` -> ``docker.io/library/debian``, ``latest``; ``index.docker.io/x:1`` ->
    ``docker.io/library/x``, ``1``; ``127.0.0.1:5000/foo:1`` stays. A digest is refused, as
    skopeo refuses it ("reference does not include a tag").
    """
    try:
        ref = Reference.parse(repo_tag)
    except InvalidReference as e:
        raise InvalidRequest(f"archive name {repo_tag!r} is not a valid name:tag ({e})") from e
    if ref.digest is not None:
        raise InvalidRequest(
            f"archive name {repo_tag!r} holds a digest: docker-archive RepoTags need name:tag"
        )
    # Reference.parse already maps Docker Hub's aliases (index.docker.io, ...) to docker.io
    return f"{ref.registry}/{ref.repository}", ref.tag or DEFAULT_TAG


def qualified_repo_tag(repo_tag: str) -> str:
    name, tag = normalize_repo_tag(repo_tag)
    return f"{name}:{tag}"


def layer_member_name(diff_id: Digest) -> str:
    return f"{diff_id.hex}.tar"


def config_member_name(config_digest: Digest) -> str:
    return f"{config_digest.hex}.json"


# --------------------------------------------------------------------------- tar headers


def _octal(value: int, width: int) -> bytes:
    """``width - 1`` zero-padded octal digits and a NUL, as Go's formatOctal."""
    return b"%0*o\0" % (width - 1, value)


def _ustar_header(name: str, size: int, mode: int, typeflag: bytes, linkname: str = "",
                  device_fields: bool = True) -> bytes:
    raw_name = name.encode()
    raw_link = linkname.encode()
    if len(raw_name) > 100 or len(raw_link) > 100:
        raise ValueError(f"tar member name too long for a plain USTAR header: {name!r}")
    header = bytearray(BLOCK)
    header[0:len(raw_name)] = raw_name
    header[100:108] = _octal(mode, 8)
    header[108:116] = _octal(0, 8)  # uid
    header[116:124] = _octal(0, 8)  # gid
    header[124:136] = _octal(size if size <= _USTAR_MAX_SIZE else 0, 12)
    header[136:148] = _octal(0, 12)  # mtime
    header[148:156] = b" " * 8  # checksum is computed over spaces here
    header[156:157] = typeflag
    header[157:157 + len(raw_link)] = raw_link
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    if device_fields:  # Go leaves them NUL only in its own PAX extension headers
        header[329:337] = _octal(0, 8)  # devmajor
        header[337:345] = _octal(0, 8)  # devminor
    checksum = sum(header)
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def tar_header(name: str, size: int, *, mode: int = 0o444, typeflag: bytes = b"0",
               linkname: str = "") -> bytes:
    """The header block(s) of one member: 512 bytes, or 1536 with a PAX size record (>= 8 GiB)."""
    if size <= _USTAR_MAX_SIZE:
        return _ustar_header(name, size, mode, typeflag, linkname)
    # Go switches to PAX for sizes USTAR cannot hold: an 'x' member under PaxHeaders.0/ (mode 0,
    # no device fields) carrying "size", then the USTAR header with its size field zeroed.
    record = _pax_record("size", str(size))
    directory, _, base = name.rpartition("/")
    pax_name = f"{directory}/PaxHeaders.0/{base}" if directory else f"PaxHeaders.0/{base}"
    pax = _ustar_header(pax_name, len(record), 0, b"x", device_fields=False)
    pax += record + padding(len(record))
    return pax + _ustar_header(name, size, mode, typeflag, linkname)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    length = len(body)
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return f"{length}{body}".encode()


def padding(size: int) -> bytes:
    """Zero bytes that fill a member's content up to the next 512-byte boundary."""
    return b"\0" * (-size % BLOCK)


def file_member(name: str, data: bytes) -> bytes:
    return tar_header(name, len(data)) + data + padding(len(data))


def symlink_member(name: str, target: str) -> bytes:
    return tar_header(name, 0, mode=0, typeflag=b"2", linkname=target)


# --------------------------------------------------------------------------- Go-style JSON


def go_compact(raw: bytes) -> bytes:
    """Go's json.Compact with HTML escaping, as json.Marshal applies it to a RawMessage.

    Whitespace outside strings goes; ``<``, ``>``, ``&`` become ``\\u003c`` etc. and U+2028/9
    become ``\\u2028``/``\\u2029`` anywhere; every other byte (key order, escapes, UTF-8) stays.
    """
    out = bytearray()
    in_string = escaped = False
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c in (0x3C, 0x3E, 0x26):  # < > &
            out += b"\\u00%02x" % c
        elif c == 0xE2 and i + 2 < n and raw[i + 1] == 0x80 and raw[i + 2] in (0xA8, 0xA9):
            out += b"\\u202%x" % (raw[i + 2] & 0xF)
            i += 3
            continue
        elif in_string:
            out.append(c)
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c in (0x20, 0x09, 0x0A, 0x0D):
            pass
        else:
            out.append(c)
            if c == 0x22:
                in_string = True
        i += 1
    return bytes(out)


def _go_string(text: str) -> bytes:
    return go_compact(json.dumps(text, ensure_ascii=False).encode())


def _go_object(fields: dict[str, bytes]) -> bytes:
    """A JSON object of already-encoded values, keys sorted as Go sorts map keys (by bytes)."""
    items = sorted(fields.items(), key=lambda kv: kv[0].encode())
    return b"{" + b",".join(_go_string(k) + b":" + v for k, v in items) + b"}"


def top_level_raw_values(config_raw: bytes, where: str = "image config") -> dict[str, bytes]:
    """The raw bytes of each top-level value of a JSON object (later duplicates win, as in Go)."""
    text = config_raw.decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()
    values: dict[str, bytes] = {}
    try:
        i = _skip_ws(text, 0)
        if text[i] != "{":
            raise ValueError("not a JSON object")
        i = _skip_ws(text, i + 1)
        if text[i] == "}":
            return values
        while True:
            key, i = decoder.raw_decode(text, i)
            if not isinstance(key, str):
                raise ValueError("object key is not a string")
            i = _skip_ws(text, i)
            if text[i] != ":":
                raise ValueError("expected ':'")
            start = _skip_ws(text, i + 1)
            _, end = decoder.raw_decode(text, start)
            values[key] = text[start:end].encode("utf-8", errors="surrogateescape")
            i = _skip_ws(text, end)
            if text[i] == "}":
                return values
            if text[i] != ",":
                raise ValueError("expected ',' or '}'")
            i = _skip_ws(text, i + 1)
    except (ValueError, IndexError) as e:
        raise ManifestInvalid(f"{where} is not a valid JSON object ({e})") from e


def _skip_ws(text: str, i: int) -> int:
    while text[i] in " \t\r\n":
        i += 1
    return i


# --------------------------------------------------------------------------- legacy metadata


def legacy_layers(config_raw: bytes, diff_ids: Sequence[Digest]) -> list[LegacyLayer]:
    """The legacy ``<id>/`` entries for each layer position (see the module docstring)."""
    raw_fields = top_level_raw_values(config_raw)
    result: list[LegacyLayer] = []
    chain: Digest | None = None
    parent: str | None = None
    for i, diff_id in enumerate(diff_ids):
        fields: dict[str, bytes] = {}
        if parent is not None:
            fields["parent"] = _go_string(parent)
        if i == len(diff_ids) - 1:
            for name in _TOP_LAYER_FIELDS:
                value = raw_fields.get(name)
                fields[name] = go_compact(value) if value is not None else b"null"
        if chain is None:
            chain = diff_id
        else:
            chain = Digest.of(f"{chain} {diff_id}".encode())
        layer_id = hashlib.sha256(_go_object({**fields, "layer_id": _go_string(str(chain))})).hexdigest()
        fields["id"] = _go_string(layer_id)
        result.append(LegacyLayer(layer_id, diff_id, _go_object(fields)))
        parent = layer_id
    return result


def manifest_json(config_digest: Digest, repo_tags: Sequence[str], diff_ids: Sequence[Digest]) -> bytes:
    """``manifest.json``: one compact entry, fields in Go struct order, no trailing newline."""
    return b"".join([
        b'[{"Config":', _go_string(config_member_name(config_digest)),
        b',"RepoTags":[', b",".join(_go_string(t) for t in repo_tags), b"]",
        b',"Layers":[', b",".join(_go_string(layer_member_name(d)) for d in diff_ids), b"]}]",
    ])


def repositories_json(name: str, tag: str, top_id: str) -> bytes:
    return b"{" + _go_string(name) + b":{" + _go_string(tag) + b":" + _go_string(top_id) + b"}}"


# --------------------------------------------------------------------------- the archive


def unique_diff_ids(diff_ids: Iterable[Digest]) -> list[Digest]:
    """Each diff_id once, in order of first occurrence: the layer members of the archive."""
    seen: set[Digest] = set()
    out: list[Digest] = []
    for d in diff_ids:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def layer_member_header(diff_id: Digest, size: int) -> bytes:
    """Header block(s) of the ``<diff_id>.tar`` member; content and ``padding(size)`` follow."""
    return tar_header(layer_member_name(diff_id), size)


def archive_tail(config_raw: bytes, repo_tag: str, where: str = "image") -> bytes:
    """Everything after the layer members: config, legacy entries, manifest.json, repositories,
    and the end-of-archive blocks. Small (a few KB per layer)."""
    config = parse_config(config_raw, where)
    diff_ids = config.diff_ids
    if not diff_ids:
        raise ManifestInvalid(f"{where}: image config lists no layers (rootfs.diff_ids is empty)")
    name, tag = normalize_repo_tag(repo_tag)
    config_digest = Digest.of(config_raw)
    parts = [file_member(config_member_name(config_digest), config_raw)]
    legacy = legacy_layers(config_raw, diff_ids)
    for entry in legacy:
        parts.append(symlink_member(f"{entry.id}/layer.tar", f"../{layer_member_name(entry.diff_id)}"))
        parts.append(file_member(f"{entry.id}/VERSION", b"1.0"))
        parts.append(file_member(f"{entry.id}/json", entry.json))
    parts.append(file_member("manifest.json", manifest_json(config_digest, [f"{name}:{tag}"], diff_ids)))
    parts.append(file_member("repositories", repositories_json(name, tag, legacy[-1].id)))
    parts.append(END_OF_ARCHIVE)
    return b"".join(parts)


def docker_archive_chunks(config_raw: bytes, layer_tars: Sequence[BinaryIO], repo_tag: str,
                          chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """The whole uncompressed docker-archive, in chunks (golden tests, reference output).

    ``layer_tars[i]`` is a seekable stream of the uncompressed layer whose diff_id is the config's
    ``rootfs.diff_ids[i]``; contents are not re-hashed here. A repeated diff_id is written once.
    """
    diff_ids = parse_config(config_raw, "image config").diff_ids
    if len(layer_tars) != len(diff_ids):
        raise ManifestInvalid(
            f"image config lists {len(diff_ids)} layers but {len(layer_tars)} were given"
        )
    seen: set[Digest] = set()
    for diff_id, stream in zip(diff_ids, layer_tars, strict=True):
        if diff_id in seen:
            continue
        seen.add(diff_id)
        size = stream.seek(0, 2)
        stream.seek(0)
        yield layer_member_header(diff_id, size)
        while chunk := stream.read(chunk_size):
            yield chunk
        yield padding(size)
    yield archive_tail(config_raw, repo_tag)
