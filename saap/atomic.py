"""Atomic output writing: build an output beside its target, then rename it in place.

A stage that fails or is interrupted leaves the previous output untouched and no
half-written file or folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(target: Path, is_dir: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``; an existing folder is swapped out, then removed."""
    # mkstemp/mkdtemp create owner-only entries; give them the usual permissions
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~umask)
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``target`` on success only."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace(tmp, target)


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``target`` on success only."""
    target = Path(target)
    tmp = _tmp_sibling(target, is_dir=False)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace(tmp, target)


def write_json(target: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, whole or not at all."""
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


# characters str.splitlines() breaks a line at that JSON leaves unescaped
# (control characters below 0x20 json.dumps escapes itself)
_LINE_BREAKS = str.maketrans(
    {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def write_jsonl(target: str | os.PathLike[str], records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, whole or not at all; a line break
    inside a string (U+0085 in two MMLU questions, say) is written escaped,
    so readers that split with ``splitlines()`` see one record a line."""
    with atomic_file(target) as tmp:
        with tmp.open("w") as handle:
            for record in records:
                line = json.dumps(record, ensure_ascii=False).translate(_LINE_BREAKS)
                handle.write(line + "\n")
