"""Imports a runs-etl process never uses, answered "not installed" (start-up time and memory).

Only runs-etl's own processes (the command, its validation workers) install this; importers of
``runs_etl`` (tests, notebooks) are left alone.
"""

from __future__ import annotations

import sys


class Unused:
    """An import finder that answers "not installed" for modules the command never uses but
    its libraries import when they can."""

    # pandas: pyarrow asks whether each value it converts is a DataFrame, importing pandas
    # (often installed beside a warehouse) on the first conversion: 0.2 s and ~40 MB.
    # numpy: pyarrow imports it when installed, to convert numpy arrays we never pass: 55 ms
    # and ~10 MB (pyarrow works without it).
    # httpx._main: httpx's own command line (click, rich, pygments): 45 ms; httpx falls back
    # to a stub when it is missing.
    PACKAGES = frozenset({"pandas", "numpy"})
    NAMES = frozenset({"httpx._main"})

    @classmethod
    def find_spec(cls, name: str, path=None, target=None):
        if name in cls.NAMES or name.partition(".")[0] in cls.PACKAGES:
            raise ModuleNotFoundError(f"No module named {name!r} (not used by runs-etl)",
                                      name=name)
        return None


def skip_unused_imports() -> None:
    """Install ``Unused`` for this process (a module already imported stays as it is)."""
    if Unused not in sys.meta_path:
        sys.meta_path.insert(0, Unused)  # type: ignore[arg-type]
