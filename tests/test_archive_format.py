"""archive_format: tar headers, Go-style JSON and legacy ids, as skopeo 1.9 writes them.

The byte-for-byte comparison with real skopeo output over the whole catalog is in
test_pack.py; these are the pieces, table-driven, including values taken from skopeo 1.9.3.
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from fetchd.archive_format import (
    END_OF_ARCHIVE,
    archive_tail,
    docker_archive_chunks,
    go_compact,
    legacy_layers,
    manifest_json,
    normalize_repo_tag,
    symlink_member,
    tar_header,
    top_level_raw_values,
)
from fetchd.digest import Digest
from fetchd.errors import InvalidRequest, ManifestInvalid

# A header skopeo 1.9.3 wrote for a 10240-byte layer member (from `skopeo copy ... docker-archive:`).
SKOPEO_LAYER_HEADER_FIELDS = (
    b"0000444\x000000000\x000000000\x0000000024000\x0000000000000\x00020765\x00 0"
)


def test_layer_header_matches_skopeo_bytes() -> None:
    name = "6b5ca5486c764b073699b02a9328785ac3a9d6fefdada4c9257fecbfd385671d.tar"
    h = tar_header(name, 10240)
    assert len(h) == 512
    assert h[:100].rstrip(b"\0") == name.encode()
    assert h[100:157] == SKOPEO_LAYER_HEADER_FIELDS
    assert h[257:265] == b"ustar\x0000"
    assert h[265:329] == b"\0" * 64  # empty uname, gname
    assert h[329:345] == b"0000000\x000000000\x00"
    assert h[345:] == b"\0" * 167


@pytest.mark.parametrize("size", [0, 1, 511, 512, 513, 10**9, 0o77777777777])
def test_header_parses_with_tarfile(size: int) -> None:
    member = tarfile.TarInfo.frombuf(tar_header("x/y.json", size), "utf-8", "strict")
    assert (member.name, member.size, member.mode, member.mtime) == ("x/y.json", size, 0o444, 0)
    assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")


def test_symlink_header() -> None:
    member = tarfile.TarInfo.frombuf(symlink_member("abc/layer.tar", "../d.tar"), "utf-8", "strict")
    assert member.issym() and member.linkname == "../d.tar" and member.mode == 0 and member.size == 0


def test_huge_member_gets_a_pax_size_record() -> None:
    size = 9 * 1024**3
    header = tar_header("big.tar", size)
    assert len(header) == 3 * 512
    assert header[:100].rstrip(b"\0") == b"PaxHeaders.0/big.tar"
    assert header[156:157] == b"x"
    record = header[512:1024].rstrip(b"\0")
    assert record == b"%d size=%d\n" % (len(record), size)
    # tarfile applies the record to the member that follows: the size is read from PAX
    fake = io.BytesIO(header)
    tf = tarfile.open(fileobj=fake, mode="r|")
    member = tf.next()
    assert member is not None and member.name == "big.tar" and member.size == size


@pytest.mark.parametrize("raw,expected", [
    (b'{ "a" : [1, 2] ,\n "b":"x y"}', b'{"a":[1,2],"b":"x y"}'),
    (b'"<&>"', b'"\\u003c\\u0026\\u003e"'),
    (b'{"k":"a\\"  b"}', b'{"k":"a\\"  b"}'),  # escaped quote keeps the string open
    (b'{"z":1,"a":2}', b'{"z":1,"a":2}'),  # key order kept, as Go keeps a RawMessage's
    ('"\u2028\u00e9"'.encode(), '"\\u2028\u00e9"'.encode()),
    (b'{"e":"\\u00e9\\n"}', b'{"e":"\\u00e9\\n"}'),
    (b"null", b"null"),
])
def test_go_compact(raw: bytes, expected: bytes) -> None:
    assert go_compact(raw) == expected


def test_top_level_raw_values_keep_bytes_and_last_duplicate() -> None:
    raw = b'{"a": {"y": 1, "x": [ 2 ]}, "b" : "s",\n "a": {"w": null} }'
    assert top_level_raw_values(raw) == {"a": b'{"w": null}', "b": b'"s"'}
    with pytest.raises(ManifestInvalid):
        top_level_raw_values(b"[1, 2]")


def _explore_config() -> bytes:
    """The config of the image the skopeo 1.9.3 ids below were taken from."""
    diff_ids = ["sha256:6b5ca5486c764b073699b02a9328785ac3a9d6fefdada4c9257fecbfd385671d",
                "sha256:cea44acbb4885081b29469a6d13f83c47a55bc5f26c9ed0be26190af31018e6e",
                "sha256:6b5ca5486c764b073699b02a9328785ac3a9d6fefdada4c9257fecbfd385671d"]
    cfg = {"architecture": "amd64", "os": "linux", "config": {"Env": ["A=<&>"]},
           "created": "2024-01-01T00:00:00Z", "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created_by": "x"}]}
    return json.dumps(cfg, indent=2).encode()


def test_legacy_ids_match_skopeo() -> None:
    raw = _explore_config()
    assert Digest.of(raw).hex.startswith("644ae2794f4f")
    diff_ids = [Digest.parse(d) for d in json.loads(raw)["rootfs"]["diff_ids"]]
    layers = legacy_layers(raw, diff_ids)
    assert [entry.id for entry in layers] == [
        "6524e34b8a1241a9edf35abfdd16fcf3be53c9ae33317b88e044b9777403d35f",
        "0dba0195cf5f2f716e1dd4511c289037b18de44ed85321ef80854a126dca93ef",
        "af234bb7497ca0f0b15b563096dbd57d3c7b7e73f791d2b1c325429accf1438c",
    ]
    assert layers[0].json == b'{"id":"6524e34b8a1241a9edf35abfdd16fcf3be53c9ae33317b88e044b9777403d35f"}'
    assert layers[2].json == (
        b'{"architecture":"amd64","config":{"Env":["A=\\u003c\\u0026\\u003e"]},"container":null,'
        b'"container_config":null,"created":"2024-01-01T00:00:00Z","docker_version":null,'
        b'"id":"af234bb7497ca0f0b15b563096dbd57d3c7b7e73f791d2b1c325429accf1438c","os":"linux",'
        b'"parent":"0dba0195cf5f2f716e1dd4511c289037b18de44ed85321ef80854a126dca93ef"}'
    )


@pytest.mark.parametrize("given,expected", [
    ("debian:bookworm", ("docker.io/library/debian", "bookworm")),
    ("debian", ("docker.io/library/debian", "latest")),
    ("foo/bar:1", ("docker.io/foo/bar", "1")),
    ("docker.io/debian:12", ("docker.io/library/debian", "12")),
    ("index.docker.io/foo/bar:2", ("docker.io/foo/bar", "2")),
    ("index.docker.io/debian:2", ("docker.io/library/debian", "2")),
    ("127.0.0.1:5000/foo:1", ("127.0.0.1:5000/foo", "1")),
    ("localhost/x:3", ("localhost/x", "3")),
    ("quay.io/a/b/c:v1.2", ("quay.io/a/b/c", "v1.2")),
])
def test_repo_tags_normalize_as_skopeo(given: str, expected: tuple[str, str]) -> None:
    assert normalize_repo_tag(given) == expected


@pytest.mark.parametrize("bad", ["foo@sha256:" + "a" * 64, "Foo:1", "", "a:b:c"])
def test_bad_repo_tags_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        normalize_repo_tag(bad)


def test_manifest_json_shape() -> None:
    d = Digest.of(b"x")
    assert manifest_json(d, ["docker.io/library/a:1"], [d, d]) == (
        b'[{"Config":"%s.json","RepoTags":["docker.io/library/a:1"],"Layers":["%s.tar","%s.tar"]}]'
        % (d.hex.encode(), d.hex.encode(), d.hex.encode())
    )


def test_whole_archive_reads_back_with_tarfile() -> None:
    l1, l2 = b"a" * 700, b"b" * 1024
    cfg = json.dumps({"architecture": "arm64", "os": "linux",
                      "rootfs": {"type": "layers",
                                 "diff_ids": [str(Digest.of(l1)), str(Digest.of(l2)),
                                              str(Digest.of(l1))]}}).encode()
    data = b"".join(docker_archive_chunks(cfg, [io.BytesIO(l1), io.BytesIO(l2), io.BytesIO(l1)],
                                          "x:1"))
    assert data.endswith(END_OF_ARCHIVE) and len(data) % 512 == 0
    tf = tarfile.open(fileobj=io.BytesIO(data))
    names = tf.getnames()
    assert names[:3] == [f"{Digest.of(l1).hex}.tar", f"{Digest.of(l2).hex}.tar",
                         f"{Digest.of(cfg).hex}.json"]
    assert names[-2:] == ["manifest.json", "repositories"]
    assert len(names) == 3 + 3 * 3 + 2  # one legacy triple per layer position
    manifest = json.loads(tf.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["docker.io/library/x:1"]
    assert tf.extractfile(names[0]).read() == l1  # type: ignore[union-attr]
    tail = archive_tail(cfg, "x:1")
    assert data.endswith(tail)
