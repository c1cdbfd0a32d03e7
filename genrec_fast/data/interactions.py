"""Generic interaction logs (user, item, timestamp) + item metadata -> next-item samples.

Each user's interactions are ordered by time (ties keep file order); every position t >= 1
gives a sample (history = the previous ``max_history`` items, target = item t). Splits:
``"leave_one_out"`` (per user: last sample -> test, second to last -> valid, rest -> train)
or ``"temporal"`` (all samples ordered globally by the target's timestamp, cut 80/10/10 by
default, as in the MiniOneRec release).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from genrec_fast.data.minionerec import DataFormatError, csv_rows
from genrec_fast.data.types import Catalog, RecData, Sample

SPLIT_MODES = ("leave_one_out", "temporal")
ItemText = Callable[[Dict[str, str]], Tuple[str, str]]


def build_samples(
    users: Sequence[str],
    items: Sequence[int],
    timestamps: Sequence[float],
    max_history: int = 10,
    split: str = "leave_one_out",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
) -> Tuple[List[Sample], List[Sample], List[Sample]]:
    """Turn parallel arrays of interactions into (train, valid, test) samples."""
    if split not in SPLIT_MODES:
        raise ValueError(f"split must be one of {SPLIT_MODES}, got {split!r}")
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if not (len(users) == len(items) == len(timestamps)):
        raise ValueError(f"users/items/timestamps lengths differ: {len(users)}, {len(items)}, {len(timestamps)}")
    order = np.lexsort((np.arange(len(users)), np.asarray(timestamps, dtype=np.float64)))
    seqs: Dict[str, List[Tuple[int, float]]] = {}
    for i in order:
        seqs.setdefault(str(users[i]), []).append((int(items[i]), float(timestamps[i])))
    train: List[Sample] = []
    valid: List[Sample] = []
    test: List[Sample] = []
    timed: List[Tuple[float, int, Sample]] = []
    for user, seq in seqs.items():
        ids = [it for it, _ in seq]
        for t in range(1, len(ids)):
            s = Sample(user_id=user, history=ids[max(0, t - max_history):t], target=ids[t])
            if split == "temporal":
                timed.append((seq[t][1], len(timed), s))
            elif t == len(ids) - 1:
                test.append(s)
            elif t == len(ids) - 2:
                valid.append(s)
            else:
                train.append(s)
    if split == "temporal":
        if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
            raise ValueError(f"valid_frac={valid_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
        timed.sort(key=lambda x: (x[0], x[1]))
        n = len(timed)
        n_test, n_valid = int(round(n * test_frac)), int(round(n * valid_frac))
        n_train = n - n_test - n_valid
        train = [s for _, _, s in timed[:n_train]]
        valid = [s for _, _, s in timed[n_train:n_train + n_valid]]
        test = [s for _, _, s in timed[n_train + n_valid:]]
    return train, valid, test


def _reader(path: Path, sep: Optional[str]):
    """(file, csv reader, its rows, header) of a header-ed CSV/TSV (UTF-8, a byte order mark allowed)."""
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".inter", ".item", ".txt") else ","
    f = path.open(encoding="utf-8-sig", newline="")
    reader = csv.reader(f, delimiter=sep)
    rows = csv_rows(path, reader)
    try:
        header = next(rows, None)
    except BaseException:
        f.close()
        raise
    if header is None:
        f.close()
        raise DataFormatError(f"{path}:1: empty file, expected a header row")
    # RecBole atomic files write 'name:type' headers
    header = [h.strip().split(":")[0] for h in header]
    return f, reader, rows, header


def _columns(path: Path, header: List[str], wanted: Sequence[str]) -> Dict[str, int]:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataFormatError(f"{path}:1: missing column(s) {missing}; header is {header}")
    return {c: header.index(c) for c in header}


def _one_line(title: str) -> str:
    """A title with its runs of whitespace (tabs, line breaks) collapsed to one space: info.txt holds one
    'SID<TAB>title<TAB>item_id' line per item."""
    return " ".join(title.split())


def _default_item_text(title_col: str, item_col: str = "item_id") -> ItemText:
    def item_text(row: Dict[str, str]) -> Tuple[str, str]:
        title = row.get(title_col, "").strip()
        text = ". ".join(v.strip() for k, v in row.items() if v.strip() and k not in (item_col, title_col))
        return title, f"{title}. {text}" if text else title

    return item_text


def load_interactions(
    interactions: Union[str, Path],
    items: Union[str, Path, None] = None,
    *,
    sep: Optional[str] = None,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    title_col: str = "title",
    item_text: Optional[ItemText] = None,
    max_history: int = 10,
    split: str = "leave_one_out",
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    max_users: Optional[int] = None,
    max_interactions_per_user: Optional[int] = None,
    seed: int = 0,
) -> RecData:
    """Read a header-ed CSV/TSV interaction log (+ optional item metadata file) into :class:`RecData`.

    ``item_text(row) -> (title, text)`` builds an item's title and embedding text from its
    metadata row (default: the ``title_col`` column, and all columns joined). ``max_users``
    keeps a seeded random subset of users; ``max_interactions_per_user`` keeps each user's
    most recent interactions. The catalogue holds the items that occur in the kept
    interactions, in metadata-file order (else first-seen order), indexed 0..N-1. Titles have their
    whitespace (tabs, line breaks) collapsed to single spaces. A log that gives no sample (no user with
    two interactions) is an error.
    """
    _check_load_options(sep, max_users, max_interactions_per_user)
    inter_path = Path(interactions)
    users, item_keys, times, lines = _read_log(inter_path, sep, user_col, item_col, time_col)
    idx = _kept_rows(users, times, max_users, max_interactions_per_user, seed)
    meta_rows: Dict[str, Dict[str, str]] = {}
    if items is not None:
        item_path = Path(items)
        # the default text needs the title column: without it every title would silently be the item id
        meta_rows = _read_item_rows(item_path, sep, item_col, None if item_text is not None else title_col)
        for i in idx:
            if item_keys[i] not in meta_rows:
                raise DataFormatError(
                    f"{inter_path}:{lines[i]}: item {item_keys[i]!r} has no row in {item_path}"
                )
        used = {item_keys[i] for i in idx}
        ids = [k for k in meta_rows if k in used]  # metadata-file order
    else:
        seen = set()
        ids = [k for k in (item_keys[i] for i in idx) if not (k in seen or seen.add(k))]
    catalog = _catalog(ids, meta_rows, item_text or _default_item_text(title_col, item_col), item_col)
    train, valid, test = build_samples(
        [users[i] for i in idx],
        [catalog.index(item_keys[i]) for i in idx],
        [times[i] for i in idx],
        max_history=max_history,
        split=split,
        valid_frac=valid_frac,
        test_frac=test_frac,
    )
    if not (train or valid or test):
        raise DataFormatError(f"{inter_path}: no samples: none of the {len(set(users[i] for i in idx))} kept users "
                              "has two interactions (a sample is a history of at least one item and a target)")
    return RecData(catalog=catalog, train=train, valid=valid, test=test)


def _check_load_options(sep: Optional[str], max_users: Optional[int],
                        max_interactions_per_user: Optional[int]) -> None:
    if sep is not None and len(sep) != 1:
        raise ValueError(f"sep (--sep) must be a single character, got {sep!r}")
    for name, value in (("max_users", max_users), ("max_interactions_per_user", max_interactions_per_user)):
        if value is not None and value < 1:
            raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 1, got {value}")


def _read_log(path: Path, sep: Optional[str], user_col: str, item_col: str,
              time_col: str) -> Tuple[List[str], List[str], List[float], List[int]]:
    """(users, item ids, timestamps, file line numbers) of the interaction log's rows, in file order; a row
    with the wrong number of fields, a timestamp that is not a finite number, an empty user or item, or an
    item id holding a tab or line break is an error naming its line."""
    users: List[str] = []
    item_keys: List[str] = []
    times: List[float] = []
    lines: List[int] = []
    f, reader, rows, header = _reader(path, sep)
    with f:
        col = _columns(path, header, (user_col, item_col, time_col))
        ui, ii, ti = col[user_col], col[item_col], col[time_col]
        for row in rows:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise DataFormatError(f"{where}: {len(row)} fields, expected {len(header)}")
            ts = _timestamp(row[ti], where)
            user, item = row[ui].strip(), row[ii].strip()
            for name, value in ((user_col, user), (item_col, item)):
                if not value:
                    raise DataFormatError(f"{where}: column {name!r} is empty")
            if any(c in item for c in "\t\r\n"):
                raise DataFormatError(f"{where}: column {item_col!r}: item id {item!r} holds a tab or line break")
            users.append(user)
            item_keys.append(item)
            times.append(ts)
            lines.append(reader.line_num)
    if not users:
        raise DataFormatError(f"{path}: no interactions")
    return users, item_keys, times, lines


def _timestamp(value: str, where: str) -> float:
    try:
        ts = float(value)
    except ValueError:
        raise DataFormatError(f"{where}: timestamp {value!r} is not a number") from None
    if not math.isfinite(ts):
        raise DataFormatError(f"{where}: timestamp {value!r} is not a finite number")
    return ts


def _kept_rows(users: Sequence[str], times: Sequence[float], max_users: Optional[int],
               max_interactions_per_user: Optional[int], seed: int) -> np.ndarray:
    """Indices of the interactions kept: those of a seeded random subset of ``max_users`` users, and of
    each user's ``max_interactions_per_user`` most recent interactions (None: no limit)."""
    keep = np.ones(len(users), dtype=bool)
    if max_users is not None:
        uniq = sorted(set(users))
        if max_users < len(uniq):
            chosen = set(np.random.default_rng(seed).choice(len(uniq), size=max_users, replace=False).tolist())
            chosen_users = {uniq[i] for i in chosen}
            keep &= np.fromiter((u in chosen_users for u in users), dtype=bool, count=len(users))
    if max_interactions_per_user is not None:
        order = np.lexsort((np.arange(len(users)), np.asarray(times)))[::-1]
        counts: Dict[str, int] = {}
        for i in order:
            if keep[i]:
                c = counts.get(users[i], 0)
                keep[i] = c < max_interactions_per_user
                counts[users[i]] = c + 1
    return np.flatnonzero(keep)


def _read_item_rows(path: Path, sep: Optional[str], item_col: str,
                    title_col: Optional[str]) -> Dict[str, Dict[str, str]]:
    """Item id -> its metadata row (column -> value), in file order; the columns ``item_col`` (and
    ``title_col`` unless None) are required, an item listed twice is an error."""
    meta_rows: Dict[str, Dict[str, str]] = {}
    f, reader, rows, header = _reader(path, sep)
    with f:
        _columns(path, header, (item_col,) if title_col is None else (item_col, title_col))
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise DataFormatError(f"{path}:{reader.line_num}: {len(row)} fields, expected {len(header)}")
            rec = dict(zip(header, row))
            key = rec[item_col].strip()
            if key in meta_rows:
                raise DataFormatError(f"{path}:{reader.line_num}: item {key!r} listed twice")
            meta_rows[key] = rec
    return meta_rows


def _catalog(ids: List[str], meta_rows: Dict[str, Dict[str, str]], text_fn: ItemText, item_col: str) -> Catalog:
    """The catalogue of ``ids``: titles and texts from their metadata rows (an item without one: its id)."""
    titles, texts = [], []
    for k in ids:
        row = meta_rows.get(k, {item_col: k})
        title, text = text_fn(row) if k in meta_rows else (k, k)
        titles.append(_one_line(title) or k)
        texts.append(text or title or k)
    return Catalog(item_ids=ids, titles=titles, texts=texts)


def user_sequences(samples: Sequence[Sample], max_history: Optional[int] = None) -> List[List[int]]:
    """Chain sliding-window samples back into item sequences (oldest first), in the samples' order.

    A sample extends its user's current sequence when its history equals that sequence's last
    ``min(len, max_history)`` items (``max_history`` None: the longest history among the samples);
    otherwise it starts a new sequence (history + target), so nothing is made up. Every sample is a
    position of exactly one sequence, with its own history as the items before it.
    """
    if max_history is None:
        max_history = max([len(s.history) for s in samples] + [1])
    seqs: List[List[int]] = []
    current: Dict[object, int] = {}
    for s in samples:
        h = [int(x) for x in s.history]
        k = current.get(s.user_id)
        if k is not None:
            seq = seqs[k]
            n = min(len(seq), max_history)
            if len(h) == n and seq[len(seq) - n:] == h:
                seq.append(int(s.target))
                continue
        current[s.user_id] = len(seqs)
        seqs.append(h + [int(s.target)])
    return seqs


def sequence_windows(seq: Sequence[int], max_len: int, stride: Optional[int] = None) -> List[List[int]]:
    """Windows of <= ``max_len`` items of one sequence, newest first: one ending at its newest item and one
    every ``stride`` items before (default ``max_len - 1``: consecutive windows share one item, so each item
    after the first is a target in exactly one window, with at most ``max_len - 1`` items before it; 1: one
    window per target, each target then also appears at shorter contexts in later windows). Windows of
    fewer than 2 items (no target) are left out.
    """
    if max_len < 2:
        raise ValueError(f"sequence_windows: max_len must be >= 2 (one input and one target), got {max_len}")
    stride = max_len - 1 if stride is None else int(stride)
    if not 1 <= stride <= max_len - 1:
        raise ValueError(f"sequence_windows: stride must be in 1..max_len - 1 = {max_len - 1}, got {stride}")
    out, end = [], len(seq)
    while end >= 2:
        out.append(list(seq[max(0, end - max_len):end]))
        end -= stride
    return out


def check_suffix_lengths(lengths: Sequence[int], what: str = "history suffix lengths") -> tuple:
    """``lengths`` as a tuple of ints if they are distinct and >= 1; ValueError naming ``what`` otherwise."""
    ks = tuple(int(k) for k in lengths)
    if any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"{what} must be distinct integers >= 1, got {list(lengths)}")
    return ks


def history_suffixes(samples: Sequence[Sample], lengths: Sequence[int]) -> List[Sample]:
    """Extra training samples: for each K in ``lengths``, every sample whose history is longer than K again,
    with its history cut to its last K items (same user and target), in the samples' order, K by K.

    With K = 1 each (last item -> target) pair is also trained with nothing before the last item, so the model
    learns the item-level successors that a transition table counts, besides the same pairs in long contexts.
    A sample with at most K history items is not copied (it is already there as it would be).
    """
    ks = check_suffix_lengths(lengths, "history_suffixes: lengths")
    return [Sample(s.user_id, list(s.history[-k:]), s.target) for k in ks for s in samples if len(s.history) > k]
