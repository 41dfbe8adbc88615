"""``docker://`` for BitBake through the fetchd daemon: a drop-in for Isar's ``Container`` fetcher.

Same URL, same DL_DIR and WORKDIR names, same checksum rules as Isar; the image
is fetched, verified, packed and compressed by the daemon, which delivers the
finished ``.zst`` atomically (a hard link into its store), so nothing partial
ever sits under a final name.

Identity of a DL_DIR file: (name, digest or tag, platform, zstd level, RepoTags).
Name, digest/tag, platform and a non-default level are in the file name; a
sidecar ``<localpath>.fetchd`` (JSON) records what was delivered: the digest the
tag resolved to, the manifest and archive digests, the level and the RepoTags.
``need_update`` compares the sidecar with what the recipe asks for and, for a
tag not pinned by digest, with a fresh resolve through the daemon (skipped under
BB_NO_NETWORK).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from typing import Any

import bb
import bb.event
import bb.fetch2
import bb.utils
from bb.fetch2 import (
    ChecksumError,
    FetchData,
    FetchError,
    FetchMethod,
    MissingChecksumEvent,
    NetworkAccess,
    NoChecksumError,
    ParameterError,
    logger,
)

from . import naming

SIDECAR_SUFFIX = ".fetchd"

# BitBake's generic URL parameters, meaningless for docker:// and silently accepted as by Isar.
_BITBAKE_PARAMS = {"name", "protocol", "downloadfilename", "unpack", "subdir", "striplevel"}

ClientFactory = Callable[..., Any]  # (socket_path: str | None) -> client; no PEP 604 at runtime (3.9)


class Fetchd(FetchMethod):  # type: ignore[misc]  # bb is untyped
    """The ``docker://`` fetch method. Put it at the front of ``bb.fetch2.methods``."""

    #: Builds the daemon client for a socket path (None: the client's default).
    #: Tests replace it with a fake; production uses ``fetchd_client.Client``.
    client_factory: ClientFactory | None = None

    # --- identity -----------------------------------------------------------------

    def supports(self, ud: FetchData, d: Any) -> bool:
        return bool(ud.type == "docker")

    def supports_checksum(self, ud: FetchData) -> bool:
        # The content is addressed by digest and verified by the daemon; hashing
        # the whole .zst with six algorithms for every donestamp costs seconds
        # per image and proves nothing more.
        return False

    def recommends_checksum(self, ud: FetchData) -> bool:
        return False

    def urldata_init(self, ud: FetchData, d: Any) -> None:
        unknown = set(ud.parm) - {"tag", "digest"} - _BITBAKE_PARAMS
        if unknown:
            # Isar ignores them; a drop-in must not fail recipes that parse today.
            logger.warning("%s: parameter(s) %s ignored: docker:// takes tag= and digest=",
                           ud.url, ", ".join(sorted(unknown)))
        ud.tag_given = "tag" in ud.parm
        ud.tag = ud.parm.get("tag") or naming.DEFAULT_TAG
        if not naming.check_tag(ud.tag):
            raise ParameterError(f"invalid tag {ud.tag!r} (letters, digits, '_', '.', '-')", ud.url)
        ud.digest = ud.parm.get("digest") or None
        if ud.digest is not None and not naming.check_digest(ud.digest):
            raise ParameterError(
                f"invalid digest {ud.digest!r}: expected sha256: and 64 lowercase hex digits", ud.url
            )
        package_arch = d.getVar("PACKAGE_ARCH")
        if not package_arch:
            raise ParameterError("PACKAGE_ARCH is not set: it selects the image's platform", ud.url)
        spec = naming.arch_spec(package_arch)
        ud.arch_spec = spec
        ud.arch = spec.arch
        ud.variant = spec.variant
        ud.container_name = naming.container_name(ud.host, ud.path)
        ud.container_src = ud.container_name + ("@" + ud.digest if ud.digest else ":" + ud.tag)
        ud.localname = naming.local_name(ud.container_name)
        ud.repo_tag = ud.container_name + ":" + ud.tag
        level_text = d.getVar("FETCHD_ZSTD_LEVEL")
        ignored: list[str] = []
        try:
            if level_text:
                ud.zstd_level = naming.check_level(int(level_text), "FETCHD_ZSTD_LEVEL")
            else:
                ud.zstd_level, ignored = naming.zstd_level(
                    d.getVar("ZSTD_DEFAULTS"), d.getVar("ZSTD_COMPRESSION_LEVEL")
                )
        except ValueError as e:
            raise ParameterError(str(e), ud.url) from e
        if ignored:
            logger.debug("fetchd: zstd options %s do not apply to fetchd's archives", " ".join(ignored))
        ud.localfile = naming.localfile(ud.container_name, ud.tag, ud.digest, spec, ud.zstd_level)
        ud.workdir_name = naming.workdir_name(ud.container_name, ud.tag)

    # --- freshness ----------------------------------------------------------------

    def need_update(self, ud: FetchData, d: Any) -> bool:
        if not os.path.exists(ud.localpath):
            return True
        side = read_sidecar(ud.localpath)
        offline = _no_network(d)
        if side is None or side.get("source") != "fetchd":
            # Not delivered by fetchd (a mirror file, or Isar's own fetcher): a
            # file pinned by digest is what its name says; a tag may have moved.
            return not (ud.digest or offline)
        if (side.get("repo_tag") != ud.repo_tag or side.get("level") != ud.zstd_level
                or side.get("platform") != ud.arch_spec.platform):
            return True  # e.g. a second recipe with the same digest and another tag
        if ud.digest:
            return ud.digest not in (side.get("resolved"), side.get("manifest_digest"))
        if offline:
            return False
        try:
            # The resolve is a HEAD at the registry: BB_ALLOWED_NETWORKS applies to it too.
            bb.fetch2.check_network_access(d, f"fetchd resolve {ud.container_name}:{ud.tag}", ud.url)
            resolved = self._resolve(self._client(d), ud, ud.container_name, offline=False)
        except (FetchError, bb.fetch2.NetworkAccess, bb.fetch2.UntrustedUrl) as e:
            logger.warning("fetchd: cannot check whether %s moved, keeping %s: %s",
                           ud.container_src, ud.localpath, e)
            return False
        ud.fetchd_resolved = resolved  # download() uses the same answer: one HEAD per fetch
        if resolved != side.get("resolved"):
            logger.info("fetchd: %s moved from %s to %s", ud.container_src, side.get("resolved"), resolved)
            return True
        return False

    def verify_donestamp(self, ud: FetchData, d: Any) -> bool:
        ok = bool(bb.fetch2.verify_donestamp(ud, d))
        if ok and not ud.digest and (d.getVar("BB_STRICT_CHECKSUM") or "0") == "1":
            # As for wget: strict mode refuses an unpinned URL even when cached.
            side = read_sidecar(ud.localpath) or {}
            resolved = side.get("resolved") or "sha256:<unknown, fetch once without BB_STRICT_CHECKSUM>"
            raise NoChecksumError(naming.checksum_line(ud.container_name, resolved,
                                                       ud.tag if ud.tag_given else None), ud.url)
        return ok

    # --- download -----------------------------------------------------------------

    def download(self, ud: FetchData, d: Any) -> None:
        self._download(ud, d, ud.container_name)

    def _download(self, ud: FetchData, d: Any, source_name: str) -> None:
        """Deliver ``source_name`` (the URL's name, or a mirror's) into ud.localpath.

        When this returns, ud.localpath is the complete archive for the requested
        digest (checked against the daemon's result) and the sidecar says so.
        """
        offline = _no_network(d)
        if not offline:
            bb.fetch2.check_network_access(
                d, f"fetchd fetch {source_name} for {ud.arch_spec.platform}", ud.url)
        client = self._client(d)
        bb.utils.mkdirhier(os.path.dirname(ud.localpath))
        strict = d.getVar("BB_STRICT_CHECKSUM") or "0"
        shown_tag = ud.tag if ud.tag_given else None

        if ud.digest is None:
            resolved = getattr(ud, "fetchd_resolved", None) if source_name == ud.container_name else None
            ud.fetchd_resolved = None
            if resolved is None:
                resolved = self._resolve(client, ud, source_name, offline=offline)
            if strict == "1":
                raise NoChecksumError(naming.checksum_line(ud.container_name, resolved, shown_tag), ud.url)
            wanted = resolved
        else:
            wanted = ud.digest
            if ud.tag_given:
                self._check_tag(client, ud, source_name, offline)

        result = self._call(client, ud, "fetch", source_name + "@" + wanted,
                            platform=ud.arch_spec.platform, level=ud.zstd_level,
                            repo_tag=ud.repo_tag, dest=ud.localpath, offline=offline,
                            on_event=_log_event)
        got = {result.get("index_digest"), result.get("manifest_digest")}
        if wanted not in got:
            raise ChecksumError(
                f"fetchd delivered {source_name} with index {result.get('index_digest')} and manifest "
                f"{result.get('manifest_digest')}, but {wanted} was asked for; "
                "the daemon's store may be damaged: run `fetchd verify`",
                ud.url, str(result.get("manifest_digest")))
        write_sidecar(ud.localpath, {
            "source": "fetchd",
            "reference": source_name + "@" + wanted,
            "resolved": wanted,
            "index_digest": result.get("index_digest"),
            "manifest_digest": result.get("manifest_digest"),
            "archive_digest": result.get("archive_digest"),
            "platform": ud.arch_spec.platform,
            "level": ud.zstd_level,
            "repo_tag": ud.repo_tag,
        })
        if ud.digest is None:
            _report_missing_checksum(ud, d, wanted, strict)

    def _check_tag(self, client: Any, ud: FetchData, source_name: str, offline: bool) -> None:
        """Isar's rule: with both ;tag= and ;digest=, the tag must resolve to the digest."""
        try:
            resolved = self._resolve(client, ud, source_name, offline=offline)
        except NetworkAccess:
            # Offline and the tag never resolved here: the digest still pins the content.
            logger.debug("fetchd: cannot check tag %s offline; the digest pins the content", ud.tag)
            return
        if resolved != ud.digest and offline:
            # The daemon's tag cache may be older than the recipe's pin (the tag moved, the
            # recipe followed): without network nobody can tell, and the digest pins the content.
            logger.warning("fetchd: %s:%s was %s when last resolved; the recipe pins %s; not "
                           "checked again offline (BB_NO_NETWORK)", ud.container_name, ud.tag,
                           resolved, ud.digest)
            return
        if resolved != ud.digest:
            line = naming.checksum_line(ud.container_name, resolved, ud.tag)
            raise ChecksumError(
                f"Checksum mismatch!\nThe tag {ud.tag} of {ud.container_name} now resolves to "
                f"{resolved}, but the recipe pins {ud.digest}.\n"
                "If this change is expected, use this line within the recipe:\n"
                f"{line}\n"
                "Otherwise check with the image's publisher why the tag moved.",
                ud.url, resolved)

    def _resolve(self, client: Any, ud: FetchData, source_name: str, *, offline: bool) -> str:
        """The digest ``source_name:tag`` points at, asked fresh from the registry when online."""
        reference = source_name + ":" + ud.tag
        # max_age=0: ask the registry, not the daemon's short-lived tag cache: moved tags count
        answer = self._call(client, ud, "resolve", reference, offline=offline, max_age=0)
        digest = answer.get("digest")
        if not isinstance(digest, str) or not naming.check_digest(digest):
            raise FetchError(f"fetchd resolved {reference} to {digest!r}, not a sha256 digest", ud.url)
        return digest

    # --- unpack ---------------------------------------------------------------------

    def unpack(self, ud: FetchData, rootdir: str, d: Any) -> None:
        """Hard-link the archive to ``rootdir/<name>:<tag>.zst`` (daemon link, then copy)."""
        dest = os.path.join(rootdir, ud.workdir_name)
        src = os.path.realpath(ud.localpath)  # a mirror may have left a symlink in DL_DIR
        bb.utils.mkdirhier(rootdir)
        tracer = getattr(ud, "unpack_tracer", None)
        if tracer is not None:
            tracer.unpack("file-copy", rootdir)
        tmp = f"{dest}.fetchd-tmp-{os.getpid()}"
        _remove(tmp)
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK):
                raise
            if self._deliver_via_daemon(ud, d, dest):
                return
            logger.debug("fetchd: cannot link %s (%s), copying", src, e)
            try:
                shutil.copyfile(src, tmp)
            except BaseException:
                _remove(tmp)
                raise
        os.replace(tmp, dest)

    def _deliver_via_daemon(self, ud: FetchData, d: Any, dest: str) -> bool:
        """Ask the daemon to link its store file to ``dest`` (protected_hardlinks)."""
        side = read_sidecar(ud.localpath) or {}
        archive = side.get("archive_digest")
        if not archive:
            return False
        try:
            _remove(dest)
            self._call(self._client(d), ud, "deliver", archive, dest)
        except FetchError as e:
            logger.debug("fetchd: the daemon could not deliver %s to %s: %s", archive, dest, e)
            return False
        return os.path.isfile(dest) and not os.path.islink(dest)

    # --- mirrors ----------------------------------------------------------------------

    def try_mirrors(self, fetch: Any, ud: FetchData, d: Any, mirrors: Any, check: bool = False) -> bool:
        """PREMIRRORS/MIRRORS, keeping the arch directory for file:// mirrors.

        BitBake maps a mirror to ``<mirror dir>/<basename>``, which would give
        every architecture the same file. A ``file://`` mirror here is a DL_DIR
        laid out as ours: ``<mirror dir>/container-images/<arch>[/<variant>]/<file>``.
        A ``docker://`` mirror is fetched by the daemon with the recipe's RepoTags.
        """
        ld = d.createCopy()
        for line in mirrors:
            try:
                find, replace = line
            except ValueError:
                continue
            if replace.startswith("file://"):
                if self._try_file_mirror(fetch, ud, ld, find, replace, check):
                    return True
            elif replace.startswith("docker://"):
                if self._try_docker_mirror(ud, ld, find, replace, check):
                    return True
            elif bb.fetch2.try_mirrors(fetch, d, ud, [line], check):
                return True
        return False

    def _mirror_uri(self, ud: FetchData, find: str, replace: str, d: Any) -> str | None:
        replacements = {
            "TYPE": ud.type, "HOST": ud.host, "PATH": ud.path,
            "BASENAME": ud.path.split("/")[-1],
            "MIRRORNAME": ud.host.replace(":", ".") + ud.path.replace("/", ".").replace("*", "."),
        }
        try:
            uri = bb.fetch2.uri_replace(ud, find, replace, replacements, d, ud.localfile)
        except bb.fetch2.BBFetchException as e:
            logger.debug("fetchd: mirror %s %s does not apply: %s", find, replace, e)
            return None
        return str(uri) if uri else None

    def _try_file_mirror(self, fetch: Any, ud: FetchData, d: Any, find: str, replace: str,
                         check: bool) -> bool:
        uri = self._mirror_uri(ud, find, replace, d)
        if not uri:
            return False
        path = bb.fetch2.decodeurl(uri)[2]
        mirror_path = os.path.join(os.path.dirname(path), ud.localfile)
        try:
            newud = FetchData("file://" + mirror_path, d)
            newud.ignore_checksums = True
            newud.setup_localpath(d)
        except bb.fetch2.BBFetchException as e:
            logger.debug("fetchd: mirror file %s unusable: %s", mirror_path, e)
            return False
        if not os.path.exists(newud.localpath):
            logger.debug("fetchd: no mirror file %s", mirror_path)
            return False
        return bool(bb.fetch2.try_mirror_url(fetch, ud, newud, d, check))

    def _try_docker_mirror(self, ud: FetchData, d: Any, find: str, replace: str, check: bool) -> bool:
        uri = self._mirror_uri(ud, find, replace, d)
        if not uri:
            return False
        _, host, path, _, _, _ = bb.fetch2.decodeurl(uri)
        name = naming.container_name(host, path)
        if name == ud.container_name:
            return False
        try:
            if check:
                bb.fetch2.check_network_access(d, f"fetchd resolve {name}:{ud.tag}", uri)
                self._resolve(self._client(d), ud, name, offline=False)
            else:
                self._download(ud, d, name)
            return True
        except NoChecksumError:
            raise
        except bb.fetch2.BBFetchException as e:
            # NetworkAccess too: the recipe's own name may still be in the daemon's store.
            logger.debug("fetchd: mirror %s failed: %s", name, e)
            return False

    def update_mirror_links(self, ud: FetchData, origud: FetchData) -> None:
        """Put a file:// mirror's archive at origud.localpath: a hard link, else a symlink."""
        tmp = f"{origud.localpath}.fetchd-tmp-{os.getpid()}"
        bb.utils.mkdirhier(os.path.dirname(origud.localpath))
        _remove(tmp)
        try:
            os.link(os.path.realpath(ud.localpath), tmp)
        except OSError:
            os.symlink(os.path.realpath(ud.localpath), tmp)
        os.replace(tmp, origud.localpath)
        write_sidecar(origud.localpath, {"source": "mirror", "mirror": ud.localpath})

    # --- the rest of the FetchMethod interface ---------------------------------------------

    def clean(self, ud: FetchData, d: Any) -> None:
        bb.utils.remove(ud.localpath)
        bb.utils.remove(ud.localpath + SIDECAR_SUFFIX)

    def checkstatus(self, fetch: Any, ud: FetchData, d: Any) -> bool:
        bb.fetch2.check_network_access(d, f"fetchd resolve {ud.container_src}", ud.url)
        self._resolve(self._client(d), ud, ud.container_name, offline=False)
        return True

    # --- the daemon -------------------------------------------------------------------------

    def _client(self, d: Any) -> Any:
        path = socket_path(d)
        factory = self.client_factory
        if factory is None:
            factory = _default_factory()
        return factory(path)

    def _call(self, client: Any, ud: FetchData, op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call the daemon; translate its errors into BitBake's."""
        from fetchd_client import DaemonUnreachable, FetchdClientError

        try:
            result = getattr(client, op)(*args, **kwargs)
        except DaemonUnreachable as e:  # its message names the socket and how to start it
            raise FetchError(e.message, ud.url) from e
        except FetchdClientError as e:
            if e.code == "network-disabled":
                raise NetworkAccess(ud.url, f"fetchd {op} {args[0] if args else ''}: {e.message}") from e
            if e.code == "digest-mismatch":
                raise ChecksumError(f"fetchd: {e.message}", ud.url) from e
            raise FetchError(f"fetchd {op} failed ({e.code}): {e.message}", ud.url) from e
        return dict(result or {})


def socket_path(d: Any) -> str:
    """FETCHD_SOCKET from the datastore, else the client's default (environment, then
    /run/fetchd/fetchd.sock)."""
    from fetchd_client import socket_path_default

    return d.getVar("FETCHD_SOCKET") or socket_path_default()


def _default_factory() -> ClientFactory:
    from fetchd_client import Client

    return Client


def _no_network(d: Any) -> bool:
    return bool(bb.utils.to_boolean(d.getVar("BB_NO_NETWORK")))


def _report_missing_checksum(ud: FetchData, d: Any, digest: str, strict: str) -> None:
    """Isar's handling of a URL without ;digest= (strict "1" was handled before fetching)."""
    line = naming.checksum_line(ud.container_name, digest, ud.tag if ud.tag_given else None)
    bb.event.fire(MissingChecksumEvent(ud.url, sha256sum=digest.split(":", 1)[1]), d)
    if strict == "ignore":
        return
    logger.warning(f"Missing checksum for '{ud.localpath}', consider using this "
                   f"SRC_URI in the recipe:\n{line}")


def _log_event(event: dict[str, Any]) -> None:
    if event.get("event") == "warning":
        logger.warning("fetchd: %s", event.get("message"))
    elif event.get("event") == "reconnect":  # the daemon restarted mid-fetch; the client resumes
        logger.info("fetchd: %s", event.get("message"))
    else:
        logger.debug("fetchd: %s", event)


def read_sidecar(localpath: str) -> dict[str, Any] | None:
    try:
        with open(localpath + SIDECAR_SUFFIX, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_sidecar(localpath: str, data: dict[str, Any]) -> None:
    """Write ``<localpath>.fetchd`` atomically (temp + rename): never half a record."""
    path = localpath + SIDECAR_SUFFIX
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
