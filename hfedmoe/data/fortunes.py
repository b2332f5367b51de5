"""A larger builtin dataset: the fortune-cookie collections of Debian's ``fortunes`` packages.

Source ``"fortunes"`` reads the files that ``apt-get install fortunes fortunes-min`` puts in
``/usr/share/games/fortunes`` (or the directory named by the ``HFEDMOE_FORTUNES_DIR``
environment variable). Each file without an extension is one category (``computers``,
``literature``, ``songs-poems``, ...), its entries separated by lines holding only ``%``;
``*.dat`` files are ``strfile`` indexes and ``*.u8`` files links or UTF-8 copies, so both are
skipped, as is any sub-directory (the offensive collection lives in ``off/``).

**Topic classification** (:func:`fortunes_classification`): text = the entry, label = the file
name. Each entry is cleaned: backspace overstrike, which old terminals used for bold and
underline (``X\\bX``, ``_\\bX``, ``____\\b\\b\\b\\bWORD``), is replayed as a terminal shows it,
and whitespace runs collapse to one space. Empty entries are dropped, and so are exact
duplicates, wherever they are (the first one, in reading order, is kept, so a text never sits
under two labels). Categories with fewer than ``min_examples`` (default 50) texts are dropped;
with the Debian 1:1.99.1 packages that leaves 39 categories and about 15,000 texts (dropped:
``ascii-art``, ``magic``, ``pratchett``, ``translate-me``).

The files are decoded as UTF-8 with ``errors="replace"`` (a few are Latin-1) and read in a fixed
order (files sorted by name, entries in file order), so a config gives the same dataset on
every machine with the same packages.
"""

from __future__ import annotations

import os
from collections import Counter
from functools import lru_cache
from pathlib import Path

from hfedmoe.data.dataset import TextDataset, encode_labels
from hfedmoe.errors import DataError

__all__ = ["DEFAULT_DIR", "ENV_DIR", "MIN_EXAMPLES", "clean_entry", "fortunes_classification",
           "fortunes_dir", "read_fortunes"]

DEFAULT_DIR = "/usr/share/games/fortunes"
ENV_DIR = "HFEDMOE_FORTUNES_DIR"  # overrides DEFAULT_DIR
MIN_EXAMPLES = 50  # a category needs this many distinct texts to stay in the task


def fortunes_dir() -> Path:
    """The fortunes directory: ``$HFEDMOE_FORTUNES_DIR`` if set, else ``DEFAULT_DIR``."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _overstrike(line: str) -> str:
    """``line`` as a terminal shows it: a backspace steps back and the next character
    overwrites, except that an underscore never hides the character under it."""
    out: list[str] = []
    pos = 0
    for ch in line:
        if ch == "\b":
            pos = max(0, pos - 1)
            continue
        if pos < len(out):
            if ch != "_":
                out[pos] = ch
        else:
            out.append(ch)
        pos += 1
    return "".join(out)


def clean_entry(entry: str) -> str:
    """One fortune as plain text: overstrike replayed, whitespace runs collapsed."""
    if "\b" in entry:
        entry = "\n".join(_overstrike(line) for line in entry.split("\n"))
    return " ".join(entry.split())


def _entries(path: Path) -> list[str]:
    try:
        raw = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: unreadable fortune file ({exc})") from exc
    entries: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [clean_entry(e) for e in entries]


def _category_files(d: Path) -> list[Path]:
    if not d.is_dir():
        raise DataError(f"{d}: no fortunes directory; install the data with "
                        f"`apt-get install fortunes fortunes-min` or set {ENV_DIR} to a "
                        "directory of fortune files")
    files = sorted(p for p in d.iterdir()
                   if p.is_file() and "." not in p.name and not p.name.startswith("."))
    if not files:
        raise DataError(f"{d}: no fortune files (files without an extension); install them "
                        "with `apt-get install fortunes fortunes-min`")
    return files


def read_fortunes(directory: str | Path | None = None) -> list[tuple[str, str]]:
    """Every distinct non-empty fortune with its category, files sorted, entries in file order.

    Args:
        directory: A directory of fortune files; :func:`fortunes_dir` by default.

    Returns:
        ``(category, text)`` pairs, cleaned (:func:`clean_entry`), each text once (first kept).

    Raises:
        DataError: The directory is missing, holds no fortune file, or a file is unreadable.
    """
    d = Path(directory) if directory is not None else fortunes_dir()
    return list(_read_dir(d.resolve()))


@lru_cache(maxsize=4)
def _read_dir(d: Path) -> tuple[tuple[str, str], ...]:
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for path in _category_files(d):
        for text in _entries(path):
            if text and text not in seen:
                seen.add(text)
                out.append((path.name, text))
    return tuple(out)


def fortunes_classification(min_examples: int = MIN_EXAMPLES,
                            directory: str | Path | None = None) -> TextDataset:
    """The fortunes as topic classification (entry -> its file's name).

    Args:
        min_examples: Categories with fewer distinct texts are dropped.
        directory: Fortunes directory; :func:`fortunes_dir` by default.

    Returns:
        De-duplicated texts in reading order, labelled by category (sorted vocabulary).

    Raises:
        DataError: No fortunes directory or files, or no category with ``min_examples`` texts.
    """
    pairs = read_fortunes(directory)
    per_category = Counter(c for c, _ in pairs)
    kept = [(c, t) for c, t in pairs if per_category[c] >= min_examples]
    if not kept:
        raise DataError(f"no fortune category has {min_examples} distinct texts")
    ids, names = encode_labels([c for c, _ in kept])
    return TextDataset(tuple(t for _, t in kept), ids, names)
