"""Build hook (everything else is in pyproject.toml).

`HYPERPOOL_MYPYC=1 pip install --no-build-isolation .` (with mypy, setuptools and a C compiler installed) compiles
hyperpool.HOT_MODULES with mypyc: the same code, about 40% less CPU per forwarded transaction (README "Speed").
Without the variable the package is pure Python. `HYPERPOOL_MYPYC=1 python setup.py build_ext --inplace` compiles
a source tree in place (.ci/compiled does this in a copy: compiled modules shadow their .py files).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def ext_modules() -> list:  # type: ignore[type-arg]
    if os.environ.get("HYPERPOOL_MYPYC", "").lower() not in ("1", "true", "yes"):
        return []
    from mypyc.build import mypycify

    sys.path.insert(0, HERE)  # (a PEP 517 build does not put the source tree on the path)
    from hyperpool import HOT_MODULES

    return mypycify([name.replace(".", "/") + ".py" for name in HOT_MODULES], opt_level="3")


setup(ext_modules=ext_modules())
