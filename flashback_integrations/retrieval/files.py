"""The one file walker and text sniffer: the store, BM25 and the example builder read corpora alike."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import ConfigError

SNIFF_BYTES = 8192


def iter_files(
    paths: Iterable[str | Path],
    follow_symlinks: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[Path]:
    """Files under ``paths`` (folders walked, hidden entries skipped), in a stable order.

    ``include``/``exclude`` are globs on the path relative to the folder given (``whatsnew/*``; a file
    given directly is matched by its name). A symlink inside a folder that points outside it is skipped
    unless ``follow_symlinks``: ingesting ``docs/`` must not pull in whatever a link there reaches
    (``~/.ssh``, ``/etc``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            root = p.resolve()
            found = []
            for folder, dirs, names in os.walk(p, followlinks=follow_symlinks):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(folder, n) for n in names if not n.startswith(".")]
            candidates = [
                (f, f.relative_to(p).as_posix())
                for f in sorted(found)
                if f.is_file() and (follow_symlinks or f.resolve().is_relative_to(root))
            ]
        elif p.is_file():
            candidates = [(p, p.name)]
        elif p.exists():
            raise ConfigError(
                f"{p} is not a regular file or a folder (a device, FIFO or socket); pass text files or folders."
            )
        else:
            raise ConfigError(f"{p} does not exist.")
        files += [f for f, rel in candidates if _wanted(rel, include, exclude)]
    return files


def _wanted(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatch(rel, g) for g in include):
        return False
    return not (exclude and any(fnmatch.fnmatch(rel, g) for g in exclude))


def read_text(path: Path) -> tuple[str | None, str]:
    """(text, status): status is ``ok``, ``binary``, ``empty`` or ``replaced`` (not valid UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:SNIFF_BYTES]:
        return None, "binary"
    try:
        text, status = data.decode("utf-8"), "ok"
    except UnicodeDecodeError:
        text, status = data.decode("utf-8", errors="replace"), "replaced"
    if not text.strip():
        return None, "empty"
    return text, status
