"""Semantic-ID token strings and their block of token ids: the one place that knows the MiniOneRec spelling.

An SID of L codes is written ``<a_12><b_3><c_200>``: level l uses the l-th letter of
``LEVEL_PREFIXES``. SID tokens form one contiguous block of token ids, level by level:
token(l, c) = start + K_0 + ... + K_{l-1} + c (see ../shared/DESIGN.md); :class:`SIDVocab` maps
between codes and those ids (also exported as ``genrec_fast.decode.SIDVocab``).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

LEVEL_PREFIXES = "abcdefgh"
# THE grammar of one SID token, used by every reader (parse_token / parse_sid, SIDVocab.from_tokenizer):
# ``<`` a level letter ``_`` a code in ASCII decimal without leading zeros ``>``;
# <a_01>, <a_+1>, <A_1>, <i_1> and non-ASCII digits are not tokens of the block (token_string writes none).
SID_TOKEN_RE = re.compile(r"<([%s])_(0|[1-9][0-9]*)>" % LEVEL_PREFIXES)


def token_string(level: int, code: int) -> str:
    if not 0 <= level < len(LEVEL_PREFIXES):
        raise ValueError(f"SID level {level} out of range 0..{len(LEVEL_PREFIXES) - 1}")
    if code < 0:
        raise ValueError(f"SID code must be >= 0, got {code} at level {level}")
    return f"<{LEVEL_PREFIXES[level]}_{int(code)}>"


def sid_string(codes: Sequence[int]) -> str:
    """``[12, 3, 200]`` -> ``"<a_12><b_3><c_200>"``."""
    return "".join(token_string(level, int(c)) for level, c in enumerate(codes))


def sid_tokens(codes: Sequence[int]) -> List[str]:
    """``[12, 3, 200]`` -> ``["<a_12>", "<b_3>", "<c_200>"]`` (the index.json form)."""
    return [token_string(level, int(c)) for level, c in enumerate(codes)]


def parse_token(token: str) -> Optional[Tuple[int, int]]:
    """``"<b_3>"`` -> ``(1, 3)`` (level, code); None for a string that is not one SID token (:data:`SID_TOKEN_RE`)."""
    m = SID_TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
    return None if m is None else (LEVEL_PREFIXES.index(m.group(1)), int(m.group(2)))


def parse_sid(sid) -> List[int]:
    """Parse ``"<a_12><b_3><c_200>"`` or ``["<a_12>", "<b_3>", "<c_200>"]`` into codes.

    Levels must appear in order a, b, c, ... with nothing else in the string.
    """
    text = "".join(sid) if isinstance(sid, (list, tuple)) else str(sid)
    codes: List[int] = []
    pos = 0
    for m in SID_TOKEN_RE.finditer(text):
        if m.start() != pos:
            break
        level = LEVEL_PREFIXES.index(m.group(1))
        if level != len(codes):
            raise ValueError(f"malformed SID {text!r}: level '{m.group(1)}' found at position {len(codes)}")
        codes.append(int(m.group(2)))
        pos = m.end()
    if pos != len(text.strip()) or not codes:
        raise ValueError(f"malformed SID {text!r}: expected tokens like <a_12><b_3><c_200>")
    return codes


def sid_token_strings(codebook_sizes: Sequence[int]) -> List[str]:
    """All SID token strings in block order (level by level, code by code)."""
    return [token_string(level, c) for level, k in enumerate(codebook_sizes) for c in range(int(k))]



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
            raise ValueError(f"codes out of range of codebook sizes {self.codebook_sizes[:n]} in row(s) "
                             f"{_bad_rows(bad)}")
        offs = torch.tensor(self.offsets[:n], device=c.device)
        return c + offs + self.start

    def codes(self, token_ids) -> torch.LongTensor:
        """token ids [..., n] (level l at position l) -> codes [..., n]; raises on ids outside their level's block."""
        t = _as_long(token_ids, "token_ids")
        n = t.shape[-1] if t.dim() else 0
        if t.dim() == 0 or n > self.num_levels:
            raise ValueError(f"token_ids must have shape [..., n] with 1 <= n <= {self.num_levels}, "
                             f"got {tuple(t.shape)}")
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
                parsed = parse_token(tok)
                if parsed is not None:
                    found.setdefault(parsed[0], set()).add(parsed[1])
            sizes = []
            for level in range(len(LEVEL_PREFIXES)):
                if level not in found:
                    break
                k = max(found[level]) + 1
                missing = sorted(set(range(k)) - found[level])[:5]
                if missing:
                    raise ValueError(f"tokenizer lacks SID token(s) {[token_string(level, c) for c in missing]} "
                                     f"of level {level}")
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
