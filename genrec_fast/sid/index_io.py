"""SID index files: ``index.json`` (MiniOneRec format), ``codes.npy`` and ``sids_meta.json``.

``index.json`` maps item id -> ``["<a_12>", "<b_3>", "<c_200>"]`` and is what the MiniOneRec
release ships; ``codes.npy`` is the same table as int32 [N, L] in index.json order;
``sids_meta.json`` records the item id order, the codebook sizes (so a trie / tokenizer
knows the full vocabulary, including unused codes) and the build report. Every file is
written atomically.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from genrec_fast.io import atomic_write_bytes, atomic_write_text, unicode_error_message
from genrec_fast.sid_tokens import parse_sid, sid_tokens

INDEX_FILE = "index.json"
CODES_FILE = "codes.npy"
META_FILE = "sids_meta.json"


@dataclass
class SIDIndex:
    item_ids: List[str]
    codes: np.ndarray  # [N, L] int32, row i = item_ids[i]
    codebook_sizes: Tuple[int, ...]


def save_npy_atomic(path: Union[str, Path], array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_json_object(path: Path, what: str) -> dict:
    """A non-empty JSON object from ``path``; errors name the file (and line for bad JSON), a key that
    appears twice in one object (JSON would keep only the last) and bytes that are not UTF-8."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(unicode_error_message(path, e)) from None
    except _DuplicateKey as e:
        raise ValueError(f"{path}: key {e.args[0]!r} appears twice in one object (JSON keeps only the last)") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON object of {what}")
    return data


def _check_table(item_ids: Sequence[str], codes: np.ndarray, codebook_sizes: Sequence[int]) -> None:
    if codes.ndim != 2 or codes.shape[0] != len(item_ids) or codes.shape[1] == 0:
        raise ValueError(f"codes must be [{len(item_ids)}, L>=1], got shape {codes.shape}")
    if len(codebook_sizes) != codes.shape[1]:
        raise ValueError(f"{len(codebook_sizes)} codebook sizes for {codes.shape[1]} levels")
    seen = {}
    for i, item in enumerate(item_ids):
        if item in seen:
            raise ValueError(f"item id {item!r} appears twice (rows {seen[item]} and {i})")
        seen[item] = i
    for lvl, k in enumerate(codebook_sizes):
        bad = np.where((codes[:, lvl] < 0) | (codes[:, lvl] >= k))[0]
        if bad.size:
            raise ValueError(f"level {lvl}: codes outside [0, {k}) in rows {bad[:10].tolist()}")


def write_index(
    out_dir: Union[str, Path],
    item_ids: Sequence,
    codes,
    codebook_sizes: Optional[Sequence[int]] = None,
    report: Optional[dict] = None,
) -> Path:
    """Write ``index.json``, ``codes.npy`` and ``sids_meta.json`` into ``out_dir``; returns the index path.

    ``codebook_sizes`` defaults to max code + 1 per level (pass it to keep unused codes in the vocabulary).
    """
    item_ids = [str(i) for i in item_ids]
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    codes = codes.astype(np.int32)
    if codebook_sizes is None:
        codebook_sizes = (codes.max(axis=0) + 1).tolist() if codes.size else []
    codebook_sizes = tuple(int(k) for k in codebook_sizes)
    _check_table(item_ids, codes, codebook_sizes)
    out = Path(out_dir)
    index_text = json.dumps({item: sid_tokens(row) for item, row in zip(item_ids, codes.tolist())})
    atomic_write_text(out / INDEX_FILE, index_text)
    save_npy_atomic(out / CODES_FILE, codes)
    # the three files are each atomic, not as a set: the checksum ties the metadata to its index.json
    meta = {"item_ids": item_ids, "codebook_sizes": list(codebook_sizes), "report": report or {},
            "index_sha256": hashlib.sha256(index_text.encode("utf-8")).hexdigest()}
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1, default=float))
    return out / INDEX_FILE


def saved_codebook_sizes(directory: Union[str, Path], item_ids: Sequence[str]) -> Optional[Tuple[int, ...]]:
    """The codebook sizes recorded in ``directory/sids_meta.json`` for these items, or None without one.

    Raises ValueError naming the file when it is malformed or belongs to another ``index.json`` (a
    checksum mismatch, or other item ids: stale metadata)."""
    d = Path(directory)
    meta_path = d / META_FILE
    if not meta_path.is_file():
        return None
    meta = read_json_object(meta_path, "SID metadata")
    if not isinstance(meta.get("codebook_sizes"), list) or not isinstance(meta.get("item_ids"), list):
        raise ValueError(f"{meta_path}: expected 'item_ids' and 'codebook_sizes' lists")
    digest = meta.get("index_sha256")
    if digest is not None and (d / INDEX_FILE).is_file() and \
            hashlib.sha256((d / INDEX_FILE).read_bytes()).hexdigest() != digest:
        raise ValueError(f"{meta_path}: written for another {INDEX_FILE} (stale metadata?)")
    if sorted(str(i) for i in meta["item_ids"]) != sorted(str(i) for i in item_ids):
        raise ValueError(f"{meta_path}: its item ids are not those of {d / INDEX_FILE} (stale metadata?)")
    return tuple(int(k) for k in meta["codebook_sizes"])


def read_index(path: Union[str, Path], codebook_sizes: Optional[Sequence[int]] = None) -> SIDIndex:
    """Read an ``index.json`` (or a directory holding one) in file order.

    Codebook sizes: the argument, else ``sids_meta.json`` beside the index, else max code + 1
    per level. ``codes.npy`` is not needed (index.json is the source of truth).
    """
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    data = read_json_object(path, "item id -> SID tokens")
    item_ids, rows = [], []
    for item, toks in data.items():
        try:
            codes = parse_sid(toks)
        except ValueError as e:
            raise ValueError(f"{path}: item {item!r}: {e}") from None
        if rows and len(codes) != len(rows[0]):
            raise ValueError(f"{path}: item {item!r} has {len(codes)} SID levels, item {item_ids[0]!r} has "
                             f"{len(rows[0])}")
        item_ids.append(str(item))
        rows.append(codes)
    codes = np.asarray(rows, dtype=np.int32)
    if codebook_sizes is None and path.name == INDEX_FILE:
        codebook_sizes = saved_codebook_sizes(path.parent, item_ids)
    if codebook_sizes is None:
        codebook_sizes = (codes.max(axis=0) + 1).tolist()
    codebook_sizes = tuple(int(k) for k in codebook_sizes)
    try:
        _check_table(item_ids, codes, codebook_sizes)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return SIDIndex(item_ids=item_ids, codes=codes, codebook_sizes=codebook_sizes)
