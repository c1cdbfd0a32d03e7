"""SIDVocab: the contiguous block of SID token ids, token(l, c) = start + off_l + c."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from genrec_fast.sid_tokens import LEVEL_PREFIXES, token_string
from genrec_fast.sid_tokens import SID_TOKEN_RE as _SID_TOKEN  # the one SID-token grammar


def _as_long(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        arr = np.asarray(x)
        if arr.dtype == np.bool_ or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
        t = torch.as_tensor(arr)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.long()


def _bad_rows(bad: torch.Tensor) -> list:
    """Row indices (over the leading dims) where ``bad`` [..., L] has a True, first five."""
    flat = bad.reshape(-1, bad.shape[-1]).any(-1)
    return torch.nonzero(flat).flatten()[:5].tolist()


class SIDVocab:
    """The SID token block of a tokenizer/LM head.

    Args:
        start_token_id: id of token(0, 0), i.e. ``<a_0>``.
        codebook_sizes: K_l per level; level l occupies ids ``start + off_l .. start + off_l + K_l - 1``
            with ``off_l = K_0 + ... + K_{l-1}``.
    """

    def __init__(self, start_token_id: int, codebook_sizes: Sequence[int]):
        sizes = tuple(int(k) for k in codebook_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"codebook_sizes must be a non-empty list of positive ints, got {list(codebook_sizes)}")
        if len(sizes) > len(LEVEL_PREFIXES):
            raise ValueError(f"at most {len(LEVEL_PREFIXES)} SID levels are supported, got {len(sizes)}")
        if int(start_token_id) < 0:
            raise ValueError(f"start_token_id must be >= 0, got {start_token_id}")
        self.start = int(start_token_id)
        self.codebook_sizes: Tuple[int, ...] = sizes
        self.offsets: Tuple[int, ...] = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        self.size = int(sum(sizes))
        self.end = self.start + self.size  # one past the last SID token id

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def level_range(self, level: int) -> Tuple[int, int]:
        """[lo, hi) token ids of SID level ``level``."""
        if not 0 <= level < self.num_levels:
            raise IndexError(f"SID level {level} out of range 0..{self.num_levels - 1}")
        lo = self.start + self.offsets[level]
        return lo, lo + self.codebook_sizes[level]

    def __repr__(self) -> str:
        return f"SIDVocab(start_token_id={self.start}, codebook_sizes={self.codebook_sizes})"

    def __eq__(self, other) -> bool:
        return isinstance(other, SIDVocab) and (self.start, self.codebook_sizes) == (other.start, other.codebook_sizes)

    def token_ids(self, codes) -> torch.LongTensor:
        """codes [..., n] (n <= L: full SIDs or prefixes) -> token ids [..., n] (same device for tensors)."""
        c = _as_long(codes, "codes")
        n = c.shape[-1] if c.dim() else 0
        if c.dim() == 0 or n > self.num_levels:
            raise ValueError(f"codes must have shape [..., n] with 1 <= n <= {self.num_levels}, got {tuple(c.shape)}")
        sizes = torch.tensor(self.codebook_sizes[:n], device=c.device)
        bad = (c < 0) | (c >= sizes)
        if bool(bad.any()):
            raise ValueError(f"codes out of range of codebook sizes {self.codebook_sizes[:n]} in row(s) {_bad_rows(bad)}")
        offs = torch.tensor(self.offsets[:n], device=c.device)
        return c + offs + self.start

    def codes(self, token_ids) -> torch.LongTensor:
        """token ids [..., n] (level l at position l) -> codes [..., n]; raises on ids outside their level's block."""
        t = _as_long(token_ids, "token_ids")
        n = t.shape[-1] if t.dim() else 0
        if t.dim() == 0 or n > self.num_levels:
            raise ValueError(f"token_ids must have shape [..., n] with 1 <= n <= {self.num_levels}, got {tuple(t.shape)}")
        c = t - self.start - torch.tensor(self.offsets[:n], device=t.device)
        bad = (c < 0) | (c >= torch.tensor(self.codebook_sizes[:n], device=t.device))
        if bool(bad.any()):
            raise ValueError(f"token ids outside their level's SID block {self} in row(s) {_bad_rows(bad)}")
        return c

    @classmethod
    def from_tokenizer(cls, tokenizer, codebook_sizes: Optional[Sequence[int]] = None) -> "SIDVocab":
        """Find the SID block (``<a_0>`` ...) in ``tokenizer`` and check it is contiguous and in order.

        Without ``codebook_sizes`` each level's K_l is read off the tokenizer: the number of
        tokens ``<x_0> .. <x_{K-1}>`` of that level's letter (they must all be present).
        """
        vocab = tokenizer.get_vocab()
        if codebook_sizes is None:
            found = {}
            for tok in vocab:
                m = _SID_TOKEN.fullmatch(tok)
                if m:
                    found.setdefault(LEVEL_PREFIXES.index(m.group(1)), set()).add(int(m.group(2)))
            sizes = []
            for level in range(len(LEVEL_PREFIXES)):
                if level not in found:
                    break
                k = max(found[level]) + 1
                missing = sorted(set(range(k)) - found[level])[:5]
                if missing:
                    raise ValueError(f"tokenizer lacks SID token(s) {[token_string(level, c) for c in missing]} of level {level}")
                sizes.append(k)
            if not sizes:
                raise ValueError("tokenizer has no SID tokens (<a_0> ...); add them first")
            codebook_sizes = sizes
        first = token_string(0, 0)
        if first not in vocab:
            raise ValueError(f"tokenizer has no SID token {first}")
        v = cls(vocab[first], codebook_sizes)
        for level, k in enumerate(v.codebook_sizes):
            lo = v.start + v.offsets[level]
            for c in range(k):
                tok = token_string(level, c)
                if vocab.get(tok) != lo + c:
                    raise ValueError(
                        f"SID token block is not contiguous/ordered: {tok} has id {vocab.get(tok)}, expected {lo + c} "
                        f"(start {v.start}, codebook sizes {v.codebook_sizes})"
                    )
        return v
