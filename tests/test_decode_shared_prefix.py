"""beam_search(shared_prefix=True): the prompt's K/V kept once per prompt, each beam row holding only its
generated tail, attention by ops.cascade. Ranks exactly as the default path and HF (fp32, left-padded
batches, GQA), eagerly and in the CUDA-graph emulation; the emulated captured functions stay capturable."""
import pytest
import torch

from genrec_fast.decode import SIDVocab, beam_search, graphs, kv, score_sids
from genrec_fast.model import lm_modules

from test_decode import SIZES, START, hf_constrained, left_padded_prompts, random_trie, tiny_model
from test_decode_graphs import _CaptureChecker, _fresh_seed, check_cuda_graphs_on_gpu


@pytest.fixture(autouse=True)
def _no_graph_sets_between_tests():
    graphs.clear_graphs()
    yield
    graphs.clear_graphs()


def _check_same(res, ref, hf_tokens, hf_scores, vocab, seed):
    assert torch.equal(res.codes, vocab.codes(hf_tokens)), f"seed {seed}"
    assert torch.equal(res.codes, ref.codes), f"seed {seed}"
    torch.testing.assert_close(res.scores, hf_scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
    torch.testing.assert_close(res.scores, ref.scores, rtol=0, atol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("family,backend", [("qwen2", "torch"), ("llama", "torch"), ("gpt2", "torch"),
                                            ("qwen2", "triton")])
def test_shared_prefix_matches_default_path_and_hf(family, backend, device):
    """3 levels, 3 left-padded prompts x 8 beams; Qwen2 / Llama have 4 query heads on 2 K/V heads (GQA).
    On the test device (a GPU: the compiled kernel; CPU: the interpreter for backend="triton")."""
    seed = _fresh_seed()
    model = tiny_model(family, seed).to(device)
    trie, vocab = random_trie(seed % 1000), SIDVocab(START, SIZES)
    ids, mask = (t.to(device) for t in left_padded_prompts(3, 9, seed))
    ref = beam_search(model, ids, mask, trie, vocab, 8, backend="torch")
    res = beam_search(model, ids, mask, trie, vocab, 8, backend=backend, shared_prefix=True)
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 8)
    _check_same(res, ref, hf_tokens, hf_scores, vocab, seed)


def test_shared_prefix_four_levels_odd_beams_attends_through_cascade(monkeypatch):
    """4 levels (tails of 1..3 positions reordered twice), 7 beams, prompts of very different padding; the
    steps' attention is cascade_attention in every layer of every step (counted)."""
    sizes = (5, 6, 7, 4)
    seed = _fresh_seed()
    model = tiny_model("llama", seed, vocab_size=START + sum(sizes) + 2)
    trie, vocab = random_trie(seed % 1000, n=120, sizes=sizes), SIDVocab(START, sizes)
    ids, mask = left_padded_prompts(4, 11, seed)
    real, calls = kv.cascade_attention, []  # the op as the shared-prefix attention calls it

    def spy(q, pk, *args, **kwargs):
        calls.append((tuple(q.shape), tuple(pk.shape), tuple(args[2].shape)))
        return real(q, pk, *args, **kwargs)

    monkeypatch.setattr(kv, "cascade_attention", spy)
    res = beam_search(model, ids, mask, trie, vocab, 7, backend="torch", shared_prefix=True)
    layers, heads, kv_heads = model.config.num_hidden_layers, 4, 2
    D = model.config.hidden_size // heads
    # per step and layer: q [P, B, H, D], the prompt's K/V once per prompt, tails of `level` positions
    assert calls == [((4, 7, heads, D), (4, kv_heads, 11, D), (4, 7, kv_heads, level, D))
                     for level in (1, 2, 3) for _ in range(layers)]
    monkeypatch.undo()
    ref = beam_search(model, ids, mask, trie, vocab, 7, backend="torch")
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 7)
    _check_same(res, ref, hf_tokens, hf_scores, vocab, seed)


@pytest.mark.parametrize("heads,kv_heads,backend", [(6, 2, "triton"), (6, 1, "torch")])
def test_shared_prefix_wider_gqa_groups_match_hf(heads, kv_heads, backend, device):
    """3 and 6 query heads per K/V head (head dim 8), 5 beams, 4 left-padded prompts."""
    import transformers

    seed = _fresh_seed()
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=START + sum(SIZES) + 3, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=64,
                                   eos_token_id=1, pad_token_id=0, bos_token_id=2)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    model = model.eval().to(device)
    trie, vocab = random_trie(seed % 1000), SIDVocab(START, SIZES)
    ids, mask = (t.to(device) for t in left_padded_prompts(4, 10, seed))
    ref = beam_search(model, ids, mask, trie, vocab, 5, backend="torch")
    res = beam_search(model, ids, mask, trie, vocab, 5, backend=backend, shared_prefix=True)
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 5)
    _check_same(res, ref, hf_tokens, hf_scores, vocab, seed)


@pytest.mark.parametrize("score", ["full_vocab", "sid"])
def test_shared_prefix_graph_emulation_matches_eager_and_reuses(score):
    """cuda_graphs="emulate" + shared_prefix: same ranking as the eager paths (and HF for full_vocab), across
    a reuse of the set and a narrower batch in the same width bucket; the beam layers hold the prompt once
    (the prefill's own buffers) and L - 1 tail positions per beam row."""
    sizes = (5, 6, 7, 4)
    seed = _fresh_seed()
    model = tiny_model("qwen2", seed, vocab_size=START + sum(sizes) + 2)
    trie, vocab = random_trie(seed % 1000, n=120, sizes=sizes), SIDVocab(START, sizes)
    for T in (9, 12, 9):
        ids, mask = left_padded_prompts(3, T, seed + T)
        ref = beam_search(model, ids, mask, trie, vocab, 6, score=score, backend="torch")
        eager = beam_search(model, ids, mask, trie, vocab, 6, score=score, backend="torch", shared_prefix=True)
        res = beam_search(model, ids, mask, trie, vocab, 6, score=score, backend="torch", shared_prefix=True,
                          cuda_graphs="emulate", graph_bucket=16)
        assert torch.equal(res.codes, ref.codes) and torch.equal(eager.codes, ref.codes), f"seed {seed}"
        torch.testing.assert_close(res.scores, ref.scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
        if score == "full_vocab":
            hf_tokens, _ = hf_constrained(model, ids, mask, trie, vocab, 6)
            assert torch.equal(res.codes, vocab.codes(hf_tokens)), f"seed {seed}"
    base = lm_modules(model)[0]
    (gf,) = graphs._sets[base].values()  # one set: widths 9 and 12 share the 16 bucket, the default path made none
    assert gf.shared_prefix
    for pre, beam in zip(gf.pre_layers, gf.beam_layers):
        assert beam.prefix_k.data_ptr() == pre._k.data_ptr() and beam.prefix_k.shape == (3, 2, 16, 8)
        assert beam._k.shape == (3 * 6, 2, 3, 8)  # P*B rows x L-1 positions: no per-beam prompt copy
    assert all(m is None for m in gf.step_mask4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shared_prefix_captured_functions_do_not_sync_or_upload(backend, device):
    """The shared-prefix prefill and step functions, the attention's torch reference or the Triton wrapper's
    torch ops included, record no host sync and no tensor made from Python data (what a CUDA graph capture
    rejects)."""
    sizes = (5, 6, 7, 4)
    model = tiny_model("qwen2", 5, vocab_size=START + sum(sizes) + 2).to(device)
    trie, vocab = random_trie(5, n=120, sizes=sizes), SIDVocab(START, sizes)
    ids, mask = (t.to(device) for t in left_padded_prompts(3, 9, 5))
    base = lm_modules(model)[0]
    gf = graphs.graph_forward(base, 3, 6, 9, 4, device, "emulate", 16, shared_prefix=True, backend=backend)
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
    res = beam_search(model, ids, mask, trie, vocab, 6, backend=backend, cuda_graphs="emulate", graph_bucket=16,
                      shared_prefix=True)
    assert torch.equal(res.codes, eager.codes)
    assert calls == ["prefill", "prefill"] + [f"step{lv}" for lv in (1, 1, 2, 2, 3, 3)]
    assert checker.bad == []


def test_shared_prefix_errors_and_config_restored():
    model = tiny_model("qwen2", 3)
    trie, vocab = random_trie(3), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 6, 3)
    impl = model.config._attn_implementation
    beam_search(model, ids, mask, trie, vocab, 4, shared_prefix=True)
    assert model.config._attn_implementation == impl and not kv._active_shared
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"^beam_search\(shared_prefix=True\) needs sdpa \(or flash\) attention"):
        beam_search(model, ids, mask, trie, vocab, 4, shared_prefix=True)
    tokens = vocab.token_ids(torch.as_tensor(trie.codes[:2])).view(2, 1, 3)
    with pytest.raises(ValueError, match=r"^score_sids\(shared_prefix=True\) needs sdpa \(or flash\) attention"):
        score_sids(model, ids, mask, tokens, shared_prefix=True)
    model.config._attn_implementation = "sdpa"
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"shared_prefix=True\) supports full-attention layers only"):
        beam_search(model, ids, mask, trie, vocab, 4, shared_prefix=True)
    with pytest.raises(RuntimeError, match="called outside a shared-prefix beam step"):
        kv.shared_prefix_attention(lm_modules(model)[0].layers[0].self_attn, *(torch.zeros(1, 4, 1, 8),) * 3, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prefix_cuda_graphs_on_gpu(dtype):
    """Replayed shared-prefix graphs (Triton attention captured) equal the emulation exactly; in fp32 they rank as
    the default eager path and the eager shared path."""
    check_cuda_graphs_on_gpu(dtype, shared_prefix=True)


def test_shared_prefix_layer_appends_reorders_tails_and_fills():
    """The layer over a prompt layer: appends go to the tails (returned as views), the sequence length counts
    prompt + tail, a reorder permutes the tails only, a full tail raises naming its capacity."""
    from types import SimpleNamespace

    P, B, Hkv, T, D = 2, 3, 2, 5, 4
    source = SimpleNamespace(keys=torch.randn(P, Hkv, T, D), values=torch.randn(P, Hkv, T, D))
    prompt_k = source.keys.clone()
    layer = kv.SharedPrefixLayer(source, torch.ones(P, T, dtype=torch.bool), B, 2)
    assert layer.get_seq_length() == T and layer.prefix_k is source.keys
    steps = [torch.randn(P * B, Hkv, 1, D) for _ in range(2)]
    k, _ = layer.update(steps[0], steps[0] * 2)
    assert k.shape == (P * B, Hkv, 1, D) and torch.equal(k, steps[0]) and layer.get_seq_length() == T + 1
    index = torch.tensor([2, 2, 0, 5, 3, 4])
    layer.reorder_tail(index)
    assert torch.equal(layer.keys, steps[0][index]) and torch.equal(layer.values, steps[0][index] * 2)
    k, v = layer.update(steps[1], steps[1])
    assert torch.equal(k, torch.cat([steps[0][index], steps[1]], 2)) and layer.get_seq_length() == T + 2
    assert torch.equal(source.keys, prompt_k)  # the prompt is never written
    with pytest.raises(RuntimeError, match=r"tail full, 3 > 2 generated positions"):
        layer.update(steps[1], steps[1])
    # the attention function: the layer by module.layer_idx, refuses keys that are not the layer's tails
    from types import SimpleNamespace as NS

    from genrec_fast.ops.cascade import cascade_attention_ref

    q = torch.randn(P * B, 4, 1, D)
    module = NS(layer_idx=0)
    kv._active_shared.append([layer])
    try:
        with pytest.raises(RuntimeError, match="key/value are not the tails the cache layer just returned"):
            kv.shared_prefix_attention(module, q, layer.keys.clone(), layer.values, None)
        out, _ = kv.shared_prefix_attention(module, q, layer.keys, layer.values, None, scaling=0.5)
    finally:
        kv._active_shared.pop()
    want = cascade_attention_ref(q[:, :, 0].reshape(P, B, 4, D), source.keys, source.values, layer.prefix_mask,
                                 layer.keys.reshape(P, B, Hkv, 2, D), layer.values.reshape(P, B, Hkv, 2, D), 0.5)
    assert out.shape == (P * B, 1, 4, D) and torch.equal(out[:, 0], want.reshape(P * B, 4, D))
