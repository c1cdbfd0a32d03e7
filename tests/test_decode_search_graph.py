"""beam_search(cuda_graphs=..., graph_scope="search"): the whole search (prefill, steps, and each level's head
slice, log-sum-exp, trie step, log-softmax and top-k) as ONE captured function per shape.

On CPU ``cuda_graphs="emulate"`` runs that function through the capture protocol eagerly: it must rank exactly
as the eager search and HF (fp32), with either backend and either KV layout, and record no op a CUDA graph
capture rejects (host syncs, tensors made from Python data), checked op by op. On a GPU the real capture is
compared with the emulation and the eager search."""
import numpy as np
import pytest
import torch

from genrec_fast import SIDTrie
from genrec_fast.decode import SIDVocab, beam_search, graphs, search
from genrec_fast.model import lm_modules

from test_decode import SIZES, START, hf_constrained, left_padded_prompts, random_trie, tiny_model
from test_decode_graphs import _CaptureChecker, _fresh_seed, check_cuda_graphs_on_gpu


@pytest.fixture(autouse=True)
def _no_graph_sets_between_tests():
    graphs.clear_graphs()
    yield
    graphs.clear_graphs()


def _graph_set(model) -> graphs.GraphForward:
    (gf,) = graphs._sets[lm_modules(model)[0]].values()
    return gf


def _counted(graph, calls, checker=None):
    fn = graph.fn

    def run():
        calls.append(1)
        if checker is None:
            return fn()
        with checker:
            return fn()
    graph.fn = run


@pytest.mark.parametrize("family,shared_prefix,backend", [
    ("qwen2", False, "torch"), ("llama", True, "torch"), ("gpt2", False, "torch"),
    ("qwen2", False, "triton"), ("qwen2", True, "triton"),
])
def test_search_graph_matches_eager_and_hf(family, shared_prefix, backend):
    """backend="triton" runs every kernel (the beam ops, the fused log-sum-exp, the shared-prefix attention)."""
    seed = _fresh_seed()
    model = tiny_model(family, seed)
    trie, vocab = random_trie(seed % 1000), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 9, seed)
    eager = beam_search(model, ids, mask, trie, vocab, 8, backend="torch")
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 8)
    calls = []
    for i in range(3):  # capture (emulated: warm-up + run), then replays only
        res = beam_search(model, ids, mask, trie, vocab, 8, backend=backend, cuda_graphs="emulate", graph_bucket=16,
                          shared_prefix=shared_prefix, graph_scope="search", lse_backend=backend)
        assert torch.equal(res.codes, eager.codes) and torch.equal(res.codes, vocab.codes(hf_tokens)), f"seed {seed}"
        assert torch.equal(res.leaf_ids, eager.leaf_ids)
        torch.testing.assert_close(res.scores, hf_scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
        torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
        if i == 0:
            gf = _graph_set(model)
            graph = gf.search_graph[1]
            _counted(graph, calls)
    assert gf.search_graph[1] is graph and len(calls) == 2  # one replay per later search, the same graph
    assert all(g.out is None for g in gf.step_graphs[1:]) and gf.prefill_graph.out is None  # no per-forward graphs


@pytest.mark.parametrize("score", ["full_vocab", "sid"])
def test_search_graph_four_levels_and_padding_beams(score):
    """4 levels (the tail reorder inside the search, from parents found in the same run) with more beams than
    SIDs: every SID, then padding (-1 / -inf), as the eager search."""
    sizes = (5, 6, 7, 4)
    model = tiny_model("llama", 4, vocab_size=START + sum(sizes) + 2)
    codes = np.array([[0, 0, 0, 0], [0, 0, 6, 1], [0, 5, 1, 3], [3, 2, 2, 2], [4, 0, 3, 0], [4, 5, 6, 3],
                      [4, 5, 6, 2]])
    trie, vocab = SIDTrie(codes, sizes), SIDVocab(START, sizes)
    for P, T in ((2, 7), (2, 12)):  # one 16-wide bucket: the second batch replays the first's graph
        ids, mask = left_padded_prompts(P, T, T)
        eager = beam_search(model, ids, mask, trie, vocab, 9, score=score)
        res = beam_search(model, ids, mask, trie, vocab, 9, score=score, cuda_graphs="emulate", graph_bucket=16,
                          graph_scope="search")
        assert (res.codes[:, 7:] == -1).all() and torch.isneginf(res.scores[:, 7:]).all()
        assert torch.equal(res.codes, eager.codes) and torch.equal(res.leaf_ids, eager.leaf_ids)
        torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4)
    assert len(graphs._sets[lm_modules(model)[0]]) == 1


@pytest.mark.parametrize("backend,shared_prefix,layout", [
    ("torch", False, "dense"), ("torch", True, "csr"), ("triton", False, "csr"), ("triton", True, "dense"),
])
def test_search_graph_does_not_sync_or_upload(backend, shared_prefix, layout, device):
    """Every op of the whole search (forwards, head slice, log-sum-exp (fused with backend="triton"), trie step of
    either layout, log-softmax, top-k, the beams' bookkeeping) with either backend records no host sync and no
    tensor made from Python data."""
    sizes = (5, 6, 7, 4)
    model = tiny_model("qwen2", 5, vocab_size=START + sum(sizes) + 2).to(device)
    trie, vocab = random_trie(5, n=120, sizes=sizes), SIDVocab(START, sizes)
    search._device_arrays_cache[trie] = {str(torch.device(device)): trie.device_arrays(device, layout=layout)}
    assert {lv.layout for lv in search.trie_device_arrays(trie, device).levels} == {layout}
    ids, mask = (t.to(device) for t in left_padded_prompts(3, 9, 5))
    eager = beam_search(model, ids, mask, trie, vocab, 6)
    kwargs = dict(backend=backend, cuda_graphs="emulate", graph_bucket=16, shared_prefix=shared_prefix,
                  graph_scope="search", lse_backend=backend)
    beam_search(model, ids, mask, trie, vocab, 6, **kwargs)
    checker, calls = _CaptureChecker(), []
    _counted(_graph_set(model).search_graph[1], calls, checker)
    res = beam_search(model, ids, mask, trie, vocab, 6, **kwargs)
    assert torch.equal(res.codes, eager.codes) and len(calls) == 1
    assert checker.bad == []


def test_search_graph_recaptured_for_another_trie_score_or_head():
    """What the search reads besides its static buffers (trie arrays, head, scoring choices) is part of its key:
    another trie or score recaptures; the forward-scope graphs of the same set are separate and still agree."""
    model = tiny_model("qwen2", 7)
    vocab = SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 9, 7)
    seen, tries = [], {1: random_trie(1), 2: random_trie(2)}
    for trie_seed, score in ((1, "full_vocab"), (1, "full_vocab"), (2, "full_vocab"), (2, "sid")):
        trie = tries[trie_seed]
        eager = beam_search(model, ids, mask, trie, vocab, 8, score=score)
        res = beam_search(model, ids, mask, trie, vocab, 8, score=score, cuda_graphs="emulate", graph_scope="search")
        assert torch.equal(res.codes, eager.codes), (trie_seed, score)
        seen.append(_graph_set(model).search_graph[1])
        fwd = beam_search(model, ids, mask, trie, vocab, 8, score=score, cuda_graphs="emulate")
        assert torch.equal(fwd.codes, eager.codes)
    assert seen[0] is seen[1] and len({id(g) for g in seen}) == 3
    assert seen[0].fn is None and seen[0].out is None  # a replaced search graph lets go of its function
    with torch.no_grad():  # an in-place update of the head: same addresses, so the replays read the new weights
        lm_modules(model)[1].weight.mul_(1.5)
    eager = beam_search(model, ids, mask, trie, vocab, 8, score="sid")
    res = beam_search(model, ids, mask, trie, vocab, 8, score="sid", cuda_graphs="emulate", graph_scope="search")
    assert torch.equal(res.codes, eager.codes) and _graph_set(model).search_graph[1] is seen[-1]
    torch.testing.assert_close(res.scores, eager.scores, rtol=0, atol=1e-4)


def test_graph_scope_errors():
    model = tiny_model("qwen2", 1)
    trie, vocab = random_trie(1), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 6, 1)
    with pytest.raises(ValueError, match="graph_scope must be one of"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs="emulate", graph_scope="level")
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        beam_search(model, ids, mask, trie, vocab, 4, cuda_graphs=True, graph_scope="search")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_search_graph_cuda_matches_emulation_and_eager_on_gpu(dtype, shared_prefix):
    """The captured search replays exactly what the same function computes eagerly ("emulate"); in fp32 it ranks
    as the eager searches."""
    check_cuda_graphs_on_gpu(dtype, shared_prefix=shared_prefix, graph_scope="search")


def test_gpt2_padding_check_is_skipped_under_capture(monkeypatch):
    """The prefill takes no attention mask, so GPT-2's forward runs HF's "pad id at either end?" check (a host
    sync); transformers skips it while a CUDA stream captures (``is_tracing``), which is what a capture sees: with
    that flag on, the whole search records no op a capture rejects. (Its padding positions repeat the last real
    token, so the check never warns either.)"""
    import transformers.utils.import_utils as hf_import_utils

    model = tiny_model("gpt2", 9)
    trie, vocab = random_trie(9), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 9, 9)
    eager = beam_search(model, ids, mask, trie, vocab, 8)
    kwargs = dict(cuda_graphs="emulate", graph_scope="search")
    beam_search(model, ids, mask, trie, vocab, 8, **kwargs)
    for capturing, expect_bad in ((False, True), (True, False)):
        monkeypatch.setattr(hf_import_utils, "is_cuda_stream_capturing", lambda flag=capturing: flag)
        checker, calls = _CaptureChecker(), []
        _counted(_graph_set(model).search_graph[1], calls, checker)
        res = beam_search(model, ids, mask, trie, vocab, 8, **kwargs)
        assert torch.equal(res.codes, eager.codes) and len(calls) == 1
        assert bool(checker.bad) == expect_bad, checker.bad
