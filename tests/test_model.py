"""Model/tokenizer loading: the tiny preset, any HF causal LM by path, the SID token block."""
import pytest
import torch

from genrec_fast.model import add_sid_tokens, build_tiny_tokenizer, encode_prompts, load_model_and_tokenizer
from genrec_fast.sid_tokens import sid_token_strings

CORPUS = ["Red tape for the shop", "Blue glue", "### Instruction:\nRecommend the next item.\n### Response:\n"] * 5
SIZES = (4, 3, 5)
SMALL = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}


def _check_block(tok, vocab):
    ids = tok.convert_tokens_to_ids(sid_token_strings(SIZES))
    assert ids == list(range(vocab.start, vocab.start + sum(SIZES)))
    assert vocab.codebook_sizes == SIZES
    # an SID string tokenizes into exactly its L tokens, whatever surrounds it
    got = tok("x<a_3><b_0><c_4>\n", add_special_tokens=False)["input_ids"]
    want = vocab.token_ids(torch.tensor([3, 0, 4])).tolist()
    assert got[-4:-1] == want


def test_tiny_preset():
    model, tok, vocab = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                                 model_overrides=SMALL)
    _check_block(tok, vocab)
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 1
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert model.config._attn_implementation == "sdpa"
    # deterministic: same corpus and seed -> same tokenizer and weights
    model2, tok2, _ = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                               model_overrides=SMALL)
    assert tok2.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    with pytest.raises(ValueError, match="needs a corpus"):
        load_model_and_tokenizer("tiny", SIZES)


def test_any_causal_lm_from_a_local_path(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer(CORPUS, 300)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, tok2, vocab = load_model_and_tokenizer(str(tmp_path / "base"), SIZES)
    _check_block(tok2, vocab)
    assert vocab.start == len(tok)
    emb = model.get_input_embeddings().weight.shape[0]
    assert emb >= len(tok2) and emb % 64 == 0  # resized, padded to a multiple of 64
    # a saved run finds its SID block again (sizes read off the tokenizer), with no further resize
    model.save_pretrained(tmp_path / "run")
    tok2.save_pretrained(tmp_path / "run")
    model3, tok3, vocab3 = load_model_and_tokenizer(str(tmp_path / "run"))
    assert vocab3 == vocab and model3.get_input_embeddings().weight.shape[0] == emb


def test_sid_block_must_be_contiguous_and_complete():
    tok = build_tiny_tokenizer(CORPUS, 300)
    tok.add_tokens(["<a_0>", "<a_1>"])
    with pytest.raises(ValueError, match="only part of the SID token block"):
        add_sid_tokens(tok, SIZES)
    tok = build_tiny_tokenizer(CORPUS, 300)
    strings = sid_token_strings(SIZES)
    tok.add_tokens(strings[:2] + ["<zzz>"] + strings[2:])
    with pytest.raises(ValueError, match="not one contiguous ordered block: <a_2>"):
        add_sid_tokens(tok, SIZES)


def test_encode_prompts_left_pads_and_keeps_the_end():
    tok = build_tiny_tokenizer(CORPUS, 300)
    ids, mask = encode_prompts(tok, ["Blue glue", "Red tape for the shop"])
    a = tok("Blue glue", add_special_tokens=False)["input_ids"]
    b = tok("Red tape for the shop", add_special_tokens=False)["input_ids"]
    assert ids.shape == (2, len(b)) and mask.sum(1).tolist() == [len(a), len(b)]
    assert ids[0, -len(a):].tolist() == a and (ids[0, :len(b) - len(a)] == tok.pad_token_id).all()
    assert mask[0, :len(b) - len(a)].sum() == 0
    ids, mask = encode_prompts(tok, ["Red tape for the shop"], max_length=2)
    assert ids[0].tolist() == b[-2:]


def test_lora_trains_adapters_and_sid_rows():
    model, tok, vocab = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                                 model_overrides=SMALL, lora=True, lora_r=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("token_adapter" in n for n in trainable)
    assert not any(n.endswith("embed_tokens.weight") and "base_layer" not in n and "token_adapter" not in n
                   for n in trainable)
    ids = torch.tensor([[1, 2, vocab.start, vocab.start + 5]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "token_adapter" in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_attn_implementation_choice():
    """sdpa unless asked for (on any device: what the packed SFT step and the beam search are tested on)."""
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 64}
    model, _, _ = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                           model_overrides=small)
    assert model.config._attn_implementation == "sdpa"
    model, _, _ = load_model_and_tokenizer("tiny", SIZES, corpus=CORPUS, tokenizer_vocab_size=300,
                                           model_overrides=small, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
