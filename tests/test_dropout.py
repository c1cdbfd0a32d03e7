"""Train-time dropout (model.add_train_dropout, SFTConfig.dropout) and DropKey (model.add_key_dropout,
SFTConfig.key_dropout): where they act, train vs eval mode, refusals, nothing of them saved, and exact resume."""
import copy
import shutil

import pytest
import torch

from genrec_fast.model import (
    DROPOUT_MODULES,
    add_key_dropout,
    add_train_dropout,
    key_dropout_mask,
    load_model_and_tokenizer,
)
from genrec_fast.train.sft import SFTConfig, train_sft
from tests.test_sft import SMALL, _cfg, _data, _tiny


def _ids(tok):
    return torch.tensor([tok.convert_tokens_to_ids(["<a_0>", "<b_1>", "<a_2>", "<b_3>", "<a_1>", "<b_0>"])])


def test_dropout_hooks_every_embedding_attention_and_mlp_output_and_only_in_train_mode():
    data = _data()
    model, tok, _ = _tiny(data)
    plain = copy.deepcopy(model)
    ids = _ids(tok)
    n = add_train_dropout(model, 0.5)
    layers = SMALL["num_hidden_layers"]
    assert n == 1 + 2 * layers  # embed_tokens, and o_proj + down_proj per block
    attn = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert len(attn) == layers and all(m.attention_dropout == 0.0 for m in attn)  # not on the attention weights
    assert model.config.attention_dropout == plain.config.attention_dropout == 0.0  # the saved config: no dropout

    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
        model.train()
        a, b = model(ids).logits, model(ids).logits
        emb = model.get_input_embeddings()(ids)
    assert not torch.equal(a, b)
    dense = plain.get_input_embeddings()(ids).detach()
    zero = emb == 0
    assert 0.35 < zero.float().mean().item() < 0.65  # p = 0.5 of the embedding entries dropped ...
    torch.testing.assert_close(emb[~zero], 2.0 * dense[~zero])  # ... the rest scaled by 1 / (1 - p)


def test_no_dropout_adds_nothing_and_bad_rates_or_models_are_refused():
    data = _data()
    model, tok, _ = _tiny(data)
    assert add_train_dropout(model, 0.0) == 0
    model.train()
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
            add_train_dropout(model, p)
    with pytest.raises(ValueError, match="no module named " + " / ".join(DROPOUT_MODULES)):
        add_train_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)
    with pytest.raises(ValueError, match=r"SFTConfig: dropout must be in \[0, 1\), got 1.5"):
        SFTConfig(dropout=1.5)


def _resumed_run_is_identical(tmp_path, data, steps: int, **options):
    """Train ``steps`` steps (a checkpoint at half way), remove the last checkpoint and run again: the run
    resumes half way, its masks after that come out the same, and so do its weights and losses."""
    cfg = _cfg(tmp_path, max_steps=steps, eval_every=-1, save_every=steps // 2, keep_checkpoints=3, **options)
    res = train_sft(cfg, data=data)
    last = res.output_dir / "checkpoints" / f"step-{steps:07d}"
    final = torch.load(last / "state.pt", weights_only=False)
    shutil.rmtree(last)
    res2 = train_sft(cfg, data=data)
    again = torch.load(last / "state.pt", weights_only=False)
    for k, v in final["model"].items():
        assert torch.equal(v, again["model"][k]), k
    assert res2.history["loss"] == res.history["loss"]
    return res


def test_sft_with_dropout_resumes_exactly_and_saves_a_model_without_it(tmp_path):
    data = _data()
    res = _resumed_run_is_identical(tmp_path, data, 12, dropout=0.2)
    out = res.output_dir

    # without dropout the same run trains differently (the option is applied), and the saved model has none
    other = train_sft(_cfg(tmp_path / "nodrop", max_steps=12, eval_every=-1, save_every=6), data=data)
    assert other.history["loss"][-1] != res.history["loss"][-1]
    saved, _, _ = load_model_and_tokenizer(str(out / "model"))
    assert saved.config.attention_dropout == 0.0 and not any(m._forward_hooks for m in saved.modules())


def test_key_dropout_mask_keeps_the_layer_mask_each_query_own_key_and_drops_about_p():
    torch.manual_seed(0)
    block = torch.zeros(6, 6, dtype=torch.bool)
    block[:3, :3] = block[3:, 3:] = True
    block &= torch.ones(6, 6, dtype=torch.bool).tril()  # two packed examples of 3 tokens
    m = key_dropout_mask(block[None, None].expand(2, 1, 6, 6), 2, 4, 6, 0.5, "cpu")
    assert m.shape == (2, 4, 6, 6) and m.dtype == torch.bool
    assert not (m & ~block).any()  # nothing outside the layer's mask is opened
    assert m.diagonal(dim1=-2, dim2=-1).all()  # a query always keeps its own key
    assert not torch.equal(m[:, 0], m[:, 1])  # heads draw their own masks
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~block, float("-inf"))
    torch.manual_seed(0)
    f = key_dropout_mask(additive, 2, 4, 6, 0.5, "cpu")
    assert torch.equal(f == 0, m)  # the same draw on an additive mask
    causal = key_dropout_mask(None, 1, 2, 200, 0.25, "cpu")  # no mask: plain causal attention
    assert not causal.triu(1).any()
    off = causal.tril(-1).sum().item() / (2 * 200 * 199 / 2)
    assert 0.72 < off < 0.78
    with pytest.raises(ValueError, match=r"mask of shape \(1, 1, 6, 7\) for 6 tokens"):
        key_dropout_mask(torch.ones(1, 1, 6, 7, dtype=torch.bool), 1, 2, 6, 0.1, "cpu")


def test_key_dropout_acts_in_train_mode_only_and_is_the_same_under_sdpa_and_eager():
    data = _data()
    model, tok, _ = _tiny(data)
    assert model.config._attn_implementation == "sdpa"
    plain = copy.deepcopy(model)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    assert add_key_dropout(model, 0.3) == add_key_dropout(eager, 0.3) == SMALL["num_hidden_layers"]
    ids = _ids(tok)
    with torch.no_grad():
        model.eval(), plain.eval()
        assert torch.equal(model(ids).logits, plain(ids).logits)
        model.train(), eager.train(), plain.train()
        torch.manual_seed(1)
        a = model(ids, use_cache=False).logits
        torch.manual_seed(1)
        b = eager(ids, use_cache=False).logits
        c = plain(ids, use_cache=False).logits
    torch.testing.assert_close(a, b)  # the same keys dropped, through an sdpa bool mask and an eager additive one
    assert torch.isfinite(a).all() and not torch.allclose(a, c)
    assert add_key_dropout(plain, 0.0) == 0
    with pytest.raises(ValueError, match=r"key dropout must be in \[0, 1\)"):
        add_key_dropout(plain, 1.0)
    with pytest.raises(ValueError, match="no module named self_attn"):
        add_key_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2)), 0.1)
    with pytest.raises(ValueError, match=r"SFTConfig: key_dropout must be in \[0, 1\), got -0.5"):
        SFTConfig(key_dropout=-0.5)
    flash = copy.deepcopy(eager)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="key dropout needs sdpa or eager attention"):
        flash.train()(ids, use_cache=False)


def test_sft_with_key_dropout_resumes_exactly(tmp_path):
    data = _data()
    res = _resumed_run_is_identical(tmp_path, data, 8, key_dropout=0.2)
    other = train_sft(_cfg(tmp_path / "nokey", max_steps=8, eval_every=-1, save_every=4), data=data)
    assert other.history["loss"][-1] != res.history["loss"][-1]
