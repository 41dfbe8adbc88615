# Test instrumentation (INHERIT in the test build's local.conf): after do_fetch and
# do_unpack, write ${T}/fetch-audit.<task>.json with what the task's process saw:
# bb.fetch2.methods in order, and which method handles each SRC_URI entry with its
# DL_DIR path. The task itself is untouched (a postfunc, after it succeeded).

python fetch_audit() {
    import json
    urls = (d.getVar("SRC_URI") or "").split()
    fetcher = bb.fetch2.Fetch(urls, d)
    record = {
        "task": d.getVar("BB_CURRENTTASK"),
        "pid": os.getpid(),
        "methods": ["%s.%s" % (type(m).__module__, type(m).__name__) for m in bb.fetch2.methods],
        "urls": {u: {"method": "%s.%s" % (type(fetcher.ud[u].method).__module__,
                                          type(fetcher.ud[u].method).__name__),
                     "localpath": fetcher.ud[u].localpath}
                 for u in urls},
    }
    path = os.path.join(d.getVar("T"), "fetch-audit.do_%s.json" % record["task"])
    bb.utils.mkdirhier(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump(record, f)
}

do_fetch[postfuncs] += "fetch_audit"
do_unpack[postfuncs] += "fetch_audit"
