"""Constrained beam search: parity with HF generate(prefix_allowed_tokens_fn=...) on fresh tiny random
models (Qwen2, Llama, GPT-2), exhaustive-enumeration checks of both score modes, padding, errors."""
import numpy as np
import pytest
import torch
import transformers

from genrec_fast import SIDTrie
from genrec_fast.decode import BeamSearchResult, SIDVocab, beam_search, full_vocab_lse, kv
from genrec_fast.decode.search import trie_device_arrays
from genrec_fast.sid_tokens import sid_token_strings

SIZES = (5, 6, 7)
START = 40  # SID block 40..57; eos 1, pad 0, bos 2 lie outside it
VOCAB = START + sum(SIZES) + 3


def tiny_model(family: str, seed: int, vocab_size: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, eos_token_id=1, pad_token_id=0, bos_token_id=2)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
        model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # spread the logits so near-ties do not make rankings flaky
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return model.eval()


def random_trie(seed: int, n: int = 60, allow_duplicates: bool = False, sizes=SIZES) -> SIDTrie:
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, k, n) for k in sizes], 1)
    if not allow_duplicates:
        codes = np.unique(codes, axis=0)
    return SIDTrie(codes, sizes, allow_duplicates=allow_duplicates)


def left_padded_prompts(P: int, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, START, (P, T), generator=gen)
    mask = torch.ones(P, T, dtype=torch.long)
    for p in range(P):
        mask[p, : (p * 3) % (T - 1)] = 0
    ids[mask == 0] = 0
    return ids, mask


def hf_constrained(model, ids, mask, trie, vocab, B):
    """HF beam search with a dict prefix -> allowed SID tokens callback (the reference stacks' way)."""
    allowed = {}
    for row in trie.codes:
        toks = vocab.token_ids(torch.as_tensor(row)).tolist()
        for level in range(len(toks)):
            allowed.setdefault(tuple(toks[:level]), set()).add(toks[level])
    allowed = {k: sorted(v) for k, v in allowed.items()}
    T = ids.shape[1]

    def prefix_fn(batch_id, sent):
        # rows that ran out of valid SIDs carry -inf junk; any non-empty answer keeps them -inf
        return allowed.get(tuple(sent[T:].tolist()), [0])

    out = model.generate(input_ids=ids, attention_mask=mask, num_beams=B, num_return_sequences=B,
                         max_new_tokens=trie.num_levels, length_penalty=0.0, do_sample=False, early_stopping=False,
                         prefix_allowed_tokens_fn=prefix_fn, output_scores=True, return_dict_in_generate=True)
    P = ids.shape[0]
    return out.sequences[:, T:].reshape(P, B, -1), out.sequences_scores.reshape(P, B)


def teacher_forced_scores(model, ids, mask, vocab, codes, score):
    """Score every SID in ``codes`` [N, L] for every prompt by a full forward pass (no cache)."""
    P, N, L = ids.shape[0], codes.shape[0], codes.shape[1]
    toks = vocab.token_ids(torch.as_tensor(codes))  # [N, L]
    full = torch.cat([ids.repeat_interleave(N, 0), toks.repeat(P, 1)], 1)
    fmask = torch.cat([mask.repeat_interleave(N, 0), torch.ones(P * N, L, dtype=torch.long)], 1)
    pos = (fmask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=fmask, position_ids=pos).logits.float()
    T = ids.shape[1]
    total = torch.zeros(P * N)
    for level in range(L):
        step = logits[:, T - 1 + level]
        if score == "full_vocab":
            lp = torch.log_softmax(step, -1)
        else:  # normalise over the SID tokens the trie allows after this prefix
            lo, hi = vocab.level_range(level)
            prefix = torch.as_tensor(codes)[:, :level].repeat(P, 1)
            same = (prefix[:, None, :] == torch.as_tensor(codes)[None, :, :level]).all(-1)  # [P*N, N]
            allowed = torch.zeros(P * N, hi - lo, dtype=torch.bool)
            for r in range(P * N):
                allowed[r, torch.as_tensor(codes)[same[r], level].long()] = True
            sub = torch.where(allowed, step[:, lo:hi], torch.tensor(float("-inf")))
            lp = torch.full_like(step, float("-inf"))
            lp[:, lo:hi] = torch.log_softmax(sub, -1)
        total += lp.gather(1, full[:, T + level:T + level + 1]).squeeze(1)
    return total.view(P, N)


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_with_hf_constrained_generate(family, backend, device):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh model every run; printed on failure
    model = tiny_model(family, seed).to(device)
    trie = random_trie(seed % 1000)
    vocab = SIDVocab(START, SIZES)
    ids, mask = (t.to(device) for t in left_padded_prompts(3, 9, seed))
    B = 8
    res = beam_search(model, ids, mask, trie, vocab, B, score="full_vocab", backend=backend)
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, B)
    assert isinstance(res, BeamSearchResult) and res.codes.shape == (3, B, 3)
    assert torch.equal(res.codes, vocab.codes(hf_tokens)), f"seed {seed}"
    torch.testing.assert_close(res.scores, hf_scores, rtol=0, atol=1e-4, msg=f"seed {seed}")
    codes = res.codes.reshape(-1, 3).cpu().numpy()
    assert trie.contains(codes).all()  # invalid rate 0
    assert torch.equal(torch.as_tensor(trie.lookup(codes)).view(3, B), res.leaf_ids.cpu())


def test_four_levels_beam_buffer_and_generic_cache_path_match_hf(monkeypatch):
    """4 levels (KV tail of 2 generated positions to reorder); the in-place beam KV buffer and the
    generic ``cache.reorder_cache`` path give HF's ranking."""
    sizes = (5, 6, 7, 4)
    model = tiny_model("llama", 13, vocab_size=START + sum(sizes) + 2)
    trie = random_trie(13, n=120, sizes=sizes)
    vocab = SIDVocab(START, sizes)
    ids, mask = left_padded_prompts(3, 8, 13)
    fast = beam_search(model, ids, mask, trie, vocab, 10, backend="torch")
    monkeypatch.setattr(kv, "HAS_LAYERED_CACHE", False)  # every cache takes the generic path
    generic = beam_search(model, ids, mask, trie, vocab, 10, backend="torch")
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 10)
    for res in (fast, generic):
        assert torch.equal(res.codes, vocab.codes(hf_tokens))
        torch.testing.assert_close(res.scores, hf_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("score", ["full_vocab", "sid"])
def test_exhaustive_beam_equals_enumeration_and_pads(score, device):
    """With B > #SIDs the search is exhaustive: it must return every SID, ranked by its exact
    teacher-forced score, followed by padding."""
    model = tiny_model("qwen2", 11)
    codes = np.array([[0, 0, 0], [0, 0, 6], [0, 5, 1], [3, 2, 2], [4, 0, 3], [4, 5, 6]])
    trie = SIDTrie(codes, SIZES)
    vocab = SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 7, 3)
    B = 9
    res = beam_search(model.to(device), ids.to(device), mask.to(device), trie, vocab, B, score=score, backend="triton")
    res = BeamSearchResult(res.codes.cpu(), res.scores.cpu(), res.leaf_ids.cpu(), trie)
    expect = teacher_forced_scores(model.cpu(), ids, mask, vocab, codes, score)
    n = len(codes)
    for p in range(2):
        order = torch.argsort(expect[p], descending=True)
        assert res.codes[p, :n].tolist() == codes[order.numpy()].tolist()
        torch.testing.assert_close(res.scores[p, :n], expect[p, order], rtol=0, atol=1e-4)
        assert (res.codes[p, n:] == -1).all() and torch.isneginf(res.scores[p, n:]).all()
        assert (res.leaf_ids[p, n:] == -1).all()
        assert [a.size for a in res.item_ids[p][n:]] == [0] * (B - n)
        assert [a.tolist() for a in res.item_ids[p][:n]] == [[int(i)] for i in order]
    if score == "sid":  # per-level normalisation over allowed codes: probabilities of all SIDs sum to 1
        torch.testing.assert_close(torch.exp(res.scores[:, :n]).sum(1), torch.ones(2))


def test_fewer_sids_than_beams_matches_hf_on_real_beams():
    model = tiny_model("llama", 5)
    codes = np.array([[1, 2, 3], [1, 2, 4], [1, 3, 0], [2, 0, 0], [4, 4, 4]])
    trie = SIDTrie(codes, SIZES)
    vocab = SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 6, 9)
    res = beam_search(model, ids, mask, trie, vocab, 7, backend="torch")
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 7)
    real = hf_scores > -1e8  # HF fills the missing beams with junk scored about -1e9
    assert real.sum(1).tolist() == [5, 5]
    assert torch.equal(res.codes[:, :5], vocab.codes(hf_tokens[:, :5]))
    torch.testing.assert_close(res.scores[:, :5], hf_scores[:, :5], rtol=0, atol=1e-4)
    assert torch.isneginf(res.scores[:, 5:]).all() and (res.codes[:, 5:] == -1).all()


def test_duplicate_sids_map_to_all_their_items():
    codes = np.array([[1, 1, 1], [2, 2, 2], [1, 1, 1], [3, 0, 5]])
    trie = SIDTrie(codes, SIZES, item_ids=[10, 11, 12, 13], allow_duplicates=True)
    model = tiny_model("qwen2", 2)
    ids, mask = left_padded_prompts(1, 5, 1)
    res = beam_search(model, ids, mask, trie, SIDVocab(START, SIZES), 3)
    got = {tuple(c): sorted(a.tolist()) for c, a in zip(res.codes[0].tolist(), res.item_ids[0])}
    assert got == {(1, 1, 1): [10, 12], (2, 2, 2): [11], (3, 0, 5): [13]}


@pytest.mark.parametrize("level", [1, 2])
def test_inconsistent_trie_raises(level):
    trie = random_trie(4)
    model = tiny_model("qwen2", 4)
    ids, mask = left_padded_prompts(2, 5, 4)
    da = trie_device_arrays(trie, torch.device("cpu"))
    lv = da.levels[level]
    assert lv.layout == "dense"
    lv.table[:] = -1  # every node of this depth loses its children
    with pytest.raises(RuntimeError, match=rf"no allowed continuation at level {level} \(prompt, beam\) = \[\(0, 0\)"):
        beam_search(model, ids, mask, trie, SIDVocab(START, SIZES), 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_logits_raise_after_the_search(backend, device):
    trie = random_trie(4)
    model = tiny_model("qwen2", 4).to(device)  # on a GPU machine the Triton kernels are compiled, not interpreted
    with torch.no_grad():
        model.get_output_embeddings().weight[START + SIZES[0] + 2] = float("nan")  # one level-1 SID row
    ids, mask = (t.to(device) for t in left_padded_prompts(2, 5, 4))
    with pytest.raises(RuntimeError, match=r"NaN scores at level 1 \(prompt, beam\) = \[\(0, 0\)"):
        beam_search(model, ids, mask, trie, SIDVocab(START, SIZES), 4, score="sid", backend=backend)


def test_input_errors_and_training_flag_restored():
    trie = random_trie(6)
    model = tiny_model("qwen2", 6).train()
    vocab = SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(2, 5, 6)
    right = mask.flip(1)
    right[:, 0] = 1
    right[1, -1] = 0
    with pytest.raises(ValueError, match=r"LEFT padded.*row\(s\) \[1\]"):
        beam_search(model, ids, right, trie, vocab, 4)
    with pytest.raises(ValueError, match="codebook sizes"):
        beam_search(model, ids, mask, trie, SIDVocab(START, (5, 6, 8)), 4)
    with pytest.raises(ValueError, match="LM head has"):
        beam_search(model, ids, mask, trie, SIDVocab(VOCAB - 5, SIZES), 4)
    with pytest.raises(ValueError, match="score must be one of"):
        beam_search(model, ids, mask, trie, vocab, 4, score="bogus")
    with pytest.raises(ValueError, match="batch, T >= 1"):
        beam_search(model, ids[:0], mask[:0], trie, vocab, 4)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="logits are rescaled"):
        beam_search(model, ids, mask, trie, vocab, 4)
    model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="input_ids must be a torch.Tensor, got list"):
        beam_search(model, ids.tolist(), mask, trie, vocab, 4)
    with pytest.raises(ValueError, match="attention_mask must be a torch.Tensor, got list"):
        beam_search(model, ids, mask.tolist(), trie, vocab, 4)
    model.model.layers[0].eval()  # a submodule kept in eval mode on purpose (a frozen block)
    res = beam_search(model, ids, mask, trie, vocab, 4)
    # restored after the search (which ran in eval mode): each module's own flag, not the top one's
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    res_eval = beam_search(model.eval(), ids, mask, trie, vocab, 4)
    assert torch.equal(res.codes, res_eval.codes)
    # the results are ordinary tensors (not inference-mode ones): callers may edit them in place
    assert not res.codes.is_inference() and not res.scores.is_inference() and not res.leaf_ids.is_inference()
    res.codes[res.codes < 0] = 0
    res.scores.mul_(2.0)


def test_sid_vocab_roundtrip_and_errors():
    v = SIDVocab(100, (4, 3, 5))
    assert v.offsets == (0, 4, 7) and v.end == 112 and v.level_range(2) == (107, 112)
    codes = torch.tensor([[[0, 0, 0], [3, 2, 4]]])
    toks = v.token_ids(codes)
    assert toks.tolist() == [[[100, 104, 107], [103, 106, 111]]]
    assert torch.equal(v.codes(toks), codes)
    assert v.token_ids([1, 2]).tolist() == [101, 106]  # a prefix
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        v.token_ids(np.array([[0, 0, 0], [0, 3, 0]]))
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
        v.codes(torch.tensor([[104, 104, 107]]))  # level-1 token at level 0
    with pytest.raises(ValueError, match="must hold integers"):
        v.token_ids(np.array([[0.5, 0, 0]]))


def _word_tokenizer(extra_tokens):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]", "[PAD]", "hello", "world"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.add_tokens(extra_tokens)
    return fast


def test_sid_vocab_from_tokenizer():
    tok = _word_tokenizer(sid_token_strings((3, 2, 4)))
    v = SIDVocab.from_tokenizer(tok)
    assert v == SIDVocab(4, (3, 2, 4))
    assert SIDVocab.from_tokenizer(tok, codebook_sizes=(3, 2, 4)) == v
    ids = tok.convert_tokens_to_ids(["<a_2>", "<b_1>", "<c_3>"])
    assert v.codes(torch.tensor(ids)).tolist() == [2, 1, 3]
    shuffled = sid_token_strings((3, 2))
    shuffled[1], shuffled[2] = shuffled[2], shuffled[1]
    with pytest.raises(ValueError, match="not contiguous/ordered"):
        SIDVocab.from_tokenizer(_word_tokenizer(shuffled))
    with pytest.raises(ValueError, match=r"lacks SID token\(s\) \['<b_1>'\]"):
        SIDVocab.from_tokenizer(_word_tokenizer(["<a_0>", "<b_0>", "<b_2>"]))
    with pytest.raises(ValueError, match="no SID tokens"):
        SIDVocab.from_tokenizer(_word_tokenizer([]))


@pytest.mark.gpu
def test_cuda_triton_matches_torch_backend_and_hf():
    dev = torch.device("cuda")
    model = tiny_model("qwen2", 21).to(dev)
    trie = random_trie(21)
    vocab = SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(4, 9, 21)
    ids, mask = ids.to(dev), mask.to(dev)
    a = beam_search(model, ids, mask, trie, vocab, 8, backend="triton")
    b = beam_search(model, ids, mask, trie, vocab, 8, backend="torch")
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 8)
    assert torch.equal(a.codes, vocab.codes(hf_tokens))
    torch.testing.assert_close(a.scores, hf_scores, rtol=0, atol=1e-4)
    bf = beam_search(model.to(torch.bfloat16), ids, mask, trie, vocab, 8, backend="triton")
    assert trie.contains(bf.codes.reshape(-1, 3).cpu().numpy()).all()


def test_full_vocab_lse_chunked_equals_logsumexp():
    gen = torch.Generator().manual_seed(3)
    h, w, b = torch.randn(7, 16, generator=gen), torch.randn(5000, 16, generator=gen), torch.randn(5000, generator=gen)
    expect = torch.logsumexp(h @ w.T + b, dim=1)
    for chunk in (1, 7 * 1024, 1 << 26):  # 1024-column chunks (the floor), 1024 again, one chunk
        torch.testing.assert_close(full_vocab_lse(h, w, b, chunk_elems=chunk), expect)
    torch.testing.assert_close(full_vocab_lse(h, w, None, chunk_elems=1), torch.logsumexp(h @ w.T, dim=1))
    # -inf logits at the start of the vocabulary (a bias that masks tokens): still exact, not NaN
    b[:40] = float("-inf")
    for chunk in (7 * 2048, 1 << 26):
        torch.testing.assert_close(full_vocab_lse(h, w, b, chunk_elems=chunk), torch.logsumexp(h @ w.T + b, dim=1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_decode_sdpa_equals_repeated_kv_attention(dtype, tol, monkeypatch):
    """One query token, grouped K/V heads, a mask shared by the heads: the packed attention equals sdpa
    over K/V repeated to every head (what transformers' sdpa path computes), on a strided cache view."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        dtype, tol = torch.bfloat16, 2e-2  # CPU sdpa: half types via bf16
    gen = torch.Generator().manual_seed(5)
    R, H, KVH, S, D = 7, 6, 2, 19, 16
    module = torch.nn.Module()
    module.num_key_value_groups = H // KVH
    q = torch.randn(R, H, 1, D, generator=gen).to(dtype)
    buf = torch.randn(2, R, KVH, S + 5, D, generator=gen).to(dtype)  # capacity > length: strided views
    k, v = buf[0][:, :, :S], buf[1][:, :, :S]
    keep = torch.rand(R, 1, 1, S, generator=gen) > 0.3
    keep[..., -1] = True
    mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    real = kv.sdpa_attention_forward

    def no_one_token_fallback(module, query, *a, **kw):
        assert query.shape[2] != 1, "one query token must take the packed path"
        return real(module, query, *a, **kw)

    monkeypatch.setattr(kv, "sdpa_attention_forward", no_one_token_fallback)
    out, _ = kv.decode_sdpa(module, q, k, v, mask, scaling=D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1), attn_mask=mask, scale=D ** -0.5)
    assert out.shape == (R, 1, H, D)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=tol, rtol=tol)
    # several query tokens or a per-head mask: transformers' own sdpa path, same result
    q2 = torch.randn(R, H, 3, D, generator=gen).to(dtype)
    mask2 = mask.expand(R, 1, 3, S).contiguous()
    out2, _ = kv.decode_sdpa(module, q2, k, v, mask2, scaling=D ** -0.5)
    ref2 = torch.nn.functional.scaled_dot_product_attention(
        q2, k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1), attn_mask=mask2, scale=D ** -0.5)
    torch.testing.assert_close(out2, ref2.transpose(1, 2), atol=tol, rtol=tol)


def test_beam_search_steps_use_decode_sdpa_and_restore_the_config(monkeypatch):
    model = tiny_model("qwen2", 3)
    assert model.config._attn_implementation == "sdpa"
    calls = []
    real = kv.decode_sdpa

    def spy(module, query, *a, **kw):
        calls.append((query.shape[2], model.config._attn_implementation))
        return real(module, query, *a, **kw)

    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, kv.DECODE_SDPA, spy)
    codes = np.array([[0, 1, 2], [0, 2, 1], [1, 0, 0], [2, 2, 2]])
    trie = SIDTrie(codes, SIZES)
    ids, mask = left_padded_prompts(3, 9, 4)
    for graphs in (False, "emulate"):
        calls.clear()
        beam_search(model, ids, mask, trie, SIDVocab(START, SIZES), 3, cuda_graphs=graphs, graph_bucket=16)
        steps = [c for c in calls if c[0] == 1]  # the spy is only reached when the swap happened
        # levels 1 and 2, every layer (the emulated capture protocol runs each step function more than once)
        per_search = 2 * model.config.num_hidden_layers
        assert len(steps) == per_search if graphs is False else len(steps) % per_search == 0
    assert model.config._attn_implementation == "sdpa"


def test_decode_attention_swaps_only_sdpa_configs_and_restores_them(monkeypatch):
    """Only (sub-)configs on "sdpa" are swapped, each restored exactly, after an exception too; nothing
    is swapped when "sdpa" is not transformers' own function (a library replaced it)."""
    cfg = transformers.LlavaConfig()
    cfg._attn_implementation = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    tree = kv._config_tree(cfg)
    before = [c._attn_implementation for c in tree]
    assert sorted(before) == ["eager", "sdpa", "sdpa"]
    with pytest.raises(RuntimeError, match="boom"):
        with kv.decode_attention(cfg):
            inside = [c._attn_implementation for c in tree]
            raise RuntimeError("boom")
    assert inside == [kv.DECODE_SDPA if b == "sdpa" else b for b in before]
    assert [c._attn_implementation for c in tree] == before

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", lambda *a, **k: None)
    with kv.decode_attention(cfg):
        assert [c._attn_implementation for c in tree] == before


def test_flash_attention_model_searches_like_its_sdpa_twin():
    """A model configured for flash attention (flash-attn is not even installed here) runs the search's
    forwards on decode_sdpa: the same beams and scores as the sdpa model, and its config comes back."""
    trie, vocab = random_trie(8), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 7, 8)
    want = beam_search(tiny_model("qwen2", 8), ids, mask, trie, vocab, 6)
    model = tiny_model("qwen2", 8)
    model.config._attn_implementation_internal = "flash_attention_2"
    got = beam_search(model, ids, mask, trie, vocab, 6)
    assert torch.equal(got.codes, want.codes) and torch.allclose(got.scores, want.scores, atol=1e-5)
    assert model.config._attn_implementation_internal == "flash_attention_2"


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_score_sids_equals_teacher_forcing_and_the_beam_scores(family, shared_prefix):
    """score_sids (one prefill per prompt, its cache copied to the prompt's responses, or with shared_prefix kept
    once for all of them) gives the full-vocabulary log-prob of each response as a plain teacher-forced forward of
    prompt + response does, on left-padded prompts of several lengths; on the beams' own SIDs it gives the beam
    scores."""
    from genrec_fast.decode import score_sids
    from genrec_fast.model import sequence_logprobs

    model = tiny_model(family, 3)
    vocab = SIDVocab(START, SIZES)
    trie = random_trie(4)
    ids, mask = left_padded_prompts(3, 9, 5)
    rng = np.random.default_rng(6)
    rows = trie.codes[rng.integers(0, len(trie.codes), (3, 7))]  # [P, C=7, L] SIDs of the catalogue
    tokens = vocab.token_ids(torch.as_tensor(rows.reshape(-1, 3))).view(3, 7, 3)
    got = score_sids(model, ids, mask, tokens, shared_prefix=shared_prefix)
    assert got.shape == (3, 7) and got.dtype == torch.float32
    with torch.no_grad():
        want = torch.stack([sequence_logprobs(model, ids[p:p + 1].expand(7, -1), mask[p:p + 1].expand(7, -1),
                                              tokens[p]) for p in range(3)])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    res = beam_search(model, ids, mask, trie, vocab, 6, score="full_vocab", backend="torch")
    beam_tokens = vocab.token_ids(res.codes.reshape(-1, 3)).view(3, 6, 3)
    torch.testing.assert_close(score_sids(model, ids, mask, beam_tokens, shared_prefix=shared_prefix), res.scores,
                               rtol=0, atol=2e-5)
    assert score_sids(model, ids, mask, tokens[:, :0], shared_prefix=shared_prefix).shape == (3, 0)
    with pytest.raises(ValueError, match=r"tokens must be a \[P=3, C, L\] tensor, got \(2, 7, 3\)"):
        score_sids(model, ids, mask, tokens[:2])


def test_fused_lse_backend_ranks_as_hf():
    """lse_backend="triton" (the head's matmul fused with the log-sum-exp, interpreter on CPU) ranks exactly as
    HF and the default chunked reference, with scores within 1e-4 (fp32)."""
    model = tiny_model("qwen2", 21)
    trie, vocab = random_trie(21), SIDVocab(START, SIZES)
    ids, mask = left_padded_prompts(3, 9, 21)
    hf_tokens, hf_scores = hf_constrained(model, ids, mask, trie, vocab, 8)
    default = beam_search(model, ids, mask, trie, vocab, 8)
    fused = beam_search(model, ids, mask, trie, vocab, 8, lse_backend="triton")
    assert torch.equal(fused.codes, default.codes) and torch.equal(fused.codes, vocab.codes(hf_tokens))
    torch.testing.assert_close(fused.scores, hf_scores, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="backend must be one of"):
        beam_search(model, ids, mask, trie, vocab, 8, lse_backend="fused")
