"""S-DPO and GRPO trainers end to end on a tiny synthetic dataset and a tiny random Qwen2.

``make_tiny_run`` is also used by tests/test_distributed.py.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrec_fast.data import Catalog, RecData, Sample, save_minionerec

NUM_ITEMS = 40
TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)


def make_tiny_run(root: Path):
    """A MiniOneRec-format dataset (40 items, SIDs 3 x 4 codes, items 38/39 sharing a SID; next item =
    last + 1) and a saved tiny model with the SID tokens. Returns (data_dir, model_dir)."""
    from genrec_fast.model import load_model_and_tokenizer

    rng = np.random.default_rng(0)
    flat = rng.choice(64, size=NUM_ITEMS - 1, replace=False)
    flat[:4] = [0, 21, 42, 63]  # every code 0..3 appears at every level
    codes = np.stack([flat // 16, (flat // 4) % 4, flat % 4], axis=1).astype(np.int32)
    codes = np.concatenate([codes, codes[-1:]])  # item 39 shares item 38's SID
    titles = [f"item {i} tool" for i in range(NUM_ITEMS)]
    catalog = Catalog(item_ids=[str(i) for i in range(NUM_ITEMS)], titles=titles, texts=titles,
                      codes=codes, codebook_sizes=(4, 4, 4))

    def samples(n, seed):
        r = np.random.default_rng(seed)
        out = []
        for u in range(n):
            start = int(r.integers(NUM_ITEMS))
            hist = [(start + k) % NUM_ITEMS for k in range(int(r.integers(1, 4)))]
            out.append(Sample(user_id=f"u{seed}_{u}", history=hist, target=(hist[-1] + 1) % NUM_ITEMS))
        return out

    data = RecData(catalog=catalog, train=samples(64, 1), valid=samples(12, 2), test=samples(12, 3))
    data_dir = save_minionerec(data, root / "data")
    model, tok, _ = load_model_and_tokenizer("tiny", (4, 4, 4), corpus=titles + ["Recommend the next item."],
                                             tokenizer_vocab_size=300, model_overrides=TINY_MODEL, seed=0)
    model_dir = root / "sft"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return data_dir, model_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("posttrain"))


COMMON = dict(batch_size=4, eval_samples=8, eval_beams=10, eval_batch_size=8, log_every=5, mixed_precision="no")


def _reload_logps(model_dir, data_dir, samples):
    """Log-probs of the targets' SIDs under a saved model (proves the checkpoint is the trained policy)."""
    from genrec_fast.data import load_minionerec
    from genrec_fast.model import encode_prompts, load_model_and_tokenizer
    from genrec_fast.prompts import rec_prompt
    from genrec_fast.train import sequence_logprobs

    data = load_minionerec(data_dir)
    model, tok, vocab = load_model_and_tokenizer(str(model_dir), data.catalog.codebook_sizes)
    ids, mask = encode_prompts(tok, [rec_prompt(s.history, data.catalog) for s in samples])
    resp = vocab.token_ids(torch.as_tensor(data.catalog.codes[[s.target for s in samples]], dtype=torch.long))
    with torch.no_grad():
        return sequence_logprobs(model.eval(), ids, mask, resp)


def test_sdpo_trains_and_saves(tiny_run, tmp_path):
    from genrec_fast.train import SDPOConfig, train_sdpo

    data_dir, model_dir = tiny_run
    out = tmp_path / "sdpo"
    cfg = SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=20, lr=3e-3, beta=1.0,
                     num_negatives=3, train_samples=8, **COMMON)
    res = train_sdpo(cfg)
    log = res["log"]
    assert len(log) == 4 and log[-1]["step"] == 20
    assert log[-1]["loss"] < log[0]["loss"] - 0.05  # preference loss goes down
    assert log[-1]["margin"] > log[0]["margin"]
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["before"]) == {"valid", "test"} and set(saved["after"]) == {"valid", "test"}
    assert 0.0 <= saved["after"]["test"]["NDCG@10"] <= 1.0 and saved["after"]["test"]["invalid_rate"] == 0.0
    train = res["session"].train  # the 8 samples it was trained on
    gain = _reload_logps(out / "model", data_dir, train) - _reload_logps(model_dir, data_dir, train)
    assert gain.mean() > 0.1  # the saved policy prefers the chosen SIDs more than the SFT model


def test_sdpo_mined_negatives_exclude_target(tiny_run, tmp_path):
    from genrec_fast.train.post_training import Session
    from genrec_fast.train.sdpo import SDPOConfig, mined_negative_codes, random_negatives

    data_dir, model_dir = tiny_run
    cfg = SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), negatives="mined",
                     num_negatives=4, **COMMON)
    s = Session(cfg)
    samples = s.train[:6]
    ids, mask = s.prompts(samples)
    codes = mined_negative_codes(s, ids, mask, samples, 4)
    assert codes.shape == (6, 4, 3)
    leaves = s.trie.lookup(codes.reshape(-1, 3).numpy().astype(np.int32)).reshape(6, 4)
    for g, smp in enumerate(samples):
        assert s.item_leaf[smp.target] not in leaves[g]
        assert len(set(leaves[g].tolist())) == 4
    neg = random_negatives(np.random.default_rng(0), s.item_leaf, samples, 5)
    for g, smp in enumerate(samples):
        neg_leaves = s.item_leaf[neg[g]]
        banned = {s.item_leaf[smp.target], *(s.item_leaf[h] for h in smp.history)}
        assert not banned & set(neg_leaves.tolist()) and len(set(neg_leaves.tolist())) == 5
    with pytest.raises(ValueError, match="cannot draw"):
        random_negatives(np.random.default_rng(0), s.item_leaf, samples[:1], 39)


@pytest.mark.parametrize("loss_level", ["token", "sequence"])
def test_grpo_trains_with_ranking_reward(tiny_run, tmp_path, loss_level):
    from genrec_fast.train import GRPOConfig, train_grpo

    data_dir, model_dir = tiny_run
    out = tmp_path / "rl"
    cfg = GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=20, lr=3e-3, beta=0.01,
                     group_size=8, num_updates=2, inject_target=True, train_samples=8, loss_level=loss_level,
                     **COMMON)
    res = train_grpo(cfg)
    log = res["log"]
    assert {"reward", "hit_rate", "no_signal", "kl", "clip_frac"} <= set(log[0])
    assert log[0]["no_signal"] == 0.0  # every group has the injected target, hence signal
    assert log[-1]["kl"] > 0.0
    assert log[-1]["hit_rate"] > log[0]["hit_rate"]  # the policy finds the target among its beams more often
    assert (out / "model" / "config.json").is_file() and (out / "metrics.json").is_file()


def test_grpo_rollout_injection_and_no_signal(tiny_run, tmp_path):
    from genrec_fast.train.grpo import GRPOConfig, rollout
    from genrec_fast.train.post_training import Session
    from genrec_fast.train.rewards import group_rewards, make_reward, no_signal_share

    data_dir, model_dir = tiny_run
    cfg = GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), group_size=4, **COMMON)
    s = Session(cfg)
    samples = s.train[:8]
    ids, mask = s.prompts(samples)
    plain = rollout(s, ids, mask, samples, inject=False)
    injected = rollout(s, ids, mask, samples, inject=True)
    targets = [x.target for x in samples]
    r_plain = group_rewards(make_reward("ranking"), plain.beam_items, targets)
    r_inj = group_rewards(make_reward("ranking"), injected.beam_items, targets)
    missed = [g for g, h in enumerate(plain.hits) if h is None]
    assert missed, "a random tiny model should miss some targets among 4 of 64 SIDs"
    for g in missed:
        assert (r_plain[g] == 0).all()
        assert r_inj[g, -1] == 1.0 and (r_inj[g, :-1] < 0).all()
        assert injected.codes[g, -1].tolist() == s.data.catalog.codes[targets[g]].tolist()
    assert no_signal_share(r_plain) == pytest.approx(len(missed) / 8)
    assert no_signal_share(r_inj) == 0.0
    # beam search scores are the full-vocabulary sequence log-probs the update recomputes
    from genrec_fast.train import sequence_logprobs

    res = s.beam_search(ids, mask, 4)
    with torch.no_grad():
        lp = sequence_logprobs(s.unwrapped.eval(), ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0),
                               s.response_tokens(res.codes))
    torch.testing.assert_close(lp.view(8, 4), res.scores.float(), atol=1e-4, rtol=1e-4)


def test_grpo_sft_weight_adds_the_target_nll(tiny_run, tmp_path):
    """At the first update the policy is the rollout policy and the reference: ratios 1, KL 0, and the
    advantages sum to zero in every group, so the GRPO loss is 0 and the step's loss is sft_weight x the
    targets' NLL per SID token under the start model."""
    from genrec_fast.train import sequence_logprobs
    from genrec_fast.train.grpo import GRPOConfig, grpo_step
    from genrec_fast.train.post_training import Session
    from genrec_fast.train.rewards import make_reward

    data_dir, model_dir = tiny_run
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), sft_weight=-1.0, **COMMON)
    cfg = GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), group_size=4, sft_weight=0.5,
                     inject_target=True, **COMMON)
    s = Session(cfg)
    samples = s.train[:4]
    ids, mask = s.prompts(samples)
    codes = torch.as_tensor(s.data.catalog.codes[[x.target for x in samples]])
    with torch.no_grad():
        nll = -sequence_logprobs(s.unwrapped, ids, mask, s.response_tokens(codes)).mean() / codes.shape[1]
    stats = grpo_step(s, make_reward("ranking"), samples)
    assert stats["target_nll"] == pytest.approx(float(nll), rel=1e-5)
    assert stats["loss"] == pytest.approx(0.5 * float(nll), rel=1e-4, abs=1e-6)
    assert "target_nll" not in grpo_step(Session(GRPOConfig(**{**cfg.__dict__, "sft_weight": 0.0})),
                                         make_reward("ranking"), samples)


def test_cli_config_parsing(tiny_run, tmp_path):
    from genrec_fast.cli import build_parser
    from genrec_fast.config_cli import apply_config
    from genrec_fast.train.grpo import GRPOConfig
    from genrec_fast.train.post_training import config_from_args

    cfg_file = tmp_path / "rl.yaml"
    cfg_file.write_text("group_size: 6\nreward: rule\ninject_target: true\neval_splits: [test]\n")
    parser = build_parser("rl")
    args = apply_config(parser, ["--config", str(cfg_file), "--model", "m", "--data", "d", "--out", "o",
                                  "--lr", "1e-4", "--max-prompt-length", "none"])
    cfg = config_from_args(GRPOConfig, args)
    got = (cfg.group_size, cfg.reward, cfg.inject_target, cfg.eval_splits, cfg.lr)
    assert got == (6, "rule", True, ("test",), 1e-4)
    assert cfg.max_prompt_length is None
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(model="m", data="d", out="o", group_size=1)
    with pytest.raises(ValueError, match="loss_level must be one of"):
        GRPOConfig(model="m", data="d", out="o", loss_level="batch")
    with pytest.raises(ValueError, match="'model' is required"):
        GRPOConfig(data="d", out="o")
    with pytest.raises(ValueError, match="eval_beams 5 < 10: the evals report HR@10"):
        GRPOConfig(model="m", data="d", out="o", eval_beams=5)
    assert GRPOConfig(model="m", data="d", out="o", eval_beams=5, eval_splits=()).eval_beams == 5
    # what the error message advises works on the command line
    args = parser.parse_args(["--model", "m", "--data", "d", "--out", "o", "--eval-beams", "5",
                              "--eval-splits", "none"])
    assert config_from_args(GRPOConfig, args).eval_splits == ()


def test_sdpo_with_lora_reference_is_the_sft_model(tiny_run, tmp_path):
    from genrec_fast.train import SDPOConfig, train_sdpo

    data_dir, model_dir = tiny_run
    out = tmp_path / "lora"
    cfg = SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=4, lr=1e-2, lora_r=4,
                     train_samples=8, **{**COMMON, "eval_before": False, "log_every": 4})
    res = train_sdpo(cfg)
    session = res["session"]
    assert session.reference.uses_adapter and session.reference.model is None
    samples = session.train
    ids, mask = session.prompts(samples)
    resp = session.response_tokens(session.data.catalog.codes[[s.target for s in samples]])
    ref = session.reference.logprobs(ids, mask, resp)
    torch.testing.assert_close(ref, _reload_logps(model_dir, data_dir, samples), atol=1e-4, rtol=1e-4)
    merged = _reload_logps(out / "model", data_dir, samples)  # saved with the adapter merged in
    assert (merged - ref).abs().max() > 1e-3


_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted([*_CONFIGS.glob("sdpo_*.yaml"), *_CONFIGS.glob("rl_*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_stage_configs_are_valid(path):
    from genrec_fast.cli import build_parser
    from genrec_fast.config_cli import apply_config
    from genrec_fast.train import GRPOConfig, SDPOConfig
    from genrec_fast.train.post_training import config_from_args

    stage = path.name.split("_")[0]
    cls = SDPOConfig if stage == "sdpo" else GRPOConfig
    args = apply_config(build_parser(stage), ["--config", str(path), "--model", "m", "--out", "o"])
    cfg = config_from_args(cls, args)
    assert cfg.data and cfg.steps >= 1


def test_grpo_semantic_reward_from_embedding_file(tiny_run, tmp_path):
    from genrec_fast.train import GRPOConfig, train_grpo

    data_dir, model_dir = tiny_run
    emb = np.random.default_rng(0).normal(size=(NUM_ITEMS, 8)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    cfg = GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path / "sem"), steps=2, group_size=4,
                     reward="semantic", item_embeddings=str(tmp_path / "emb.npy"),
                     **{**COMMON, "eval_before": False, "save": False, "log_every": 1})
    log = train_grpo(cfg)["log"]
    assert all(row["no_signal"] == 0.0 for row in log)  # cosines of distinct items differ
    assert all(-1.0 <= row["reward"] <= 1.0 for row in log)
    np.save(tmp_path / "bad.npy", emb[:5])
    cfg.item_embeddings = str(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match=r"bad.npy: item embeddings must be \[40, D\]"):
        train_grpo(cfg)


def test_grpo_transition_reward_counts_the_learnable_samples(tiny_run, tmp_path, monkeypatch):
    """reward 'ranking+transition' trains, with its table counted on train (+ valid only when the run learns from
    valid). (Here the only successor of an item is the target itself; the bonus on misses: test_rewards.py.)"""
    from genrec_fast.train import GRPOConfig, train_grpo
    from genrec_fast.train import grpo as grpo_mod

    data_dir, model_dir = tiny_run
    seen = []
    real = grpo_mod.TransitionTable

    def spy(samples, n):
        seen.append(len(samples))
        return real(samples, n)

    monkeypatch.setattr(grpo_mod, "TransitionTable", spy)
    base = dict(model=str(model_dir), data=str(data_dir), steps=3, group_size=8, reward="ranking+transition",
                transition_weight=1.0, **{**COMMON, "eval_before": False, "save": False, "log_every": 1})
    log = train_grpo(GRPOConfig(out=str(tmp_path / "a"), **base))["log"]
    from genrec_fast.data import load_minionerec

    data = load_minionerec(data_dir)
    assert seen == [len(data.train)]
    assert len(log) == 3 and all(np.isfinite(row["loss"]) and row["reward"] >= -1.0 for row in log)
    train_grpo(GRPOConfig(out=str(tmp_path / "b"), **{**base, "prompt_split": "valid", "eval_splits": ("test",)}))
    assert seen[-1] == len(data.train) + len(data.valid)
    with pytest.raises(ValueError, match="transition_weight must be a finite number >= 0"):
        GRPOConfig(out=str(tmp_path / "c"), **{**base, "transition_weight": float("nan")})


def test_sdpo_first_step_loss_is_log1pN_plus_sft_term(tiny_run, tmp_path):
    """At step 1 the policy IS the reference: every S-DPO logit is 0, so the loss is log(1 + N);
    sft_weight adds weight x the chosen NLL per SID token."""
    import math

    from genrec_fast.train import SDPOConfig, train_sdpo

    data_dir, model_dir = tiny_run
    cfg = SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), steps=1, num_negatives=3,
                     sft_weight=0.5, **{**COMMON, "eval_before": False, "save": False, "log_every": 1})
    row = train_sdpo(cfg)["log"][0]
    assert row["margin"] == pytest.approx(0.0, abs=1e-5)
    assert row["loss"] == pytest.approx(math.log(4.0) - 0.5 * row["chosen_logp"] / 3, rel=1e-5)


def test_rollouts_pass_cuda_graphs_to_the_search(tiny_run, tmp_path):
    """cuda_graphs and the other search options reach the rollouts' beam search: the static-buffer protocol
    ("emulate", CPU), the whole search as one graph and the shared-prefix K/V give the eager rollouts; True on a
    CPU model is refused by name, as are a shared prefix on eager attention and graph_scope without cuda_graphs."""
    from genrec_fast.train import GRPOConfig
    from genrec_fast.train.post_training import Session

    data_dir, model_dir = tiny_run
    s = Session(GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), group_size=4, **COMMON))
    ids, mask = s.prompts(s.train[:3])
    eager = s.beam_search(ids, mask, 4)
    s.cfg.cuda_graphs = "emulate"
    graphed = s.beam_search(ids, mask, 4)
    assert torch.equal(graphed.codes, eager.codes)
    torch.testing.assert_close(graphed.scores, eager.scores, rtol=0, atol=1e-4)
    s.cfg.graph_scope, s.cfg.shared_prefix = "search", True
    searched = s.beam_search(ids, mask, 4)
    assert torch.equal(searched.codes, eager.codes)
    torch.testing.assert_close(searched.scores, eager.scores, rtol=0, atol=1e-4)
    attn = s.unwrapped.config._attn_implementation
    s.unwrapped.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match=r"beam_search\(shared_prefix=True\) needs sdpa"):
        s.beam_search(ids, mask, 4)
    s.unwrapped.config._attn_implementation = attn
    with pytest.raises(ValueError, match="GRPOConfig: graph_scope 'search' needs cuda_graphs"):
        GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), graph_scope="search", **COMMON)
    s.cfg.cuda_graphs = True
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        s.beam_search(ids, mask, 4)


def test_session_turns_dropout_off(tiny_run, tmp_path):
    """Policy log-probs in train mode equal the eval-mode (rollout / reference) ones: no dropout noise in
    the ratios, the KL or S-DPO's rewards, even for a base model saved with dropout and a LoRA adapter."""
    import shutil

    from genrec_fast.train import SDPOConfig, sequence_logprobs
    from genrec_fast.train.post_training import Session

    data_dir, model_dir = tiny_run
    noisy = tmp_path / "noisy"
    shutil.copytree(model_dir, noisy)
    cfg_json = json.loads((noisy / "config.json").read_text())
    cfg_json["attention_dropout"] = 0.5
    (noisy / "config.json").write_text(json.dumps(cfg_json))
    s = Session(SDPOConfig(model=str(noisy), data=str(data_dir), out=str(tmp_path / "o"), lora_r=4, **COMMON))
    samples = s.train[:6]
    ids, mask = s.prompts(samples)
    resp = s.response_tokens(s.data.catalog.codes[[x.target for x in samples]])
    s.model.train()
    with torch.no_grad():
        a = sequence_logprobs(s.model, ids, mask, resp)
        b = sequence_logprobs(s.model, ids, mask, resp)
        s.model.eval()
        c = sequence_logprobs(s.model, ids, mask, resp)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)


def test_disable_dropout_counts_and_clears():
    from transformers import GPT2Config, GPT2LMHeadModel

    from genrec_fast.train.post_training import disable_dropout

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).train()
    x = torch.randint(50, (2, 7))
    assert not torch.equal(model(x).logits, model(x).logits)  # GPT-2's dropout is on in train mode
    assert disable_dropout(model) > 0 and disable_dropout(model) == 0
    assert torch.equal(model(x).logits, model(x).logits)


def test_post_training_on_train_and_valid(tiny_run, tmp_path):
    """train_on_valid: the session's training prompts are the train samples then the valid ones, and valid
    cannot also be an evaluation split (it would score the model on what it was trained on)."""
    from genrec_fast.train import GRPOConfig
    from genrec_fast.train.post_training import Session

    data_dir, model_dir = tiny_run
    args = dict(model=str(model_dir), data=str(data_dir), out=str(tmp_path / "o"), **COMMON)
    with pytest.raises(ValueError, match="train_on_valid trains on the valid samples"):
        GRPOConfig(train_on_valid=True, **{**args, "eval_splits": ("valid", "test")})
    s = Session(GRPOConfig(train_on_valid=True, **{**args, "eval_splits": ("test",)}))
    assert [x.user_id for x in s.train] == [x.user_id for x in s.data.train] + [x.user_id for x in s.data.valid]
    assert len(Session(GRPOConfig(**{**args, "eval_splits": ("test",)})).train) == len(s.data.train)


def test_post_training_on_the_valid_prompts(tiny_run, tmp_path):
    """prompt_split 'valid': the training prompts are the valid samples alone (prompts a train-only SFT model has
    not fitted), valid cannot be evaluated, and it does not combine with train_on_valid."""
    from genrec_fast.train import GRPOConfig, SDPOConfig
    from genrec_fast.train.post_training import Session

    data_dir, model_dir = tiny_run
    args = dict(model=str(model_dir), data=str(data_dir), out=str(tmp_path / "o"), **COMMON)
    with pytest.raises(ValueError, match="prompt_split 'valid' trains on the valid samples"):
        GRPOConfig(prompt_split="valid", **{**args, "eval_splits": ("valid", "test")})
    with pytest.raises(ValueError, match="train_on_valid adds the valid samples"):
        SDPOConfig(prompt_split="valid", train_on_valid=True, **{**args, "eval_splits": ("test",)})
    with pytest.raises(ValueError, match="prompt_split must be 'train' or 'valid'"):
        SDPOConfig(prompt_split="test", **{**args, "eval_splits": ("none",)})
    s = Session(GRPOConfig(prompt_split="valid", **{**args, "eval_splits": ("test",)}))
    assert [(x.user_id, x.target) for x in s.train] == [(x.user_id, x.target) for x in s.data.valid]
    assert len(s.train) != len(s.data.train)
    from genrec_fast import cli
    from genrec_fast.config_cli import apply_config, config_from_args

    argv = ["--model", "m", "--data", "d", "--out", "o", "--prompt-split", "valid", "--eval-splits", "test"]
    assert config_from_args(GRPOConfig, apply_config(cli.build_parser("rl"), argv)).prompt_split == "valid"


def test_post_training_panels_are_the_logged_statistics_and_the_evals():
    from genrec_fast.train.curves import post_training_panels

    log = [{"step": 5, "loss": 1.0, "lr": 1e-3}, {"step": 10, "loss": 0.5, "lr": 1e-3, "kl": 0.1}]
    before = {"valid": {"NDCG@10": 0.1, "HR@10": 0.2}, "test": {"NDCG@10": 0.2}}
    after = {"valid": {"NDCG@10": 0.3, "HR@10": 0.4}, "test": {"NDCG@10": 0.25}}
    panels = dict(post_training_panels(log, before, after, last_step=10))
    assert list(panels) == ["loss", "lr", "kl", "eval NDCG@10"]
    assert panels["loss"] == {"loss": [(5, 1.0), (10, 0.5)]} and panels["kl"] == {"kl": [(10, 0.1)]}
    assert panels["eval NDCG@10"] == {"valid NDCG@10": [(0, 0.1), (10, 0.3)], "test NDCG@10": [(0, 0.2), (10, 0.25)]}
    # not evaluated before: the after point only; not evaluated at all (or nothing logged): no such panel
    assert dict(post_training_panels(log, None, after, 10))["eval NDCG@10"]["test NDCG@10"] == [(10, 0.25)]
    assert [t for t, _ in post_training_panels(log, None, {}, 10)] == ["loss", "lr", "kl"]
    assert post_training_panels([], None, {}, 10) == []


def _png_size(path):
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return tuple(int.from_bytes(head[i:i + 4], "big") for i in (16, 20))


@pytest.mark.parametrize("stage", ["sdpo", "grpo"])
def test_post_training_writes_curves_of_its_logged_statistics(tiny_run, tmp_path, stage):
    from genrec_fast.train import GRPOConfig, SDPOConfig, train_grpo, train_sdpo
    from genrec_fast.train.curves import post_training_panels

    data_dir, model_dir = tiny_run
    out = tmp_path / stage
    common = {**COMMON, "log_every": 1, "eval_splits": ("test",)}
    if stage == "sdpo":
        res = train_sdpo(SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=2,
                                    num_negatives=2, **common))
        stats = {"accuracy", "margin", "chosen_logp"}
    else:
        res = train_grpo(GRPOConfig(model=str(model_dir), data=str(data_dir), out=str(out), steps=2, group_size=4,
                                    **common))
        stats = {"reward", "hit_rate", "no_signal", "kl"}
    logged = set(res["log"][0]) - {"step"}
    assert {"loss"} | stats <= logged
    panels = post_training_panels(res["log"], res["before"], res["after"], 2)
    assert [t for t, _ in panels] == [k for k in res["log"][0] if k != "step"] + ["eval NDCG@10"]
    assert set(dict(panels)["eval NDCG@10"]) == {"test NDCG@10"}
    n = len(panels)
    assert _png_size(out / "curves.png") == (500 * min(n, 4), 400 * -(-n // 4))


def test_post_training_lr_schedules(tiny_run, tmp_path):
    from genrec_fast.train.post_training import Session
    from genrec_fast.train.sdpo import SDPOConfig

    data_dir, model_dir = tiny_run

    def lrs(**kw):
        s = Session(SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), lr=1e-3, steps=4,
                               **{**COMMON, **kw}))
        out = []
        for _ in range(4):
            s.optimizer.step()
            s.scheduler.step()
            out.append(s.scheduler.get_last_lr()[0])
        return out

    assert lrs() == [1e-3] * 4  # warmup_steps=0 (every shipped config): the lr throughout
    assert lrs(warmup_steps=2) == pytest.approx([0.5e-3, 1e-3, 1e-3, 1e-3])  # min(1, s / warmup_steps) x lr
    assert lrs(lr_scheduler="linear") == pytest.approx([0.75e-3, 0.5e-3, 0.25e-3, 0.0])
    assert lrs(lr_scheduler="cosine", warmup_steps=2) == pytest.approx([0.5e-3, 1e-3, 0.5e-3, 0.0])
    with pytest.raises(ValueError, match="SDPOConfig: lr_scheduler must be one of constant_with_warmup, cosine, "
                                         "linear, got 'step'"):
        SDPOConfig(model=str(model_dir), data=str(data_dir), out=str(tmp_path), lr_scheduler="step", **COMMON)
