"""beam_search(cuda_graphs=...): the static-buffer, 4-D-mask forwards that CUDA graphs capture.

On CPU ``cuda_graphs="emulate"`` runs the exact capture protocol (warm-up on the identity parent
index, then the real run; later calls reuse the set) with the captured functions called eagerly.
The functions must also be capturable: no host sync and no tensor made from Python data inside
them, which a dispatch mode checks op by op. On a GPU the real capture is compared with eager."""
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from genrec_fast.decode import SIDVocab, beam_search, graphs
from genrec_fast.model import lm_modules

from test_decode import SIZES, START, hf_constrained, left_padded_prompts, random_trie, tiny_model

# ops that synchronise with the host or copy Python data to the device: illegal inside a CUDA graph capture
_NOT_CAPTURABLE = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "item",
                   "_unique", "_unique2", "unique_dim", "unique_consecutive", "lift_fresh", "lift_fresh_copy",
                   "nonzero_static"}


class _CaptureChecker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _NOT_CAPTURABLE:
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture(autouse=True)
def _no_graph_sets_between_tests():
    graphs.clear_graphs()
    yield
    graphs.clear_graphs()


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_emulated_graph_path_matches_eager_and_hf(family):
    seed = _fresh_seed()
    model = tiny_model(family, seed)
    trie, vocab = random_trie(seed % 1000), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 9, seed)
    eager = beam_search(model, ids, mask, trie, vocab, 8, backend="torch")
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 8)
    for _ in range(2):  # the first call captures (here: warm-up + run), the second reuses the set
        res = beam_search(model, ids, mask, trie, vocab, 8, backend="torch", cuda_graphs="emulate", graph_bucket=16)
        assert torch.equal(res.codes, eager.codes) and torch.equal(res.codes, vocab.codes(hf_tokens)), f"seed {seed}"
        torch.testing.assert_close(res.scores, hf_scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
        torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("score", ["full_vocab", "sid"])
def test_emulated_graph_path_exhaustive_with_padding_beams(score):
    """B > #SIDs: every SID then padding (-1 / -inf), exactly as the eager path, in both score modes."""
    import numpy as np

    from genrec_fast import SIDTrie

    model = tiny_model("qwen2", 11)
    codes = np.array([[0, 0, 0], [0, 0, 6], [0, 5, 1], [3, 2, 2], [4, 0, 3], [4, 5, 6]])
    trie, vocab = SIDTrie(codes, SIZES), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 7, 3)
    eager = beam_search(model, ids, mask, trie, vocab, 9, score=score)
    res = beam_search(model, ids, mask, trie, vocab, 9, score=score, cuda_graphs="emulate")
    assert (res.codes[:, 6:] == -1).all() and torch.isneginf(res.scores[:, 6:]).all()
    assert torch.equal(res.codes, eager.codes) and torch.equal(res.leaf_ids, eager.leaf_ids)
    torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4)


def test_four_levels_reuse_across_widths_batches_and_lru():
    """4 levels: the tail reorder (2 generated positions) runs inside the step functions; sets are
    reused across prompt widths of one bucket, new for a new batch size, evicted past GRAPH_SETS."""
    sizes = (5, 6, 7, 4)
    seed = _fresh_seed()
    model = tiny_model("llama", seed, vocab_size=START + sum(sizes) + 2)
    trie, vocab = random_trie(seed % 1000, n=120, sizes=sizes), SIDVocab(START, sizes)
    base = lm_modules(model)[0]
    for P, T in ((3, 8), (3, 11), (2, 10), (3, 8)):
        ids, mask = left_padded_prompts(P, T, seed + T)
        eager = beam_search(model, ids, mask, trie, vocab, 10, backend="torch")
        res = beam_search(model, ids, mask, trie, vocab, 10, backend="torch", cuda_graphs="emulate", graph_bucket=16)
        assert torch.equal(res.codes, eager.codes), f"seed {seed}, P {P}, T {T}"
        torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4)
    keys = list(graphs._sets[base])
    assert [k[:4] for k in keys] == [(2, 10, 16, 4), (3, 10, 16, 4)]  # widths 8 and 11 share the 16 bucket
    assert graphs.GRAPH_SETS == 4
    # an evicted or cleared set frees its KV buffers at once, not at the next garbage collection
    sets = graphs._sets[base]  # this model's LRU (the same dict until clear_graphs drops it)
    buffer_of = lambda key: weakref.ref(sets[key].beam_layers[0]._k)  # noqa: E731
    evicted = buffer_of(keys[1])
    gc.disable()
    try:
        for P in (2, 1, 4, 5):  # P=2 is used again (most recent), then three new shapes: one set must go
            ids, mask = left_padded_prompts(P, 8, seed)
            beam_search(model, ids, mask, trie, vocab, 10, cuda_graphs="emulate", graph_bucket=16)
        assert [k[0] for k in graphs._sets[base]] == [2, 1, 4, 5]  # P=3, the least recently used, was evicted
        assert evicted() is None
        kept = [buffer_of(k) for k in graphs._sets[base]]
        assert all(r() is not None for r in kept)
        graphs.clear_graphs(base)
        assert base not in graphs._sets and all(r() is None for r in kept)
    finally:
        gc.enable()
    beam_search(model, ids, mask, trie, vocab, 10, cuda_graphs="emulate", graph_bucket=16)
    assert len(graphs._sets) == 1
    graphs.clear_graphs(model)  # the causal LM the user holds: its base transformer's sets go
    assert len(graphs._sets) == 0
    beam_search(model, ids, mask, trie, vocab, 10, cuda_graphs="emulate", graph_bucket=16)
    assert len(graphs._sets) == 1
    del model, base
    gc.collect()
    assert len(graphs._sets) == 0  # a freed model takes its graph sets (and their buffers) with it


def test_captured_functions_do_not_sync_or_upload():
    """What a capture records must not synchronise with the host (``.item()``, ``nonzero``, data-dependent
    mask checks) nor make tensors from Python data: checked on every op of the prefill and step functions."""
    sizes = (5, 6, 7, 4)
    model = tiny_model("qwen2", 5, vocab_size=START + sum(sizes) + 2)
    trie, vocab = random_trie(5, n=120, sizes=sizes), SIDVocab(START, sizes)
    ids, mask = left_padded_prompts(3, 9, 5)
    base = lm_modules(model)[0]
    gf = graphs.graph_forward(base, 3, 6, 9, 4, torch.device("cpu"), "emulate", 16)
    checker = _CaptureChecker()
    calls = []

    def checked(fn, name):
        def run():
            calls.append(name)
            with checker:
                return fn()
        return run

    gf.prefill_graph.fn = checked(gf.prefill_graph.fn, "prefill")
    for level in range(1, 4):
        gf.step_graphs[level].fn = checked(gf.step_graphs[level].fn, f"step{level}")
    eager = beam_search(model, ids, mask, trie, vocab, 6)
    res = beam_search(model, ids, mask, trie, vocab, 6, cuda_graphs="emulate", graph_bucket=16)
    assert torch.equal(res.codes, eager.codes)
    assert calls == ["prefill", "prefill"] + [f"step{lv}" for lv in (1, 1, 2, 2, 3, 3)]  # warm-up + run each
    assert checker.bad == []
    # the checker does catch what a capture would reject
    with _CaptureChecker() as c:
        torch.ones(3).sum().item()
        torch.nonzero(torch.ones(2))
    assert len(c.bad) == 2


def test_graph_path_errors():
    model = tiny_model("qwen2", 1)
    trie, vocab = random_trie(1), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 6, 1)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs="yes")
    with pytest.raises(ValueError, match="graph_bucket must be >= 1"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs="emulate", graph_bucket=0)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs="emulate")
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="full-attention layers only"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs="emulate")
    # a config whose window has no switch (Mistral, Phi-3) is a sliding-window model
    from transformers import MistralConfig

    mistral = MistralConfig(sliding_window=4096)
    mistral._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="full-attention layers only"):
        graphs.check_supported(type("Base", (), {"config": mistral})())
    mistral.sliding_window = None
    graphs.check_supported(type("Base", (), {"config": mistral})())
    mistral.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        graphs.check_supported(type("Base", (), {"config": mistral})())
    with pytest.raises(ValueError, match="mode must be one of"):
        graphs.GraphForward(lm_modules(model)[0], 2, 4, 8, 3, torch.device("cpu"), "capture")


def check_cuda_graphs_on_gpu(dtype, **kwargs) -> None:
    """Replayed graphs compute exactly what the same functions compute eagerly ("emulate"); in fp32 the ranking
    is also the default eager search's and the eager search's with the same ``kwargs`` (less the graph ones)."""
    sizes = (5, 6, 7, 4)
    seed = _fresh_seed()
    model = tiny_model("qwen2", seed, vocab_size=START + sum(sizes) + 2).to("cuda", dtype)
    trie, vocab = random_trie(seed % 1000, n=120, sizes=sizes), SIDVocab(START, sizes)
    eager_kwargs = {k: v for k, v in kwargs.items() if k != "graph_scope"}
    for P, T in ((3, 9), (3, 12), (4, 9)):
        ids, mask = (t.cuda() for t in left_padded_prompts(P, T, seed + T))
        eager = [beam_search(model, ids, mask, trie, vocab, 10), beam_search(model, ids, mask, trie, vocab, 10,
                                                                             **eager_kwargs)]
        emulated = beam_search(model, ids, mask, trie, vocab, 10, cuda_graphs="emulate", graph_bucket=16, **kwargs)
        for _ in range(2):  # capture + replay, then replay only
            res = beam_search(model, ids, mask, trie, vocab, 10, cuda_graphs=True, graph_bucket=16, **kwargs)
            assert torch.equal(res.codes, emulated.codes), f"seed {seed}"
            torch.testing.assert_close(res.scores, emulated.scores, rtol=0, atol=0, msg=f"seed {seed}")
        if dtype == torch.float32:
            for other in eager:
                assert torch.equal(res.codes, other.codes), f"seed {seed}"
                torch.testing.assert_close(res.scores, other.scores, rtol=0, atol=1e-4, msg=f"seed {seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_match_emulation_and_eager_on_gpu(dtype):
    check_cuda_graphs_on_gpu(dtype)
