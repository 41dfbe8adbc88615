# fetchd.bbclass: fetch docker:// SRC_URIs through the fetchd daemon.
#
# INHERIT += "fetchd" puts fetchd's fetch method at the front of bb.fetch2.methods
# (once), so it wins over Isar's own Container fetcher. Same URLs, same DL_DIR
# and WORKDIR names; see docs/BITBAKE.md in the fetchd repository.
#
# Variables:
#   FETCHD_SOCKET           the daemon's Unix socket (default /run/fetchd/fetchd.sock)
#   ZSTD_COMPRESSION_LEVEL  / ZSTD_DEFAULTS: Isar's; the zstd level is taken from them
#   FETCHD_ZSTD_LEVEL       computed from the two above; set it to override
#   FETCHD_REFRESH_TAGS     "1": re-run do_fetch every build for docker:// URLs
#                           without ;digest=, so a moved tag is noticed

FETCHD_SOCKET ??= ""
FETCHD_REFRESH_TAGS ??= "0"

def fetchd_setup(d):
    import os
    import sys
    import bb.fetch2
    layerdir = d.getVar("FETCHD_LAYERDIR")
    if not layerdir:
        bb.fatal("fetchd.bbclass: FETCHD_LAYERDIR is not set; add the fetchd layer "
                 "(bitbake-client/) to BBLAYERS")
    libdir = os.path.join(layerdir, "lib")
    if libdir not in sys.path:
        sys.path.insert(0, libdir)
    import fetchd_bitbake
    fetchd_bitbake.register(bb.fetch2.methods)
    return fetchd_bitbake

python () {
    fetchd = fetchd_setup(d)
    docker = [u for u in (d.getVar("SRC_URI") or "").split() if u.startswith("docker://")]
    if not docker:
        return
    # The level is part of the result: make do_fetch's signature depend on it
    # (and only on it: ZSTD_DEFAULTS also carries the host's thread count).
    if not d.getVar("FETCHD_ZSTD_LEVEL"):
        level, _ = fetchd.naming.zstd_level(d.getVar("ZSTD_DEFAULTS"),
                                            d.getVar("ZSTD_COMPRESSION_LEVEL"))
        d.setVar("FETCHD_ZSTD_LEVEL", str(level))
    d.appendVarFlag("do_fetch", "vardeps", " FETCHD_ZSTD_LEVEL PACKAGE_ARCH")
    if bb.utils.to_boolean(d.getVar("FETCHD_REFRESH_TAGS")) and \
            any(";digest=" not in u for u in docker):
        d.setVarFlag("do_fetch", "nostamp", "1")
}
