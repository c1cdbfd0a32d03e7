"""One SID-token grammar: the index / data readers (parse_sid) and the tokenizer reader (SIDVocab) agree."""
import pytest

from genrec_fast.decode import SIDVocab
from genrec_fast.sid_tokens import LEVEL_PREFIXES, parse_sid, parse_token, token_string

ACCEPTED = {"<a_0>": (0, 0), "<a_1>": (0, 1), "<b_12>": (1, 12), "<h_255>": (7, 255), "<c_1000000>": (2, 1000000)}
REJECTED = ["<a_01>", "<a_00>", "<a_+1>", "<a_-1>", "<A_1>", "<i_1>", "<a_>", "<a_1 >", "< a_1>", "<a1>", "a_1",
            "<a_1>x", "<a_1><b_2>", "<a_\u0661>", "<a_1\u0663>", "<a_\uff11>", "", "<a_1.0>"]


class _Tokenizer:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


_BLOCK = {"<a_0>": 0}  # a SID block of one level, one code


def _vocab_side(token):
    """What the tokenizer reader (SIDVocab.from_tokenizer) makes of a vocabulary entry next to ``_BLOCK``:
    None when it leaves the block as it was (not a SID token), "read" when it took the entry for one."""
    try:
        sizes = SIDVocab.from_tokenizer(_Tokenizer({**_BLOCK, token: len(_BLOCK)})).codebook_sizes
    except ValueError:  # read as a SID token that leaves a gap in the block
        return "read"
    return None if sizes == (1,) else "read"


def _sid_side(token):
    """What the SID readers (index.json, info.txt, the split csvs) make of it."""
    try:
        codes = parse_sid(token)
    except ValueError:
        return None
    return (0, codes[0]) if len(codes) == 1 else ("several", codes)


@pytest.mark.parametrize("token", [*ACCEPTED, *REJECTED])
def test_both_readers_accept_and_reject_the_same_tokens(token):
    want = ACCEPTED.get(token)
    assert parse_token(token) == want
    if want is None:  # the tokenizer reader skips every entry parse_token rejects
        assert _vocab_side(token) is None
    if want is not None and want[0] == 0:  # a one-level SID: parse_sid reads the same code
        assert _sid_side(token) == want
    if want is None:
        assert _sid_side(token) in (None, ("several", [1, 2]))  # "<a_1><b_2>" is a SID, not one token


def test_token_string_round_trips():
    for level in range(len(LEVEL_PREFIXES)):
        for code in (0, 1, 9, 10, 99, 4096):
            assert parse_token(token_string(level, code)) == (level, code)


class _Tok:
    def __init__(self, vocab):
        self._vocab = vocab

    def get_vocab(self):
        return dict(self._vocab)


def test_sid_vocab_ignores_tokens_outside_the_grammar():
    """A tokenizer holding "<a_01>" (not a SID token) besides the block: the block is read as it is."""
    tok = _Tok({"hello": 0, "<a_0>": 5, "<a_1>": 6, "<b_0>": 7, "<a_01>": 8, "<b_001>": 9, "<a_\u0662>": 10})
    v = SIDVocab.from_tokenizer(tok)
    assert v.start == 5 and v.codebook_sizes == (2, 1)
    tok = _Tok({"<a_0>": 5, "<a_02>": 6})  # before: read as code 2 of level a, then "<a_1> missing"
    assert SIDVocab.from_tokenizer(tok).codebook_sizes == (1,)
    with pytest.raises(ValueError, match="malformed SID '<a_0><b_01>'"):
        parse_sid("<a_0><b_01>")
