"""Whether the data plane's per-packet loops run in C (``_fastpath.c``) or in Python.

The extension is optional: it is built with the plugin when a C compiler and OpenSSL's headers are
there. ``KAIROS_TUNVPN_PURE_PYTHON=1`` turns it off (the bench compares both paths; tests run
both). The choice is read when a cipher or a coalescer is made, so every object of one data plane
agrees.
"""

from __future__ import annotations

import os

__all__ = ["FASTPATH_ENV", "GcmKey", "append_segments", "enabled"]

try:
    from ._fastpath import GcmKey, append_segments
except ImportError:  # pragma: no cover - depends on the build
    GcmKey = append_segments = None  # type: ignore[assignment,misc]

FASTPATH_ENV = "KAIROS_TUNVPN_PURE_PYTHON"


def enabled() -> bool:
    """True when the C loops are built and not turned off by :data:`FASTPATH_ENV`."""
    return GcmKey is not None and os.environ.get(FASTPATH_ENV, "") in ("", "0")
