"""``python -m fetchd``: the same as the ``fetchd`` command."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
