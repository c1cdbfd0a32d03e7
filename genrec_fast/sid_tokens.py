"""Semantic-ID token strings: the one place that knows the MiniOneRec spelling.

An SID of L codes is written ``<a_12><b_3><c_200>``: level l uses the l-th letter of
``LEVEL_PREFIXES``. SID tokens form one contiguous block of token ids, level by level:
token(l, c) = start + K_0 + ... + K_{l-1} + c (see ../shared/DESIGN.md).
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

LEVEL_PREFIXES = "abcdefgh"
# THE grammar of one SID token, used by every reader (parse_sid here, SIDVocab.from_tokenizer in
# genrec_fast.decode.vocab): ``<`` a level letter ``_`` a code in ASCII decimal without leading zeros ``>``;
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
