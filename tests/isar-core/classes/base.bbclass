# The base class of the test core layer: Isar's do_fetch / do_unpack semantics
# (meta/classes-global/base.bbclass), written for these tests.
#
# - BBPATH's lib/ directories are put on sys.path before any class is inherited, so a
#   bbclass can `import` a module of its layer (Isar: oe_import, for container_fetcher).
# - do_fetch: bb.fetch2.Fetch(SRC_URI, d).download(), in DL_DIR, with network.
# - do_unpack: bb.fetch2.Fetch(SRC_URI, d).unpack(WORKDIR), without network (BitBake runs
#   it in a new network namespace).
# - a fetch error is fatal for the task (bb.fatal with the fetcher's message).

def isar_core_libs(d):
    import sys
    for layer in (d.getVar("BBPATH") or "").split(":"):
        lib = os.path.join(layer, "lib")
        if layer and os.path.isdir(lib) and lib not in sys.path:
            sys.path.insert(0, lib)
    return ""

ISAR_CORE_LIBS := "${@isar_core_libs(d)}"

addtask showdata
do_showdata[nostamp] = "1"
python do_showdata() {
    import sys
    bb.data.emit_env(sys.__stdout__, d, True)
}

do_fetch[dirs] = "${DL_DIR}"
do_fetch[file-checksums] = "${@bb.fetch.get_checksum_file_list(d)}"
do_fetch[vardeps] += "SRCREV"
do_fetch[network] = "${TASK_USE_NETWORK}"

python do_fetch() {
    src_uri = (d.getVar("SRC_URI") or "").split()
    if not src_uri:
        return
    try:
        bb.fetch2.Fetch(src_uri, d).download()
    except bb.fetch2.BBFetchException as e:
        bb.fatal(str(e))
}
addtask fetch

do_unpack[dirs] = "${WORKDIR}"

python do_unpack() {
    src_uri = (d.getVar("SRC_URI") or "").split()
    if not src_uri:
        return
    try:
        bb.fetch2.Fetch(src_uri, d).unpack(d.getVar("WORKDIR"))
    except bb.fetch2.BBFetchException as e:
        bb.fatal(str(e))
}
addtask unpack after do_fetch before do_build

do_build[noexec] = "1"
do_build () {
    :
}
addtask build
