"""beam_search on PEFT-wrapped models (LoRA + trainable SID rows of a tied head) equals the merged model."""
import copy

import numpy as np
import pytest
import torch

from genrec_fast import SIDTrie
from genrec_fast.decode import beam_search
from genrec_fast.model import encode_prompts, load_model_and_tokenizer

CORPUS = ["Red tape for the shop", "Blue glue", "### Instruction:\nRecommend the next item.\n### Response:\n"] * 5
SIZES = (4, 3, 5)
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}


def _lora_model(tied: bool = True):
    model, tok, vocab = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                                 model_overrides={**SMALL, "tie_word_embeddings": tied}, lora=True,
                                                 lora_r=4, seed=0)
    # adapters start as the identity (LoRA B = 0, token deltas = the original rows): move them
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok, vocab


@pytest.mark.parametrize("tied", [True, False])
def test_lora_model_searches_like_its_merged_copy(tied):
    model, tok, vocab = _lora_model(tied)
    head = model.get_base_model().get_output_embeddings()
    assert not isinstance(head, torch.nn.Linear)  # the case this test is about
    # the SID rows train in the head too, tied to the embedding or not (an untied head was left frozen)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "trainable_tokens" in n]
    assert len(trainable) == (1 if tied else 2) and (tied or any("lm_head" in n for n in trainable))
    rng = np.random.default_rng(0)
    codes = np.unique(np.stack([rng.integers(0, k, 40) for k in SIZES], 1), axis=0)
    trie = SIDTrie(codes, SIZES)
    ids, mask = encode_prompts(tok, ["Red tape", "Blue glue for the shop", "tape"])
    merged = copy.deepcopy(model).merge_and_unload()
    for score in ("full_vocab", "sid"):
        got = beam_search(model, ids, mask, trie, vocab, num_beams=6, score=score, backend="torch")
        ref = beam_search(merged, ids, mask, trie, vocab, num_beams=6, score=score, backend="torch")
        assert torch.equal(got.codes, ref.codes)
        assert torch.allclose(got.scores, ref.scores, atol=1e-4)
        # the shared-prefix layout on the PEFT-wrapped model (LoRA on the attention projections) too
        shared = beam_search(model, ids, mask, trie, vocab, num_beams=6, score=score, backend="torch",
                             shared_prefix=True)
        assert torch.equal(shared.codes, ref.codes)
        assert torch.allclose(shared.scores, ref.scores, atol=1e-4)


def test_non_affine_head_raises():
    model, tok, vocab = _lora_model()
    base = model.get_base_model()

    class Squashed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return torch.tanh(self.inner(x))

    base.set_output_embeddings(Squashed(base.get_output_embeddings()))
    trie = SIDTrie(np.array([[0, 0, 0], [1, 2, 3]]), SIZES)
    ids, mask = encode_prompts(tok, ["Red tape"])
    with pytest.raises(ValueError, match="not an affine map"):
        beam_search(model, ids, mask, trie, vocab, num_beams=2, backend="torch")


def test_head_is_read_in_eval_mode_and_again_after_an_in_place_update():
    """A head with dropout is read after model.eval() (a train-mode read was random); the cached read of a
    non-Linear head is dropped when a parameter changes in place (an optimizer step)."""
    model, tok, vocab = _lora_model()
    base = model.get_base_model()
    inner = base.get_output_embeddings()
    base.set_output_embeddings(torch.nn.Sequential(torch.nn.Dropout(0.5), inner))
    rng = np.random.default_rng(0)
    trie = SIDTrie(np.unique(np.stack([rng.integers(0, k, 40) for k in SIZES], 1), axis=0), SIZES)
    ids, mask = encode_prompts(tok, ["Red tape", "Blue glue for the shop"])
    want = beam_search(model.eval(), ids, mask, trie, vocab, num_beams=6, backend="torch")
    for _ in range(3):
        got = beam_search(model.train(), ids, mask, trie, vocab, num_beams=6, backend="torch")
        assert model.training
        assert torch.equal(got.codes, want.codes) and torch.allclose(got.scores, want.scores, atol=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.neg_()
    after = beam_search(model, ids, mask, trie, vocab, num_beams=6, backend="torch")
    merged = copy.deepcopy(model).eval()
    merged.get_base_model().set_output_embeddings(merged.get_base_model().get_output_embeddings()[1])
    ref = beam_search(merged.merge_and_unload(), ids, mask, trie, vocab, num_beams=6, backend="torch")
    assert torch.equal(after.codes, ref.codes) and torch.allclose(after.scores, ref.scores, atol=1e-4)
    assert not torch.equal(after.scores, want.scores)


def test_graph_sets_are_keyed_by_the_adapter_state():
    """A capture bakes in which adapters run: disabling them (the LoRA reference policy) must select
    another graph set, not replay the adapted one."""
    from genrec_fast.decode import graphs
    from genrec_fast.model import lm_modules

    model, _, _ = _lora_model()
    base = lm_modules(model)[0]
    on = graphs._fingerprint(base)
    with model.disable_adapter():
        off = graphs._fingerprint(base)
    assert on != off and graphs._fingerprint(base) == on
    # a capture also bakes in each LoRA scale (a Python float in the forward)
    from peft.tuners.lora import LoraLayer

    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", 0.5)
    assert graphs._fingerprint(base) not in (on, off)


def test_cached_lora_head_follows_the_adapter_state():
    """The LM head read off a LoRA model is cached; disabling / re-enabling the adapter (the LoRA reference
    policy) changes the head's output without touching a parameter, so it must not reuse the stale read."""
    from genrec_fast.decode import search

    model, tok, vocab = _lora_model(tied=False)
    rng = np.random.default_rng(2)
    trie = SIDTrie(np.unique(np.stack([rng.integers(0, k, 40) for k in SIZES], 1), axis=0), SIZES)
    ids, mask = encode_prompts(tok, ["Red tape", "Blue glue for the shop"])
    on = beam_search(model, ids, mask, trie, vocab, num_beams=5, backend="torch")
    with model.disable_adapter():
        off = beam_search(model, ids, mask, trie, vocab, num_beams=5, backend="torch")
        search._affine_cache.clear()
        fresh = beam_search(model, ids, mask, trie, vocab, num_beams=5, backend="torch")
    assert torch.equal(off.codes, fresh.codes) and torch.equal(off.scores, fresh.scores)
    assert not torch.allclose(off.scores, on.scores, atol=1e-3)  # the adapter matters here
    again = beam_search(model, ids, mask, trie, vocab, num_beams=5, backend="torch")
    assert torch.equal(again.codes, on.codes) and torch.equal(again.scores, on.scores)


def test_encode_prompts_left_pads_and_names_empty_prompts():
    _, tok, _ = _lora_model()
    ids, mask = encode_prompts(tok, ["Red tape", "Blue glue for the shop"])
    n0 = len(tok("Red tape", add_special_tokens=False)["input_ids"])
    assert mask[0].tolist() == [0] * (ids.shape[1] - n0) + [1] * n0 and mask[1].all()
    assert (ids[0, : ids.shape[1] - n0] == tok.pad_token_id).all()
    cut, cut_mask = encode_prompts(tok, ["Blue glue for the shop"], max_length=2)  # keeps the last tokens
    assert cut.tolist() == [ids[1, -2:].tolist()] and cut_mask.all()
    with pytest.raises(ValueError, match=r"prompt\(s\) \[1\] tokenize to nothing"):
        encode_prompts(tok, ["Red tape", ""])
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        encode_prompts(tok, ["Red tape"], max_length=0)
