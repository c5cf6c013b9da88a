"""Which build runs: pure Python in a source checkout, every hot module compiled under .ci/compiled."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import hyperpool
from hyperpool import HOT_MODULES, build, compiled_modules

REPO = Path(__file__).resolve().parent.parent


def test_the_build_is_the_one_expected() -> None:
    if os.environ.get("HYPERPOOL_EXPECT_COMPILED") == "1":  # .ci/compiled
        assert compiled_modules() == list(HOT_MODULES)
        assert build() == "compiled (mypyc)"
    else:  # a stale compiled module next to its .py would hide every edit of it
        assert compiled_modules() == [], "compiled modules in the source tree: delete hyperpool/**/*.so"
        assert build() == "pure Python"


def test_hot_modules_exist_and_setup_compiles_from_that_list() -> None:
    package = Path(hyperpool.__file__).parent
    for name in HOT_MODULES:
        assert (package.parent / (name.replace(".", "/") + ".py")).is_file(), name
    setup = ast.parse((REPO / "setup.py").read_text())
    used = {node.id for node in ast.walk(setup) if isinstance(node, ast.Name)}
    assert {"HOT_MODULES", "mypycify"} <= used  # the list lives in one place (hyperpool/__init__.py); that
    # every module on it comes out compiled is checked by test_the_build_is_the_one_expected under .ci/compiled
