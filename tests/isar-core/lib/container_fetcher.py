"""A stand-in for Isar's ``container_fetcher.Container`` (meta/lib/container_fetcher.py).

It claims ``docker://`` URLs exactly as Isar's does (``supports()``), and fails loudly
in every other hook: if BitBake ever picks it over fetchd's method, the parse or the
task fails with this module's name in the message.
"""

import bb.fetch2


class IsarContainerUsed(bb.fetch2.FetchError):
    """Raised when Isar's fetcher was chosen for a URL (fetchd's method should have been)."""


class Container(bb.fetch2.FetchMethod):
    def supports(self, ud, d):
        return ud.type in ["docker"]

    def _used(self, ud, what):
        raise IsarContainerUsed(
            f"Isar's container fetcher (the test stand-in) was chosen for {ud.url} ({what}); "
            "fetchd's method must come first in bb.fetch2.methods", ud.url)

    def urldata_init(self, ud, d):
        self._used(ud, "urldata_init")

    def download(self, ud, d):
        self._used(ud, "download")

    def unpack(self, ud, rootdir, d):
        self._used(ud, "unpack")

    def need_update(self, ud, d):
        self._used(ud, "need_update")

    def clean(self, ud, d):
        self._used(ud, "clean")
