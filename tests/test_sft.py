"""SFT: packing, response-only loss, batching, the training loop, exact resume, early stopping, CLI."""
import json

import numpy as np
import pytest
import torch

from genrec_fast.data import Catalog, RecData, Sample, save_minionerec
from genrec_fast.model import load_model_and_tokenizer
from genrec_fast.prompts import build_examples, tokenizer_corpus
from genrec_fast.train.sft import SFTConfig, collate, epoch_batches, response_loss, tokenize_examples, train_sft

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 64}
N_ITEMS = 12


def _data(n_users=16, seq_len=6):
    """Users walk the catalogue in steps of one: the next item is always the last one + 1."""
    codes = np.array([[i // 4, i % 4] for i in range(N_ITEMS)])
    titles = [f"thing {i}" for i in range(N_ITEMS)]
    cat = Catalog([str(i) for i in range(N_ITEMS)], titles, titles, codes=codes, codebook_sizes=(4, 4))
    train, valid, test = [], [], []
    for u in range(n_users):
        seq = [(u + t) % N_ITEMS for t in range(seq_len)]
        samples = [Sample(f"u{u}", seq[max(0, t - 4):t], seq[t]) for t in range(1, seq_len)]
        train += samples[:-2]
        valid.append(samples[-2])
        test.append(samples[-1])
    return RecData(cat, train, valid, test)


def _tiny(data):
    return load_model_and_tokenizer("tiny", data.catalog.codebook_sizes, corpus=tokenizer_corpus(data.catalog),
                                    tokenizer_vocab_size=300, model_overrides=SMALL)


def test_tokenize_examples_masks_the_prompt_and_cuts_it_from_the_left():
    data = _data()
    _, tok, _ = _tiny(data)
    ex = build_examples(data, ["sid_seq", "sid2title"])
    full = tokenize_examples(tok, ex, 512)
    for e, (ids, n_prompt) in zip(ex, full):
        assert ids[:n_prompt] == tok(e.prompt, add_special_tokens=False)["input_ids"]
        assert ids[n_prompt:] == tok(e.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    short = tokenize_examples(tok, ex, 12)
    for (ids, n), (ids_full, n_full) in zip(short, full):
        assert len(ids) == 12 and ids[n:] == ids_full[n_full:] and ids[:n] == ids_full[n_full - n:n_full]


def _examples(tok, data, max_length=64):
    return tokenize_examples(tok, build_examples(data, ["sid_seq", "sid2title", "sid_seq2title"]), max_length)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf_padded_loss(model, tk, rows):
    """The plain HF loss of the same examples: one right-padded row each, labels -100 on prompt and padding."""
    exs = [tk[i] for row in rows for i in row]
    width = max(len(ids) for ids, _ in exs)
    ids = torch.zeros((len(exs), width), dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for r, (seq, n_prompt) in enumerate(exs):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
        labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("packed", [True, False])
def test_response_loss_matches_plain_per_example_cross_entropy(packed):
    data = _data()
    model, tok, _ = _tiny(data)
    model.eval()
    tk = _examples(tok, data)
    batches = epoch_batches([len(t[0]) for t in tk], 0, 0, batch_tokens=256, pack_length=64 if packed else 256,
                            packing=packed)
    batch = collate(tk, batches[0], tok.pad_token_id, packed)
    got = response_loss(model, batch)
    total, count = 0.0, 0
    for row in batches[0]:
        for i in row:
            ids, n_prompt = tk[i]
            labels = torch.tensor([-100] * n_prompt + ids[n_prompt:])
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels[1:], reduction="sum", ignore_index=-100)
            count += len(ids) - n_prompt
    assert batch["targets"].numel() == count
    assert torch.equal(batch["keep_index"], batch["keep"].reshape(-1).nonzero().squeeze(1))
    assert torch.allclose(got, total / count, atol=1e-5, rtol=1e-5)
    if packed:
        assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= 64


def _moved_lora(data):
    model, tok, _ = load_model_and_tokenizer("tiny", data.catalog.codebook_sizes,
                                             corpus=tokenizer_corpus(data.catalog), tokenizer_vocab_size=300,
                                             model_overrides=SMALL, lora=True, lora_r=4, seed=0)
    g = torch.Generator().manual_seed(1)  # adapters start as the identity: move them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model, tok


@pytest.mark.parametrize("lora", [False, True])
def test_packed_response_loss_and_grads_equal_the_hf_padded_loss(lora):
    """fp32 CPU, whichever transformers is installed: the packed [R, T] batch (never flattened to one
    row) gives the loss and every trainable gradient of HF's own padded ``model(..., labels)``."""
    import transformers

    data = _data()
    model, tok = _moved_lora(data) if lora else _tiny(data)[:2]
    model.eval()  # LoRA dropout off: the two losses must see the same function
    tk = _examples(tok, data)
    rows = epoch_batches([len(t[0]) for t in tk], 0, 0, batch_tokens=384, pack_length=128, packing=True)[0]
    assert len(rows) > 1 and any(len(r) > 1 for r in rows)  # several rows, several examples per row
    batch = collate(tk, rows, tok.pad_token_id, packed=True)
    seen = []
    from genrec_fast.model import lm_modules

    hook = lm_modules(model)[0].register_forward_hook(lambda m, args, kw, out: seen.append(kw["input_ids"].shape),
                                                      with_kwargs=True)
    ours = response_loss(model, batch)
    hook.remove()
    assert seen == [batch["input_ids"].shape], transformers.__version__
    ref = _hf_padded_loss(model, tk, rows)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (float(ours), float(ref), transformers.__version__)
    g_ours, g_ref = _grads(model, ours), _grads(model, ref)
    assert g_ours.keys() == g_ref.keys() and len(g_ours) > 0
    if lora:
        assert any("lora_" in n for n in g_ours) and not any(n.endswith("q_proj.base_layer.weight") for n in g_ours)
    for n in g_ref:
        assert g_ref[n].abs().max() > 0, n
        assert torch.allclose(g_ours[n], g_ref[n], atol=1e-5, rtol=1e-4), n


def test_response_loss_rejects_a_model_whose_logits_are_rescaled():
    data = _data()
    model, tok, _ = _tiny(data)
    model.config.logit_scale = 0.5
    tk = _examples(tok, data)
    batch = collate(tk, [[0, 1]], tok.pad_token_id, packed=True)
    with pytest.raises(ValueError, match="response_loss: .*logit_scale"):
        response_loss(model, batch)


def test_collate_fields_by_hand():
    tk = [([11, 12, 13, 14], 2), ([21, 22], 1), ([31], 0), ([41, 42, 43], 0)]
    b = collate(tk, [[0, 1], [2, 3]], pad_id=9, packed=True)
    assert b["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22], [31, 41, 42, 43, 9, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 0, 1]]
    # a position is kept when the NEXT token is a response token of the same example
    assert b["keep"].tolist() == [[False, True, True, False, True, False], [False, True, True, False, False, False]]
    assert b["targets"].tolist() == [13, 14, 22, 42, 43] and b["keep_index"].tolist() == [1, 2, 4, 7, 8]
    assert b["num_tokens"] == 10 and "attention_mask" not in b
    p = collate(tk, [[0], [1]], pad_id=9, packed=False)
    assert p["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and p["targets"].tolist() == [13, 14, 22]
    f = collate(tk, [[2]], pad_id=9, packed=True, pad_to=(2, 3))
    assert f["input_ids"].tolist() == [[31, 9, 9], [9, 9, 9]] and f["position_ids"].tolist() == [[0, 0, 1], [0, 1, 2]]
    assert f["targets"].numel() == 0 and f["num_tokens"] == 1


def test_epoch_batches_cover_every_example_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=301).tolist()
    for packing in (True, False):
        b0 = epoch_batches(lengths, 0, 7, batch_tokens=160, pack_length=40 if packing else 160, packing=packing)
        flat = [i for batch in b0 for row in batch for i in row]
        assert sorted(flat) == list(range(301))
        for batch in b0:
            if packing:
                assert len(batch) <= 4 and all(sum(lengths[i] for i in row) <= 40 for row in batch)
            else:
                assert all(len(row) == 1 for row in batch)
                assert max(lengths[r[0]] for r in batch) * len(batch) <= 160 or len(batch) == 1
        assert b0 == epoch_batches(lengths, 0, 7, 160, 40 if packing else 160, packing)
        assert b0 != epoch_batches(lengths, 1, 7, 160, 40 if packing else 160, packing)


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), tasks=("sid_seq", "title2sid"), lr=3e-3, batch_tokens=256,
                pack_length=128, max_length=128, eval_samples=8, eval_beams=10, eval_batch_size=8,
                model_overrides=SMALL, tokenizer_vocab_size=300, log_every=1, progress=False)
    base.update(kw)
    return SFTConfig(**base)


def test_train_learns_and_resumes_exactly(tmp_path):
    data = _data()
    cfg = _cfg(tmp_path, max_steps=40, eval_every=20, save_every=20, keep_checkpoints=3, patience=5)
    res = train_sft(cfg, data=data)
    out = res.output_dir
    losses = [loss for _, loss in res.history["loss"]]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert [s for s, _ in res.history["valid"]] == [20, 40]
    assert res.curves_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model" / "config.json").is_file() and (out / "train_log.jsonl").is_file()
    result = json.loads((out / "sft_result.json").read_text())
    assert result["step"] == 40 and result["best_step"] in (20, 40)
    assert res.sid_vocab.codebook_sizes == (4, 4)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000020", "step-0000040"]
    final = torch.load(out / "checkpoints" / "step-0000040" / "state.pt", weights_only=False)

    # lose the last checkpoint, resume from step 20: the same weights, optimizer state and log
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-0000040")
    res2 = train_sft(cfg, data=data)
    again = torch.load(out / "checkpoints" / "step-0000040" / "state.pt", weights_only=False)
    for k, v in final["model"].items():
        assert torch.equal(v, again["model"][k]), k
    assert [loss for _, loss in res2.history["loss"]] == losses
    for a, b in zip(final["optimizer"]["state"].values(), again["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    # the log was cut back to the checkpoint's step on resume: every step once
    assert [json.loads(ln)["step"] for ln in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 41))

    # resuming with settings that shape the training changed is refused, naming them (no silent mix of two runs)
    changed = r"other settings \(lr 0.003 then, 0.05 now; seed 0 then, 7 now\).*--no-resume"
    with pytest.raises(ValueError, match=changed):
        train_sft(_cfg(tmp_path, max_steps=40, eval_every=20, save_every=20, keep_checkpoints=3, patience=5,
                       lr=5e-2, seed=7), data=data)
    with pytest.raises(ValueError, match=r"other settings \(examples .* now; tasks \['sid_seq', 'title2sid'\] then, "
                                         r"\['sid_seq'\] now\)"):
        train_sft(_cfg(tmp_path, max_steps=40, eval_every=20, save_every=20, keep_checkpoints=3, patience=5,
                       tasks=("sid_seq",)), data=data)

    # --no-resume in the same output_dir: the old run's checkpoints go, so a later resume continues THIS run
    res3 = train_sft(_cfg(tmp_path, max_steps=10, eval_every=5, save_every=5, patience=5, resume=False), data=data)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000005", "step-0000010"]
    assert json.loads((out / "sft_result.json").read_text())["step"] == 10 and len(res3.history["loss"]) == 10
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 10


def test_responses_are_never_cut(tmp_path):
    data = _data()
    _, tok, _ = _tiny(data)
    ex = build_examples(data, ["sid2title"])
    n = len(tok(ex[0].response, add_special_tokens=False)["input_ids"])
    assert tokenize_examples(tok, ex[:1], n + 2)[0][1] == 1  # response + eos + one prompt token: fits
    with pytest.raises(ValueError, match=r"example 0 \(task 'sid2title'\): its response is \d+ tokens \+ eos"):
        tokenize_examples(tok, ex[:1], n + 1)
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tokenize_examples(tok, ex[:1], 1)


def test_epochs_count_micro_batches_under_gradient_accumulation(tmp_path):
    """epochs x micro-batches / grad_accum optimizer steps (rounded up): accumulation runs on across epoch
    ends, so rounding the steps per epoch down first would train on less data than asked."""
    data = _data()
    res1 = train_sft(_cfg(tmp_path / "a", epochs=2.0, eval_every=-1, grad_accum=1), data=data)
    micro = res1.history["loss"][-1][0] // 2  # optimizer steps = micro-batches at grad_accum 1
    res = train_sft(_cfg(tmp_path / "b", epochs=2.0, eval_every=-1, grad_accum=4), data=data)
    result = json.loads((res.output_dir / "sft_result.json").read_text())
    assert micro % 4 and result["step"] == -(-2 * micro // 4)  # not 2 * (micro // 4)


def test_config_and_data_errors_before_training(tmp_path):
    with pytest.raises(ValueError, match="patience must be >= 1"):
        _cfg(tmp_path, patience=0)
    data = _data()
    data.train = []
    with pytest.raises(ValueError, match="no training examples: 0 training samples"):
        train_sft(_cfg(tmp_path, eval_every=-1, tasks=("sid_seq",)), data=data)


def test_early_stopping_stops_when_valid_ndcg_stalls(tmp_path):
    data = _data()
    res = train_sft(_cfg(tmp_path, lr=0.0, max_steps=30, eval_every=3, patience=2, warmup_ratio=0.0), data=data)
    result = json.loads((res.output_dir / "sft_result.json").read_text())
    assert result["stopped_early"] and result["step"] == 9 and result["best_step"] == 3
    assert [s for s, _ in res.history["valid"]] == [3, 6, 9]


def test_cli_with_config_file(tmp_path):
    from genrec_fast.cli import main

    save_minionerec(_data(), tmp_path / "data")
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {tmp_path / 'data'}\noutput_dir: {tmp_path / 'cli'}\nmax_steps: 2\neval_every: -1\n"
                   f"tasks: [sid_seq]\nbatch_tokens: 256\npack_length: 128\nmax_length: 128\n"
                   f"tokenizer_vocab_size: 300\nmodel_overrides: {json.dumps(SMALL)}\n")
    assert main(["sft", "--config", str(cfg), "--no-progress", "--lr", "0.002"]) == 0
    saved = json.loads((tmp_path / "cli" / "sft_config.json").read_text())
    assert saved["lr"] == 0.002 and saved["tasks"] == ["sid_seq"] and saved["max_steps"] == 2
    assert (tmp_path / "cli" / "model" / "config.json").is_file()


def test_cuda_graphs_for_evaluation_needs_cuda_and_says_so_before_training(tmp_path):
    from genrec_fast.cli import main

    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        train_sft(_cfg(tmp_path, max_steps=1, cuda_graphs=True), data=_data())
    assert not list(tmp_path.rglob("train_log.jsonl")) and not list(tmp_path.rglob("state.pt"))  # nothing trained
    save_minionerec(_data(), tmp_path / "data")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        main(["sft", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "cli"), "--cuda-graphs"])


def test_valid_and_test_evals_take_the_search_options(tmp_path, monkeypatch):
    """shared_prefix / lse_backend reach the valid evals' and the test eval's beam searches (fp32: the same metrics
    as without; lse_backend "auto" is the torch one on CPU); graph_scope without cuda_graphs is refused before
    anything runs."""
    import genrec_fast.eval.beams as beams

    calls = []

    def beam_search(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("shared_prefix", "lse_backend")})
        return real(*args, **kwargs)

    real = beams.beam_search
    plain = train_sft(_cfg(tmp_path / "a", tasks=("sid_seq",), max_steps=2, eval_every=1, test=True, test_beams=10),
                      data=_data())
    monkeypatch.setattr(beams, "beam_search", beam_search)
    fast = train_sft(_cfg(tmp_path / "b", tasks=("sid_seq",), max_steps=2, eval_every=1, test=True, test_beams=10,
                          shared_prefix=True, lse_backend="auto"), data=_data())
    assert len(calls) >= 3 and all(c == {"shared_prefix": True, "lse_backend": "auto"} for c in calls)

    def timeless(metrics):
        return {k: v for k, v in metrics.items() if k != "seconds"}

    assert len(fast.history["valid"]) == len(plain.history["valid"]) == 2
    for (_, a), (_, b) in zip(fast.history["valid"], plain.history["valid"]):
        assert timeless(a) == pytest.approx(timeless(b))
    assert timeless(fast.test_metrics["model"]) == pytest.approx(timeless(plain.test_metrics["model"]))
    with pytest.raises(ValueError, match="SFTConfig: graph_scope 'search' needs cuda_graphs"):
        _cfg(tmp_path, graph_scope="search")


def test_train_on_valid_keeps_the_early_stopping_subset_out(tmp_path):
    data = _data()  # 16 users: 48 train, 16 valid samples
    res = train_sft(_cfg(tmp_path, tasks=("sid_seq",), max_steps=1, eval_every=1, eval_samples=5,
                         train_on_valid=True), data=data)
    result = json.loads((res.output_dir / "sft_result.json").read_text())
    assert result["train_examples"] == 48 + 11 and result["valid_subset"] == 5
    res = train_sft(_cfg(tmp_path, output_dir=str(tmp_path / "all"), tasks=("sid_seq",), max_steps=1,
                         eval_every=-1, train_on_valid=True), data=data)
    result = json.loads((res.output_dir / "sft_result.json").read_text())
    assert result["train_examples"] == 48 + 16 and result["valid_subset"] == 0


def test_test_split_table_with_the_hybrid_row(tmp_path, capsys):
    data = _data()
    res = train_sft(_cfg(tmp_path, tasks=("sid_seq",), max_steps=2, eval_every=-1, test=True, test_beams=10,
                         test_batch_size=8, test_hybrid_weight=3.0), data=data)
    saved = json.loads((res.output_dir / "test_metrics.json").read_text())
    assert saved == json.loads(json.dumps(res.test_metrics))
    assert saved["split"] == "test" and saved["hybrid"]["weight"] == 3.0
    assert saved["hybrid"]["HR@10"] == saved["model"]["HR@10"]  # the same items, re-ordered
    assert set(saved["per_sample"]["ranks"]) == {"model", "hybrid", "popularity", "transition", "sasrec"}
    assert "model + transition (w 3)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="SFTConfig: test_hybrid_weight must be a finite number >= 0, got -1"):
        _cfg(tmp_path, test_hybrid_weight=-1.0)


def test_history_suffixes_add_sid_seq_examples_of_their_own(tmp_path):
    from genrec_fast.data import history_suffixes

    data = _data()  # 16 users: 48 train samples
    n_copies = len(history_suffixes(data.train, [1]))
    assert 0 < n_copies < len(data.train)
    res = train_sft(_cfg(tmp_path, tasks=("sid_seq",), max_steps=1, eval_every=-1, history_suffixes=(1,)), data=data)
    assert json.loads((res.output_dir / "sft_result.json").read_text())["train_examples"] == 48 + n_copies
    # with whole user sequences the copies stay examples of their own (last item -> target), not chained in
    res = train_sft(_cfg(tmp_path, output_dir=str(tmp_path / "seq"), tasks=("sid_seq",), max_steps=1, eval_every=-1,
                         prompt_style="compact", sequence_loss=True, whole_sequences=True, history_suffixes=(1,)),
                    data=data)
    assert json.loads((res.output_dir / "sft_result.json").read_text())["train_examples"] == 16 + n_copies
    assert _cfg(tmp_path, history_suffixes=(0,)).history_suffixes == ()  # `--history-suffixes 0`: none
    with pytest.raises(ValueError, match="history_suffixes must be distinct integers >= 1"):
        _cfg(tmp_path, history_suffixes=(1, 1))
    with pytest.raises(ValueError, match="history_suffixes must be distinct integers >= 1"):
        _cfg(tmp_path, history_suffixes=(0, 1))
    with pytest.raises(ValueError, match="enable the sid_seq task"):
        _cfg(tmp_path, tasks=("title2sid",), history_suffixes=(1,))


def test_train_with_lora_learns(tmp_path):
    data = _data()
    res = train_sft(_cfg(tmp_path, lora=True, lora_r=4, lr=3e-2, max_steps=20, eval_every=-1), data=data)
    losses = [loss for _, loss in res.history["loss"]]
    assert len(losses) == 20 and np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
    assert not hasattr(res.model, "get_base_model")  # the saved model is the merged copy


def test_collate_pad_to_gives_one_shape_that_predicts_nothing_more():
    data = _data()
    _, tok, _ = _tiny(data)
    tk = _examples(tok, data)
    rows = epoch_batches([len(t[0]) for t in tk], 0, 0, batch_tokens=384, pack_length=128, packing=True)[0][:2]
    plain = collate(tk, rows, tok.pad_token_id, packed=True)
    fixed = collate(tk, rows, tok.pad_token_id, packed=True, pad_to=(3, 128))
    assert fixed["input_ids"].shape == (3, 128) and plain["input_ids"].shape[1] < 128
    assert torch.equal(fixed["targets"], plain["targets"]) and fixed["num_tokens"] == plain["num_tokens"]
    assert not fixed["keep"][2].any() and torch.equal(fixed["position_ids"][2], torch.arange(128))
    with pytest.raises(ValueError, match=r"2 rows x \d+ tokens does not fit pad_to=\(1, 128\)"):
        collate(tk, rows, tok.pad_token_id, packed=True, pad_to=(1, 128))
    with pytest.raises(ValueError, match="pad_to needs packed=True"):
        collate(tk, [[0], [1]], tok.pad_token_id, packed=False, pad_to=(2, 128))
    with pytest.raises(ValueError, match="compile needs packing=True"):
        SFTConfig(compile=True, packing=False)
    with pytest.raises(ValueError, match="eval_beams 4 < 10: early stopping ranks by valid NDCG@10"):
        SFTConfig(eval_beams=4)
    assert SFTConfig(eval_beams=4, eval_every=-1).eval_beams == 4


def test_compiled_step_equals_eager_and_never_recompiles(tmp_path):
    """torch.compile of the base forward (inductor, CPU): batches padded to one [rows, pack_length]
    shape give the eager loss and gradients of the unpadded batches, and nothing compiles twice."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from genrec_fast.train.sft import ResponseLoss

    data = _data()
    model, tok, _ = _tiny(data)
    model.train()  # the training graph (the tiny preset has no dropout, so eager is deterministic)
    tk = _examples(tok, data)
    batches = epoch_batches([len(t[0]) for t in tk], 0, 0, batch_tokens=256, pack_length=128, packing=True)[:3]
    eager, compiled = ResponseLoss(model), ResponseLoss(model, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for rows in batches:
            fixed = collate(tk, rows, tok.pad_token_id, packed=True, pad_to=(2, 128))
            plain = collate(tk, rows, tok.pad_token_id, packed=True)
            got, ref = compiled(fixed), eager(plain)
            assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (float(got), float(ref))
            g_got, g_ref = _grads(model, got), _grads(model, ref)
            for n in g_ref:
                assert torch.allclose(g_got[n], g_ref[n], atol=1e-5, rtol=1e-4), n

        # the training loop with compile=True (a new model of the same shapes: the same graph, no
        # recompile): the same losses as the eager loop, step for step
        losses = {}
        for flag in (False, True):
            res = train_sft(_cfg(tmp_path, output_dir=str(tmp_path / f"c{flag}"), max_steps=3, eval_every=-1,
                                 compile=flag), data=data)
            losses[flag] = [loss for _, loss in res.history["loss"]]
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert len(losses[True]) == 3 and np.allclose(losses[True], losses[False], rtol=1e-4, atol=1e-5), losses


def test_cli_compile_flag():
    import argparse

    from genrec_fast.train.sft import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert p.parse_args([]).compile is False and p.parse_args(["--compile"]).compile is True
    assert p.parse_args(["--compile", "--no-compile"]).compile is False


def test_adamw_is_fused_on_cpu_and_updates_like_the_default():
    from genrec_fast.train.sft import adamw

    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    start = [p.detach().clone() for p in a]
    opt_a = adamw([{"params": a[:1], "weight_decay": 0.1}, {"params": a[1:], "weight_decay": 0.0}], lr=1e-2)
    opt_b = torch.optim.AdamW([{"params": b[:1], "weight_decay": 0.1}, {"params": b[1:], "weight_decay": 0.0}],
                              lr=1e-2, foreach=False)
    assert opt_a.param_groups[0]["fused"] is True  # torch >= 2.4 has the CPU kernel
    for _ in range(3):
        for ps, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            sum((p ** 2).sum() for p in ps).backward()
            opt.step()
    for p, q, p0 in zip(a, b, start):
        assert not torch.allclose(p, p0, atol=1e-3) and torch.allclose(p, q, atol=1e-6, rtol=1e-5)


def test_packed_batch_under_flash_attention_keeps_examples_apart(monkeypatch):
    """flash-attn is not installed here: its two kernels are stood in for by exact torch code, routed the way
    transformers routes them. A packed batch of several rows must give the sdpa (block-diagonal) loss, which
    takes the varlen kernel: the batch runs as one row whose position ids restart per example."""
    import torch.nn.functional as F

    fau = pytest.importorskip("transformers.modeling_flash_attention_utils")
    if not hasattr(fau, "lazy_import_flash_attention"):
        pytest.skip("this transformers has no lazy_import_flash_attention to stand flash-attn in for")
    calls = []

    def attend(q, k, v, causal):  # [B, T, H, D] with grouped K/V heads
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return out.transpose(1, 2)

    def flash_fn(q, k, v, causal=True, **kw):
        calls.append("dense")
        return attend(q, k, v, causal)

    def flash_varlen_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, **kw):
        calls.append("varlen")
        cu = cu_seqlens_q.tolist()
        return torch.cat([attend(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0] for a, b in zip(cu, cu[1:])])

    def process_kwargs(**kw):
        return {"causal": kw.get("is_causal", True)}

    class KwargsFns(tuple):
        """transformers >= 5.2x unpacks (varlen kwargs fn, kvcache kwargs fn); 5.17 (the GPU image's) calls it."""

        def __call__(self, **kw):
            return process_kwargs(**kw)

    monkeypatch.setattr(fau, "lazy_import_flash_attention",
                        lambda *a, **k: ((flash_fn, flash_varlen_fn, None, None, None),
                                         KwargsFns((process_kwargs, process_kwargs))))
    data = _data()
    model, tok, _ = _tiny(data)
    model.eval()
    tk = _examples(tok, data)
    rows = epoch_batches([len(t[0]) for t in tk], 0, 0, batch_tokens=256, pack_length=128, packing=True)[0]
    batch = collate(tk, rows, tok.pad_token_id, True)
    assert batch["input_ids"].shape[0] > 1 and max(len(r) for r in rows) > 1  # rows that each hold several examples
    with torch.no_grad():
        want = response_loss(model, batch)
        for c in (model.config, model.model.config):
            c._attn_implementation_internal = "flash_attention_2"
        got = response_loss(model, batch)
    assert calls and set(calls) == {"varlen"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
