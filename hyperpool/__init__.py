"""hyperpool: a PostgreSQL connection pooler and query-cache proxy."""

from __future__ import annotations

import importlib
import importlib.machinery

__version__ = "0.1.0"

# The forwarding path and the cache's hit path: `HYPERPOOL_MYPYC=1 pip install .` compiles these with mypyc
# (setup.py); without it they run as plain Python, with the same behaviour.
HOT_MODULES = (
    "hyperpool.protocol.framing",
    "hyperpool.protocol.messages",
    "hyperpool.upstream",
    "hyperpool.session",
    "hyperpool.pool",
    "hyperpool.stats",
    "hyperpool.caching",
    "hyperpool.cache",
)


def compiled_modules() -> list[str]:
    """Which of HOT_MODULES run compiled (extension modules) in this process."""
    return [name for name in HOT_MODULES
            if (origin := getattr(importlib.import_module(name), "__file__", None)) is not None
            and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))]


def build() -> str:
    """``compiled (mypyc)``, ``pure Python`` or ``partly compiled (n of m)``: for logs and SHOW VERSION."""
    done = len(compiled_modules())
    if done == len(HOT_MODULES):
        return "compiled (mypyc)"
    return "pure Python" if not done else f"partly compiled ({done} of {len(HOT_MODULES)} hot modules)"
