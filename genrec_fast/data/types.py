"""The three containers every stage shares: a catalogue, samples and a split dataset."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class Catalog:
    """Items indexed 0..N-1.

    ``item_ids`` keeps the dataset's own ids as strings; ``titles`` is what prompts show;
    ``texts`` is the text to embed when building SIDs; ``codes`` ([N, L] int32) and
    ``codebook_sizes`` are the items' Semantic IDs once they exist.
    """

    item_ids: List[str]
    titles: List[str]
    texts: List[str]
    codes: Optional[np.ndarray] = None
    codebook_sizes: Optional[Tuple[int, ...]] = None
    _index: Dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.item_ids = [str(i) for i in self.item_ids]
        n = len(self.item_ids)
        if len(self.titles) != n or len(self.texts) != n:
            raise ValueError(
                f"Catalog: {n} item ids but {len(self.titles)} titles and {len(self.texts)} texts"
            )
        self._index = {}
        for i, item in enumerate(self.item_ids):
            if item in self._index:
                raise ValueError(f"Catalog: item id {item!r} appears twice (rows {self._index[item]} and {i})")
            self._index[item] = i
        if self.codes is not None:
            self.set_codes(self.codes, self.codebook_sizes)

    def __len__(self) -> int:
        return len(self.item_ids)

    def index(self, item_id) -> int:
        """Index 0..N-1 of a dataset item id; KeyError naming the id if unknown."""
        try:
            return self._index[str(item_id)]
        except KeyError:
            raise KeyError(f"item id {item_id!r} is not in the catalogue") from None

    def set_codes(self, codes, codebook_sizes: Optional[Sequence[int]] = None) -> None:
        """Attach SIDs ([N, L] ints). ``codebook_sizes`` defaults to max code + 1 rounded up to a power of 2."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != len(self):
            raise ValueError(f"codes must be [{len(self)}, L], got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        codes = codes.astype(np.int32)
        if codes.size and codes.min() < 0:
            row = int(np.argwhere(codes < 0)[0][0])
            raise ValueError(f"negative SID code in row {row}: {codes[row].tolist()}")
        if codebook_sizes is None:
            codebook_sizes = tuple(1 << int(m).bit_length() for m in codes.max(axis=0))
        codebook_sizes = tuple(int(k) for k in codebook_sizes)
        if len(codebook_sizes) != codes.shape[1]:
            raise ValueError(f"{len(codebook_sizes)} codebook sizes for SIDs of {codes.shape[1]} levels")
        over = codes >= np.asarray(codebook_sizes)[None, :]
        if over.any():
            row, level = (int(x) for x in np.argwhere(over)[0])
            raise ValueError(
                f"SID code {codes[row, level]} of row {row} level {level} is >= codebook size {codebook_sizes[level]}"
            )
        self.codes = codes
        self.codebook_sizes = codebook_sizes


@dataclass
class Sample:
    """One next-item example: ``history`` holds catalogue indices, oldest first."""

    user_id: str
    history: List[int]
    target: int


@dataclass
class RecData:
    catalog: Catalog
    train: List[Sample]
    valid: List[Sample]
    test: List[Sample]

    def validate(self) -> None:
        """Every index in every split must be a catalogue index."""
        n = len(self.catalog)
        for split in ("train", "valid", "test"):
            for row, s in enumerate(getattr(self, split)):
                bad = [i for i in (*s.history, s.target) if not 0 <= i < n]
                if bad:
                    raise ValueError(f"{split} sample {row} (user {s.user_id}) has item indices {bad} "
                                     f"outside 0..{n - 1}")
