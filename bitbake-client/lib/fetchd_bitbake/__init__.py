"""BitBake side of fetchd: the ``docker://`` fetch method and its registration.

``classes/fetchd.bbclass`` calls :func:`register` from its anonymous python for
every recipe; registering is idempotent and always leaves exactly one
:class:`Fetchd` at the front of ``bb.fetch2.methods``, ahead of Isar's own
``Container`` fetcher (first ``supports()`` wins).
"""

from __future__ import annotations

from typing import Any

from . import naming
from .fetcher import Fetchd

__all__ = ["Fetchd", "naming", "register"]


def register(methods: list[Any]) -> Fetchd:
    """Put one Fetchd at index 0 of ``methods`` (BitBake's list); return it."""
    mine = [m for m in methods if type(m).__name__ == "Fetchd" and hasattr(m, "client_factory")]
    keep = mine[0] if mine else Fetchd()
    # Remove by identity: a reload of this module makes a new class, so compare names.
    methods[:] = [m for m in methods if all(m is not x for x in mine)]
    methods.insert(0, keep)
    return keep
