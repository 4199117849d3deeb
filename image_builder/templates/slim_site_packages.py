"""Remove what no one runs from an installed environment (FLOps oci builder).

Usage: ``python -I -B slim_site_packages.py VENV`` (standard library only: it runs with the
image's interpreter inside a build step, and with the manager's for images assembled on the
build host). Prints one line: what was removed and how many bytes that freed.

Removed: the test suites shipped inside the big scientific packages (:data:`SLIM_PACKAGES`):
every directory named ``tests`` or ``test`` below their top-level package that holds test
modules (``test_*.py``, ``*_test.py`` or ``conftest.py``), with its bytecode. None of them is
imported by the packages themselves: checked by searching their other modules for imports of
a ``tests`` package (numpy 2.4, scipy 1.17, pandas 3.1, scikit-learn 1.9, pyarrow 25,
matplotlib 3.11; the one hit, ``scipy/special/_precompute``, is a maintainer script).
``numpy.testing``, ``pandas._testing`` and ``matplotlib.testing`` are libraries, not suites,
and stay. Bytecode (``__pycache__``) of everything else stays: it saves the compile at start.
Measured: 108 MB of the learner environment of the scikit-learn example (pandas' suite 46 MB).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

SLIM_PACKAGES = ("numpy", "scipy", "pandas", "sklearn", "pyarrow", "matplotlib")
"""Top-level packages whose test suites are removed."""

TEST_DIR_NAMES = ("tests", "test")


def is_test_suite(directory: Path) -> bool:
    """True if ``directory`` (named ``tests``/``test``) holds a test module at any depth."""
    for _, _, files in os.walk(directory):
        for name in files:
            if name == "conftest.py" or (
                name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))
            ):
                return True
    return False


def find_test_suites(site_packages: Path) -> list[Path]:
    """The test-suite directories of :data:`SLIM_PACKAGES` in ``site_packages``, outermost
    only (a suite nested in another is removed with it), sorted."""
    found: list[Path] = []
    for package in SLIM_PACKAGES:
        root = site_packages / package
        if not root.is_dir() or root.is_symlink():
            continue
        for current, directories, _ in os.walk(root):
            for name in list(directories):
                path = Path(current) / name
                if name in TEST_DIR_NAMES and is_test_suite(path):
                    found.append(path)
                    directories.remove(name)  # do not descend into a suite being removed
    return sorted(found)


def tree_size(path: Path) -> int:
    """Bytes of the regular files under ``path`` (symlinks not followed)."""
    total = 0
    for current, _, files in os.walk(path):
        for name in files:
            file = Path(current) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


def slim(venv: Path) -> tuple[int, int]:
    """Remove the test suites from every ``lib/python*/site-packages`` of ``venv``.

    Returns ``(directories removed, bytes freed)``.
    """
    removed = freed = 0
    for site_packages in sorted(venv.glob("lib/python*/site-packages")):
        for suite in find_test_suites(site_packages):
            freed += tree_size(suite)
            shutil.rmtree(suite)
            removed += 1
    return removed, freed


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} VENV", file=sys.stderr)
        return 2
    removed, freed = slim(Path(argv[1]))
    print(f"slim_site_packages: removed {removed} test suites ({freed / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
