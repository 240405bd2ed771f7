"""The built-in corpus: the running Python's own standard-library source.

Every machine with Python has it, so it gives real text for the quickstart
and the tests without a download.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files in a fixed order (third-party packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    if not files:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_texts(max_bytes: int | None = None) -> Iterator[str]:
    """Yields each standard-library file's text, stopping after ``max_bytes`` of UTF-8 in total."""
    total = 0
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text.encode("utf-8"))
        yield text
        if max_bytes is not None and total >= max_bytes:
            return
