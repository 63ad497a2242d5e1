"""The interpreter a server's Python processes run on (generations, app checks), and the path
that lets it import fcgi_engine even when it is a virtualenv that lacks the package."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# The directory holding the fcgi_engine package (src/ in a checkout, site-packages otherwise).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python(setting: str | None) -> str:
    """The server's `python:` setting (an interpreter or a virtualenv directory) as an
    executable; ours when unset."""
    if not setting:
        return sys.executable
    if os.path.isdir(setting):
        return os.path.join(setting, "bin", "python")
    return setting


def with_package_path(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with PACKAGE_ROOT appended to PYTHONPATH (after what it already names)."""
    out = dict(env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (out.get("PYTHONPATH", ""), PACKAGE_ROOT) if p)
    return out
