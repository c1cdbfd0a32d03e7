"""Test set-up: no hub access; Triton kernels run in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any @triton.jit module is imported, so this runs
at conftest import time, before test modules are collected.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# on a GPU, the fused RQ kernel takes one fixed tile config instead of compiling and timing eight per shape
# (tests check results; benches/bench_rq.py measures the autotuned kernel)
os.environ.setdefault("GENREC_FAST_AUTOTUNE", "0")
# every test fits its own SASRec baselines (no fits kept between runs; tests/test_sasrec.py checks the disk cache)
os.environ.setdefault("GENREC_FAST_SASREC_CACHE", "off")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon18-industrial"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_shared = pytest.mark.skip(reason=f"../shared data not present at {SHARED_DATA}")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "shared" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(skip_shared)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (tiny models run faster so, far faster on shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def shared_data_dir():
    return SHARED_DATA


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A 1-layer random BERT with MiniLM's tokenizer: embeddings in milliseconds instead of a minute."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from genrec_fast.sid.embed import default_encoder_path

    d = tmp_path_factory.mktemp("tiny_encoder")
    tok = AutoTokenizer.from_pretrained(str(default_encoder_path()))
    tok.save_pretrained(d)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(d)
    return str(d)


# ---- a tiny random Qwen2 on a 12-item catalogue (evaluation tests) --------------------------------

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tiny_setup():
    """A 12-item catalogue (items 10 and 11 share a SID), random train/valid/test samples and a tiny random
    Qwen2 with its tokenizer: (data, model, tokenizer, sid_vocab)."""
    import numpy as np

    from genrec_fast.data.types import Catalog, RecData, Sample
    from genrec_fast.model import load_model_and_tokenizer

    codes = np.array([[i % 4, (i // 4) % 4] for i in range(12)])
    codes[11] = codes[10]  # items 10 and 11 share a SID
    n = len(codes)
    cat = Catalog([str(i) for i in range(n)], [f"item {i}" for i in range(n)], [f"item {i}" for i in range(n)],
                  codes=codes, codebook_sizes=(4, 4))
    rng = np.random.default_rng(0)

    def samples(k):
        return [Sample(f"u{j}", rng.integers(0, n, int(rng.integers(1, 5))).tolist(), int(rng.integers(0, n)))
                for j in range(k)]

    data = RecData(cat, train=samples(20), valid=samples(5), test=samples(9))
    data.test[0].target = 11
    model, tok, vocab = load_model_and_tokenizer("tiny", (4, 4), corpus=cat.titles + ["Recommend the next item."],
                                                 tokenizer_vocab_size=300, model_overrides=TINY)
    return data, model, tok, vocab
