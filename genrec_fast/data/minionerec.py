"""Reader and writer for the MiniOneRec release format.

A directory holds ``train.csv``, ``valid.csv``, ``test.csv`` (columns ``user_id,
history_item_title, item_title, history_item_id, item_id, history_item_sid, item_sid``;
history columns are Python list literals, oldest first), ``index.json`` (item id -> list
of SID tokens), ``item.json`` (item id -> {title, description, brand, categories}) and
``info.txt`` (``SID<TAB>title<TAB>item_id`` per item). List literals are parsed with
``ast.literal_eval``; a malformed row raises an error naming the file and line.
"""
from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from genrec_fast.data.types import Catalog, RecData, Sample
from genrec_fast.io import atomic_dir, unicode_error_message
from genrec_fast.sid.embed import item_text
from genrec_fast.sid.index_io import (
    CODES_FILE,
    INDEX_FILE,
    META_FILE,
    read_json_object,
    saved_codebook_sizes,
    write_index,
)
from genrec_fast.sid_tokens import parse_sid, sid_string

SPLITS = ("train", "valid", "test")
CSV_COLUMNS = (
    "user_id",
    "history_item_title",
    "item_title",
    "history_item_id",
    "item_id",
    "history_item_sid",
    "item_sid",
)
REQUIRED_COLUMNS = ("user_id", "history_item_id", "item_id")
# csv's default cap of 128 KiB per field is below a long description or history-title list
csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))


class DataFormatError(ValueError):
    """A malformed input file; the message names the file and line."""


def csv_rows(path: Path, reader):
    """The rows of ``reader`` (a csv.reader over ``path``); a csv error (e.g. a field over the size limit) or
    bytes that are not UTF-8 raise a DataFormatError naming the file and line."""
    try:
        yield from reader
    except csv.Error as e:
        raise DataFormatError(f"{path}:{reader.line_num}: {e}") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(unicode_error_message(path, e)) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        return read_json_object(path, what)
    except ValueError as e:
        raise DataFormatError(str(e)) from None


def _lines(path: Path):
    """(line number, line) of a UTF-8 text file; bytes that are not UTF-8 raise a DataFormatError naming the line."""
    with path.open(encoding="utf-8") as f:
        try:
            yield from enumerate(f, 1)
        except UnicodeDecodeError as e:
            raise DataFormatError(unicode_error_message(path, e)) from None


def _read_info(path: Path) -> Dict[str, tuple]:
    out: Dict[str, tuple] = {}
    for lineno, line in _lines(path):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise DataFormatError(f"{path}:{lineno}: expected 'SID<TAB>title<TAB>item_id', got {line[:80]!r}")
        try:
            codes = parse_sid(parts[0])
        except ValueError as e:
            raise DataFormatError(f"{path}:{lineno}: {e}") from None
        out[parts[-1].strip()] = (codes, "\t".join(parts[1:-1]))
    return out


def _sorted_ids(ids) -> List[str]:
    ids = [str(i) for i in ids]
    if all(i.isdigit() for i in ids):
        return sorted(ids, key=int)
    return ids


def load_catalog(directory: Union[str, Path]) -> Catalog:
    """The catalogue of a release directory: SIDs from index.json (else info.txt), text from item.json."""
    d = Path(directory)
    index_path, item_path, info_path = d / "index.json", d / "item.json", d / "info.txt"
    info = _read_info(info_path) if info_path.is_file() else {}
    meta = _read_json(item_path, "item id -> record") if item_path.is_file() else {}
    for item, entry in meta.items():
        if not isinstance(entry, dict):
            raise DataFormatError(f"{item_path}: item {item!r}: record must be an object, got {type(entry).__name__}")
    if index_path.is_file():
        index = _read_json(index_path, "item id -> SID tokens")
        sids = {}
        for item, toks in index.items():
            try:
                sids[str(item)] = parse_sid(toks)
            except ValueError as e:
                raise DataFormatError(f"{index_path}: item {item!r}: {e}") from None
    elif info:
        sids = {item: codes for item, (codes, _) in info.items()}
    else:
        raise FileNotFoundError(f"{d}: neither index.json nor info.txt found (MiniOneRec release format)")
    ids = _sorted_ids(sids)
    levels = {len(c) for c in sids.values()}
    if len(levels) != 1:
        raise DataFormatError(f"{index_path}: SIDs of different lengths {sorted(levels)}")
    for item, (codes, _) in info.items():
        if item in sids and list(codes) != list(sids[item]):
            raise DataFormatError(
                f"{info_path}: item {item!r} has SID {sid_string(codes)} but index.json says {sid_string(sids[item])}"
            )
    titles, texts = [], []
    for item in ids:
        entry = meta.get(item) or {}
        title = str(entry.get("title") or (info[item][1] if item in info else item))
        titles.append(title)
        texts.append(item_text({**entry, "title": title}))
    codes = np.asarray([sids[i] for i in ids], dtype=np.int32)
    return Catalog(item_ids=ids, titles=titles, texts=texts, codes=codes,
                   codebook_sizes=_saved_codebook_sizes(d, ids))


def _saved_codebook_sizes(d: Path, ids: List[str]):
    """Codebook sizes from ``sids_meta.json`` (written by ``genrec-fast sids`` and :func:`save_minionerec`);
    None without it (the release ships none: sizes are then inferred from the codes)."""
    try:
        return saved_codebook_sizes(d, ids)
    except ValueError as e:
        raise DataFormatError(str(e)) from None


def _parse_list(value: str, what: str, where: str) -> list:
    try:
        out = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise DataFormatError(f"{where}: column {what} is not a Python list literal ({e}): {value[:80]!r}") from None
    if not isinstance(out, (list, tuple)):
        raise DataFormatError(f"{where}: column {what} must be a list, got {type(out).__name__}")
    return list(out)


def read_split(path: Union[str, Path], catalog: Catalog, check_sids: bool = True) -> List[Sample]:
    """Samples of one split csv; items are mapped to catalogue indices."""
    path = Path(path)
    samples: List[Sample] = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        rows = csv_rows(path, reader)
        header = next(rows, None)
        if header is None:
            raise DataFormatError(f"{path}:1: empty file, expected a header row")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path}:1: missing column(s) {missing} in header {header}")
        col = {name: i for i, name in enumerate(header)}
        has_sid = check_sids and catalog.codes is not None and "item_sid" in col and "history_item_sid" in col
        start = reader.line_num
        for row in rows:
            where = f"{path}:{start + 1}"
            start = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(f"{where}: {len(row)} fields, expected {len(header)}")
            hist_ids = []
            for x in _parse_list(row[col["history_item_id"]], "history_item_id", where):
                if isinstance(x, bool) or not isinstance(x, (int, str)):
                    raise DataFormatError(f"{where}: history_item_id entry {x!r} is not an item id (int or str)")
                hist_ids.append(x if isinstance(x, str) else str(x))
            try:
                hist = [catalog.index(i) for i in hist_ids]
                target = catalog.index(row[col["item_id"]].strip())
            except KeyError as e:
                raise DataFormatError(f"{where}: {e.args[0]}") from None
            if has_sid:
                hist_sids = _parse_list(row[col["history_item_sid"]], "history_item_sid", where)
                if len(hist_sids) != len(hist):
                    raise DataFormatError(
                        f"{where}: {len(hist)} history items but {len(hist_sids)} history SIDs"
                    )
                for idx, s in zip((*hist, target), (*hist_sids, row[col["item_sid"]])):
                    if sid_string(catalog.codes[idx]) != str(s).strip():
                        raise DataFormatError(
                            f"{where}: item {catalog.item_ids[idx]} has SID {s!r} here but "
                            f"{sid_string(catalog.codes[idx])} in the catalogue"
                        )
            samples.append(Sample(user_id=row[col["user_id"]], history=hist, target=target))
    return samples


def load_minionerec(directory: Union[str, Path], check_sids: bool = True) -> RecData:
    """Read a MiniOneRec release directory into :class:`RecData` (items indexed 0..N-1)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"MiniOneRec data directory not found: {d}")
    catalog = load_catalog(d)
    splits = {}
    for split in SPLITS:
        p = d / f"{split}.csv"
        if not p.is_file():
            raise FileNotFoundError(f"{d}: {split}.csv missing (MiniOneRec release format)")
        splits[split] = read_split(p, catalog, check_sids=check_sids)
    return RecData(catalog=catalog, **splits)


def _id_literal(item_id: str):
    """An id as the release writes it in history lists: an int when it reads back as the same string."""
    return int(item_id) if item_id.isdigit() and str(int(item_id)) == item_id else item_id


def _split_csv(samples: Sequence[Sample], catalog: Catalog) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for s in samples:
        w.writerow([
            s.user_id,
            repr([catalog.titles[i] for i in s.history]),
            catalog.titles[s.target],
            repr([_id_literal(catalog.item_ids[i]) for i in s.history]),
            catalog.item_ids[s.target],
            repr([sid_string(catalog.codes[i]) for i in s.history]),
            sid_string(catalog.codes[s.target]),
        ])
    return buf.getvalue()


def dataset_files() -> tuple:
    """The names :func:`save_minionerec` writes into a dataset folder."""
    return (*(f"{split}.csv" for split in SPLITS), INDEX_FILE, CODES_FILE, META_FILE, "item.json", "info.txt")


def check_dataset_dir(directory: Union[str, Path]) -> Path:
    """``directory`` as a Path, if :func:`save_minionerec` may replace it: a ValueError when it holds
    files that are not a dataset's (they would be lost)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{d} exists and is not a folder")
    if d.exists():
        other = sorted(p.name for p in d.iterdir() if p.name not in dataset_files())
        if other:
            raise ValueError(f"{d} holds files that are not part of a dataset ({', '.join(other[:5])}); the dataset "
                             "replaces the folder as a whole: give a new folder (or one holding a dataset)")
    return d


def save_minionerec(data: RecData, directory: Union[str, Path], sid_report: Optional[dict] = None) -> Path:
    """Write ``data`` (with SIDs) in the release format; the folder is written as a whole
    (:func:`genrec_fast.io.atomic_dir`): a failure leaves the previous version, never a mix of old and new
    files. An existing folder is replaced, so one that holds other files is refused.

    Besides the release's files, ``codes.npy`` and ``sids_meta.json`` (``genrec_fast.sid.index_io``) keep
    the codebook sizes, so a reload gives the same SID vocabulary (unused codes and non-power-of-2
    sizes included); ``sid_report`` goes into the latter.
    """
    cat = data.catalog
    if cat.codes is None:
        raise ValueError("save_minionerec needs a catalogue with SIDs (catalog.codes is None)")
    data.validate()
    for item, title in zip(cat.item_ids, cat.titles):  # info.txt is one 'SID<TAB>title<TAB>item_id' line per item
        for what, value in (("id", item), ("title", title)):
            if any(c in value for c in "\t\r\n"):
                raise ValueError(f"save_minionerec: item {item!r}: its {what} {value[:80]!r} holds a tab or line "
                                 "break, which info.txt cannot hold")
    d = check_dataset_dir(directory)

    def write(tmp: Path) -> None:
        def put(name: str, text: str) -> None:
            (tmp / name).write_bytes(text.encode("utf-8"))

        for split in SPLITS:
            put(f"{split}.csv", _split_csv(getattr(data, split), cat))
        # index.json, codes.npy, sids_meta.json
        write_index(tmp, cat.item_ids, cat.codes, cat.codebook_sizes, sid_report)
        put("item.json", json.dumps({i: {"title": t, "text": x}
                                     for i, t, x in zip(cat.item_ids, cat.titles, cat.texts)}, indent=1))
        put("info.txt", "".join(f"{sid_string(c)}\t{t}\t{i}\n"
                                for i, t, c in zip(cat.item_ids, cat.titles, cat.codes)))

    return atomic_dir(d, write)
