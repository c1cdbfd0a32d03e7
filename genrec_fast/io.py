"""Atomic writes: a file (temp file in the same directory, fsync, ``os.replace``) or a whole folder."""
from __future__ import annotations

import codecs
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Union


def unicode_error_message(path: Union[str, Path], err: UnicodeDecodeError) -> str:
    """``path:line: not UTF-8 text (...)`` for a UnicodeDecodeError met while reading ``path`` as UTF-8 (the
    error itself knows only an offset into some buffer: the line is found by decoding the file again)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    where, lineno = str(path), 0
    try:
        with open(path, "rb") as f:
            for line in f:
                lineno += 1
                decoder.decode(line)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        where = f"{path}:{lineno}"
    except OSError:
        pass
    bad = err.object[err.start:err.end][:4]
    return f"{where}: not UTF-8 text ({err.reason}: byte(s) {bad.hex(' ')}); re-save the file as UTF-8"


def _umask_mode(mode: int) -> int:
    """``mode`` under the process umask: temp files / folders are made private (0600 / 0700), and the
    published file should have the permissions a plain ``open`` / ``mkdir`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write_text(path: Union[str, Path], text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _umask_mode(0o666))
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)  # the rename itself reaches the disk
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fsync_path(path: Union[str, Path]) -> None:
    """fsync a file or a folder by path (for a folder: the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and the folders themselves (so a rename publishes written data)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def recover_dir(final: Union[str, Path]) -> None:
    """Undo what a crash inside :func:`atomic_dir` can leave: a half-written ``.NAME.tmp-*`` folder is
    removed; when ``final`` is missing but its previous version ``.NAME.old-*`` survived the swap, that
    version is put back; stale old versions beside a present ``final`` are removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def atomic_dir(final: Union[str, Path], write) -> Path:
    """Write a folder as a whole: ``write(tmp)`` fills a temp folder beside ``final`` (fsynced), which then
    replaces ``final``. A folder cannot be swapped in one rename, so the previous version is first
    renamed to ``.NAME.old-<unique>`` and removed only after the new one is in place; a crash in between
    leaves it there, and :func:`recover_dir` (run first here) puts it back."""
    final = Path(os.path.normpath(final))  # 'out/x/..' -> 'out': the name below is a real folder's
    cwd = Path.cwd().resolve()
    if cwd == final.resolve() or final.resolve() in cwd.parents:
        raise ValueError(f"{final}: the current folder (or one above it) cannot be replaced as a whole; "
                         "give a folder below it")
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, _umask_mode(0o777))
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # unique: never a leftover's name
    old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}" if final.exists() else None
    try:
        if old is not None:
            os.replace(final, old)
        os.replace(tmp, final)  # if this fails, the previous version waits at `old` for recover_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
