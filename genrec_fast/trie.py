"""SIDTrie: the catalogue's Semantic IDs as a static trie (C++ core in ``genrec_fast._trie``).

Depths: depth d holds the prefixes of length d, numbered 0..num_nodes(d)-1 in sorted order;
depth 0 is the root (one node), depth L the leaves (one per distinct SID). A beam that has
generated d codes sits on one node of depth d, so its state is one int.

The decoder's view is ``device_arrays(device)``: per depth, either a dense child table or CSR
(``indptr``, ``codes``; the child id of CSR entry j is j, because the children of one node are
a contiguous run of ids), plus the leaf -> items map; ``TrieDeviceArrays.step`` is the torch
reference of one trie-masked step.
"""
from __future__ import annotations

import operator
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from genrec_fast import _trie
from genrec_fast.io import atomic_write_bytes

_MAGIC = b"GRFTRIE\x00"
_VERSION = 1
_HEADER = struct.Struct("<8sIIqqB")  # magic, version, L, N, payload bytes, allow_duplicates


def _as_codes(codes, name: str = "codes") -> np.ndarray:
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D integer array [N, L], got ndim={arr.ndim} shape={arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {arr.dtype}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        rows = np.nonzero((arr > np.iinfo(np.int32).max).any(1) | (arr < np.iinfo(np.int32).min).any(1))[0][:5]
        raise ValueError(f"{name} out of int32 range in row(s) {rows.tolist()}")
    return np.ascontiguousarray(arr, dtype=np.int32)


def _narrow(a: np.ndarray) -> np.ndarray:
    """int64 -> int32 when every value fits (device arrays are read-only index tables)."""
    i32 = np.iinfo(np.int32)
    return a.astype(np.int32) if a.size == 0 or (a.min() >= i32.min and a.max() <= i32.max) else a


@dataclass
class TrieLevel:
    """Arrays of one depth d (parents at depth d, children at depth d+1)."""

    layout: str  # "dense" | "csr"
    num_parents: int
    codebook_size: int
    max_branch: int
    table: Optional[torch.Tensor] = None  # dense: [num_parents, K] int32, child id or -1
    indptr: Optional[torch.Tensor] = None  # csr: [num_parents + 1] int32
    codes: Optional[torch.Tensor] = None  # csr: [num_children] int32; child id of entry j is j

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (self.table, self.indptr, self.codes) if t is not None]


@dataclass
class TrieDeviceArrays:
    levels: List[TrieLevel]
    leaf_ptr: torch.Tensor  # [num_leaves + 1] int32 (int64 past 2^31 items)
    leaf_items: torch.Tensor  # [N] int32 when the item ids fit, else int64
    codebook_sizes: Tuple[int, ...] = field(default=())

    @property
    def device(self) -> torch.device:
        return self.leaf_items.device

    @property
    def nbytes(self) -> int:
        ts = [t for lv in self.levels for t in lv.tensors()] + [self.leaf_ptr, self.leaf_items]
        return int(sum(t.numel() * t.element_size() for t in ts))

    def step(self, level: int, node_ids: torch.Tensor, check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Torch reference of one constrained step.

        node_ids: [R] ints, nodes of depth ``level`` (negative = padding row, nothing allowed).
        Returns (allowed [R, K_level] bool, child [R, K_level] int32 with -1 where not allowed).
        check: verify the node ids are in range (one host sync); callers whose ids come from this
        trie's own ``child`` output (beam search) pass False.
        """
        if not 0 <= level < len(self.levels):
            raise IndexError(f"level {level} out of range 0..{len(self.levels) - 1}")
        lv = self.levels[level]
        nodes = node_ids.to(device=self.device, dtype=torch.long).reshape(-1)
        if check and nodes.numel() and int(nodes.max()) >= lv.num_parents:
            raise IndexError(f"node id {int(nodes.max())} out of range for depth {level} ({lv.num_parents} nodes)")
        valid = nodes >= 0
        safe = nodes.clamp_min(0)
        R, K = nodes.numel(), lv.codebook_size
        if lv.layout == "dense":
            child = lv.table[safe]
            child = torch.where(valid[:, None], child, torch.full_like(child, -1))
        else:
            start = lv.indptr[safe].long()
            count = (lv.indptr[safe + 1].long() - start) * valid
            j = torch.arange(max(lv.max_branch, 1), device=self.device)
            ok = j[None, :] < count[:, None]
            pos = (start[:, None] + j[None, :]).clamp_max(max(lv.codes.numel() - 1, 0))
            code = torch.where(ok, lv.codes[pos].long(), torch.full_like(pos, K))  # K = dump column
            child = torch.full((R, K + 1), -1, dtype=torch.int32, device=self.device)
            child.scatter_(1, code, torch.where(ok, pos, torch.full_like(pos, -1)).to(torch.int32))
            child = child[:, :K]
        return child >= 0, child.to(torch.int32)


class SIDTrie:
    """Trie over item Semantic IDs.

    Args:
        codes: integer array [N, L], one SID per item.
        codebook_sizes: int or L ints (default: max code + 1 per level).
        item_ids: [N] int ids of the items (default 0..N-1).
        allow_duplicates: keep items that share a SID (their leaf lists all of them) instead of raising.
    """

    def __init__(self, codes, codebook_sizes: Union[int, Sequence[int], None] = None, item_ids=None,
                 allow_duplicates: bool = False):
        arr = _as_codes(codes)
        if arr.shape[0] == 0:
            raise ValueError("empty catalogue: codes has no rows")
        if arr.shape[1] == 0:
            raise ValueError("codes has zero levels (shape [N, 0])")
        L = arr.shape[1]
        if codebook_sizes is None:
            sizes = [int(v) + 1 for v in arr.max(axis=0)]
            neg = np.nonzero((arr < 0).any(1))[0][:5]
            if neg.size:
                raise ValueError(f"negative codes in row(s) {neg.tolist()}: {arr[neg].tolist()}")
        elif isinstance(codebook_sizes, (int, np.integer)):
            sizes = [int(codebook_sizes)] * L
        else:
            try:
                sizes = [operator.index(k) for k in codebook_sizes]
            except TypeError:
                raise ValueError(f"codebook_sizes must be an int or {L} ints (one per level), "
                                 f"got {codebook_sizes!r}") from None
            if len(sizes) != L:
                raise ValueError(f"codebook_sizes has {len(sizes)} entries, codes has {L} levels")
        if item_ids is None:
            ids = np.arange(arr.shape[0], dtype=np.int64)
        else:
            ids = item_ids.detach().cpu().numpy() if isinstance(item_ids, torch.Tensor) else np.asarray(item_ids)
            if ids.ndim != 1 or ids.shape[0] != arr.shape[0]:
                raise ValueError(f"item_ids must be 1-D with {arr.shape[0]} entries (one per row of codes), "
                                 f"got shape {ids.shape}")
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"item_ids must be integers, got dtype {ids.dtype}")
            ids = ids.astype(np.int64)
        # own, read-only copies: save() writes these, so a caller changing its arrays later must not
        # change what is saved (the C++ trie has its own copy of the structure)
        self._codes = np.array(arr, dtype=np.int32, order="C", copy=True)
        self._item_ids = np.array(ids, dtype=np.int64, order="C", copy=True)
        self._codes.setflags(write=False)
        self._item_ids.setflags(write=False)
        self._allow_duplicates = bool(allow_duplicates)
        t = _trie.Trie(self._codes, sizes, self._item_ids, self._allow_duplicates)
        if t.error():  # the extension reports bad input as a value, never as a C++ exception
            raise ValueError(t.error())
        self._t = t

    # ---- properties -------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return self._t.num_items()

    @property
    def num_levels(self) -> int:
        return self._t.num_levels()

    @property
    def codebook_sizes(self) -> Tuple[int, ...]:
        return tuple(self._t.codebook_sizes())

    @property
    def allow_duplicates(self) -> bool:
        return self._allow_duplicates

    @property
    def codes(self) -> np.ndarray:
        return self._codes

    @property
    def item_ids(self) -> np.ndarray:
        return self._item_ids

    @property
    def num_leaves(self) -> int:
        return self._t.num_nodes(self.num_levels)

    def num_nodes(self, depth: int) -> int:
        """Nodes at ``depth`` (0..L; depth L = leaves, distinct SIDs)."""
        depth = operator.index(depth)
        if not 0 <= depth <= self.num_levels:
            raise IndexError(f"depth must be in 0..{self.num_levels}, got {depth}")
        return self._t.num_nodes(depth)

    def max_branch(self, depth: int) -> int:
        """The most children of one node at ``depth`` (0..L-1)."""
        depth = operator.index(depth)
        if not 0 <= depth < self.num_levels:
            raise IndexError(f"depth must be in 0..{self.num_levels - 1}, got {depth}")
        return self._t.max_branch(depth)

    def __len__(self) -> int:
        return self.num_items

    def __repr__(self) -> str:
        return (f"SIDTrie(num_items={self.num_items}, num_levels={self.num_levels}, "
                f"codebook_sizes={self.codebook_sizes}, num_leaves={self.num_leaves})")

    # ---- host queries -----------------------------------------------------------------------
    def allowed(self, prefix: Sequence[int]) -> np.ndarray:
        """Sorted codes that may follow ``prefix``; KeyError when the prefix is not in the trie."""
        prefix = [int(c) for c in prefix]
        if len(prefix) > self.num_levels:
            raise ValueError(f"prefix {tuple(prefix)} is longer than the SID length {self.num_levels}")
        out = self._t.allowed(prefix)
        if out is None:
            raise KeyError(f"prefix not in trie: {tuple(prefix)}")
        return out

    def lookup(self, codes) -> np.ndarray:
        """Leaf id of each SID row of ``codes`` [M, L], -1 where the SID is not in the trie (codes of any
        integer value, out of every codebook's range included)."""
        arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
        if arr.ndim != 2 or arr.shape[1] != self.num_levels:
            raise ValueError(f"query codes must have shape [M, {self.num_levels}], got {arr.shape}")
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"query codes must have an integer dtype, got {arr.dtype}")
        i32 = np.iinfo(np.int32)
        fits = ((arr >= i32.min) & (arr <= i32.max)).all(axis=1)  # a row beyond int32 is in no codebook
        out = np.full(arr.shape[0], -1, dtype=np.int64)
        if fits.any():
            out[fits] = self._t.lookup(np.ascontiguousarray(arr[fits], dtype=np.int32))
        return out

    def contains(self, codes) -> np.ndarray:
        return self.lookup(codes) >= 0

    def leaf_items(self, leaf: int) -> np.ndarray:
        """Item ids of leaf ``leaf`` (0..num_leaves-1, as ``lookup`` returns them)."""
        out = self._t.leaf_items(operator.index(leaf))
        if out is None:
            raise IndexError(f"leaf id {leaf} out of range 0..{self.num_leaves - 1}")
        return out

    def items(self, sid: Sequence[int]) -> np.ndarray:
        """Item ids whose SID is ``sid``; KeyError when no item has it."""
        sid = [int(c) for c in sid]
        if len(sid) != self.num_levels:
            raise ValueError(f"an SID has {self.num_levels} codes, got {len(sid)}")
        leaf = int(self.lookup(np.asarray([sid]))[0]) if min(sid) >= 0 else -1
        if leaf < 0:
            raise KeyError(f"SID not in trie: {tuple(sid)}")
        return self.leaf_items(leaf)

    # ---- device export ----------------------------------------------------------------------
    def device_arrays(self, device: Union[str, torch.device] = "cpu", layout: str = "auto") -> TrieDeviceArrays:
        """Flat arrays for the decoder. layout: "auto" (dense where small), "dense" or "csr"."""
        if layout not in ("auto", "dense", "csr"):
            raise ValueError(f"layout must be 'auto', 'dense' or 'csr', got {layout!r}")
        device = torch.device(device)
        levels = []
        for d in range(self.num_levels):
            n, K = self.num_nodes(d), self.codebook_sizes[d]
            indptr = self._t.indptr(d)
            codes = self._t.child_codes(d)
            dense_bytes = n * K * 4
            csr_bytes = (indptr.size + codes.size) * 4
            use_dense = layout == "dense" or (layout == "auto" and dense_bytes <= max(1 << 18, 2 * csr_bytes))
            mb = self.max_branch(d)
            if use_dense:
                table = np.full((n, K), -1, dtype=np.int32)
                parent = np.repeat(np.arange(n), np.diff(indptr))
                table[parent, codes] = np.arange(codes.size, dtype=np.int32)
                levels.append(TrieLevel("dense", n, K, mb, table=torch.from_numpy(table).to(device)))
            else:
                levels.append(TrieLevel("csr", n, K, mb,
                                        indptr=torch.from_numpy(indptr.astype(np.int32)).to(device),
                                        codes=torch.from_numpy(codes).to(device)))
        return TrieDeviceArrays(levels=levels,
                                leaf_ptr=torch.from_numpy(_narrow(self._t.leaf_ptr())).to(device),
                                leaf_items=torch.from_numpy(_narrow(self._t.sorted_items())).to(device),
                                codebook_sizes=self.codebook_sizes)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the trie to one file, atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        sizes = np.asarray(self.codebook_sizes, dtype=np.int64)
        # little-endian like the header, on any machine
        payload = (sizes.astype("<i8").tobytes() + self._codes.astype("<i4").tobytes()
                   + self._item_ids.astype("<i8").tobytes())
        header = _HEADER.pack(_MAGIC, _VERSION, self.num_levels, self.num_items, len(payload),
                              int(self._allow_duplicates))
        crc = struct.pack("<I", zlib.crc32(payload, zlib.crc32(header)))
        atomic_write_bytes(path, header + payload + crc)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SIDTrie":
        path = Path(path)
        data = path.read_bytes()
        if len(data) < _HEADER.size + 4 or not data.startswith(_MAGIC):
            raise ValueError(f"{path}: not a genrec_fast trie file (bad magic)")
        magic, version, L, N, nbytes, dup = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise ValueError(f"{path}: trie file version {version}, this genrec_fast reads version {_VERSION}")
        if L <= 0 or N <= 0 or nbytes != L * 8 + N * L * 4 + N * 8 or len(data) != _HEADER.size + nbytes + 4:
            raise ValueError(f"{path}: corrupt trie file (sizes do not match: L={L}, N={N}, {len(data)} bytes)")
        payload = data[_HEADER.size:_HEADER.size + nbytes]
        (crc,) = struct.unpack_from("<I", data, _HEADER.size + nbytes)
        if crc != zlib.crc32(payload, zlib.crc32(data[:_HEADER.size])):
            raise ValueError(f"{path}: corrupt trie file (checksum mismatch)")
        sizes = np.frombuffer(payload, dtype="<i8", count=L)
        codes = np.frombuffer(payload, dtype="<i4", count=N * L, offset=L * 8).reshape(N, L)
        ids = np.frombuffer(payload, dtype="<i8", count=N, offset=L * 8 + N * L * 4)
        return cls(codes, [int(k) for k in sizes], ids, allow_duplicates=bool(dup))  # the constructor copies
