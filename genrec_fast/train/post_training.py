"""What S-DPO and GRPO share: config, set-up from an SFT checkpoint, the accelerate loop,
evaluation before/after, and saving.

A stage supplies ``make_step(session) -> step`` where ``step(samples) -> dict of floats``
computes its loss on a batch of samples, calls ``session.backward_and_step(loss)`` and
returns statistics to log; :class:`PostTrainer` (on the stages' shared base,
``genrec_fast.train.runtime``) does the rest: the output-dir lock, a fresh start or the resume of
the newest checkpoint, the loop, the JSONL log, evaluation, ``curves.png`` and saving. Under ``accelerate launch`` each
process takes its own slice of every global batch (DDP or DeepSpeed through the
Accelerator), the frozen reference lives beside the policy, and evaluation is sharded by
``genrec_fast.eval.evaluate``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_scheduler

from genrec_fast.config_cli import add_dataclass_arguments, config_from_args
from genrec_fast.data import load_minionerec
from genrec_fast.decode import beam_search
from genrec_fast.decode.options import SEARCH_OPTIONS, SearchOptions, check_search_options
from genrec_fast.eval import catalog_trie, compare_results, evaluate_split
from genrec_fast.io import atomic_write_text
from genrec_fast.model import encode_prompts, eval_mode
from genrec_fast.prompts import model_prompt_style, rec_prompt
from genrec_fast.train.curves import plot_panels, post_training_panels
from genrec_fast.train.logprobs import ReferenceModel
from genrec_fast.train.runtime import (
    StageConfig,
    StageTrainer,
    check_finite,
    cli_logging,
    is_main_process,
    load_model_dir,
    logger,
    opt,
    rng_state,
    run_lock,
    save_model_dir,
    set_rng_state,
    tracker_kwargs,
)

__all__ = ["PostTrainConfig", "Session", "add_config_arguments", "check_finite", "config_from_args", "post_train",
           "run_cli"]

# what a post-training run writes in out (its result marker first): a fresh start removes an earlier run's
POST_OUTPUTS = ("metrics.json", "model", "curves.png")
# the post-training lr schedules (names of transformers.get_scheduler)
LR_SCHEDULERS = ("constant_with_warmup", "cosine", "linear")
# config fields a resumed run may change: where and how it runs, not what it trains on or how
_RESUMABLE_CHANGES = ("data", "output_dir", "out", "progress", "eval_batch_size", "save", "cuda_graphs",
                      *SEARCH_OPTIONS, "save_every", "keep_checkpoints", "resume", "report_to")


@dataclass
class PostTrainConfig(StageConfig, SearchOptions):
    """Options both post-training stages take (each stage's config adds its own); the beam-search ones (its
    rollouts' and evals') from :class:`genrec_fast.decode.options.SearchOptions`."""

    model: str = opt("", "SFT model directory (model + tokenizer with the SID tokens)")
    data: str = opt("", "MiniOneRec-format data directory")
    output_dir: str = opt("", "output directory: model/, metrics.json, curves.png, train_log.jsonl, checkpoints/ "
                                "(or --out)")
    max_steps: Optional[int] = opt(100, "optimizer steps (or --steps)")
    batch_size: int = opt(8, "prompts per step per process")
    lr: float = opt(1e-5, "learning rate (finite, >= 0)")
    warmup_steps: int = opt(0, "optimizer steps of linear warm-up from 0 (the lr of step s + 1 is lr x s / "
                               "warmup_steps while s < warmup_steps)")
    lr_scheduler: str = opt("constant_with_warmup", "lr after the warm-up (transformers.get_scheduler): "
                                                    "'constant_with_warmup' (lr), 'cosine' or 'linear' (decay to 0 at "
                                                    "max_steps)", choices=LR_SCHEDULERS)
    max_grad_norm: float = opt(1.0, "gradient-norm clipping")
    beta: float = opt(0.1, "S-DPO: temperature of the implicit rewards; GRPO: weight of the k3 KL to the reference")
    max_prompt_length: Optional[int] = opt(None, "prompt tokens kept (cut from the left); none: all")
    train_samples: Optional[int] = opt(None, "train on a fixed random subset of this size of the training prompts")
    train_on_valid: bool = opt(False, "train on the train and valid samples (for a test-only evaluation of a model "
                                      "whose SFT saw valid too); valid can then not be an eval split")
    prompt_split: str = opt("train", "the split whose samples are the training prompts: 'train', or 'valid' (prompts "
                                     "a train-only SFT model has not fitted; valid can then not be an eval split)",
                            choices=("train", "valid"))
    eval_splits: Tuple[str, ...] = opt(("valid", "test"), "splits evaluated before/after ('none': no evaluation)")
    eval_samples: Optional[int] = opt(500, "fixed random subset per eval split (none: all)")
    eval_beams: int = opt(20, "beams of the evaluations (>= 10)")
    eval_batch_size: int = opt(16, "prompts per evaluation beam search")
    eval_before: bool = opt(True, "evaluate the SFT model on the same subsets first")
    lora_r: int = opt(0, "> 0: train a LoRA adapter of this rank (the reference is the adapter-disabled policy; "
                         "merged into the saved model); 0: full training")
    save: bool = opt(True, "write the trained policy to OUT/model")
    save_every: int = opt(50, "optimizer steps between checkpoints (OUT/checkpoints; not under DeepSpeed); 0: none")

    def __post_init__(self):
        for name in ("model", "data"):
            if not getattr(self, name):
                raise ValueError(f"{type(self).__name__}: '{name}' is required")
        super().__post_init__()
        if not self.output_dir:
            raise ValueError(f"{type(self).__name__}: 'output_dir' (--output-dir, or --out) is required")
        if self.max_steps is None:
            raise ValueError(f"{type(self).__name__}: max_steps (--max-steps, or --steps) must be a number of steps")
        for name in ("max_steps", "batch_size", "eval_beams", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{type(self).__name__}: '{name}' must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"{type(self).__name__}: warmup_steps must be >= 0, got {self.warmup_steps}")
        check_search_options(type(self).__name__, self)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"{type(self).__name__}: lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, "
                             f"got {self.lr_scheduler!r}")
        splits = tuple(self.eval_splits)
        self.eval_splits = () if splits == ("none",) else splits  # `--eval-splits none`: no evaluation
        if self.eval_splits and self.eval_beams < 10:
            raise ValueError(f"{type(self).__name__}: eval_beams {self.eval_beams} < 10: the evals report HR@10 / "
                             f"NDCG@10, which need >= 10 beams (or pass --eval-splits none)")
        bad = [s for s in self.eval_splits if s not in ("train", "valid", "test")]
        if bad:
            raise ValueError(f"eval_splits must name train/valid/test splits, got {bad}")
        if self.train_on_valid and "valid" in self.eval_splits:
            raise ValueError(f"{type(self).__name__}: train_on_valid trains on the valid samples, so 'valid' cannot "
                             f"be an eval split (got eval_splits {list(self.eval_splits)}; use --eval-splits test)")
        name = type(self).__name__
        if self.prompt_split not in ("train", "valid"):
            raise ValueError(f"{name}: prompt_split must be 'train' or 'valid', got {self.prompt_split!r}")
        if self.prompt_split == "valid":
            if self.train_on_valid:
                raise ValueError(f"{name}: train_on_valid adds the valid samples to the train prompts; with "
                                 f"prompt_split 'valid' the prompts are the valid samples alone: set one of them")
            if "valid" in self.eval_splits:
                raise ValueError(f"{name}: prompt_split 'valid' trains on the valid samples, so 'valid' cannot be an "
                                 f"eval split (got eval_splits {list(self.eval_splits)}; use --eval-splits test)")


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off everywhere in ``model`` (as TRL does for DPO / GRPO): ``nn.Dropout`` modules and
    the ``attention_dropout`` rate HF attention modules apply in train mode. The policy's log-probs in
    a training step then equal those of the rollout (which runs in eval mode), so PPO ratios, the KL
    and S-DPO's implicit rewards carry no dropout noise. Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p = 0.0
            changed += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate != 0:
            module.attention_dropout = 0.0
            changed += 1
    return changed


class Session:
    """Everything a step needs: accelerator, policy (prepared), reference, data, trie, vocab."""

    def __init__(self, cfg: PostTrainConfig):
        self.cfg = cfg
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=mp, **tracker_kwargs(cfg.report_to, cfg.output_dir))
        set_seed(cfg.seed)
        self.data = load_minionerec(cfg.data)
        catalog = self.data.catalog
        if catalog.codes is None:
            raise ValueError(f"{cfg.data}: the catalogue has no SIDs (index.json)")
        self.trie = catalog_trie(catalog)
        self.item_leaf = self.trie.lookup(catalog.codes)  # [N] leaf (= SID) of every item
        self.item_codes = torch.as_tensor(catalog.codes, dtype=torch.long)  # [N, L] SID codes of every item
        model, self.tokenizer, self.sid_vocab = load_model_dir(
            cfg.model, catalog.codebook_sizes, lora=cfg.lora_r > 0, lora_r=max(cfg.lora_r, 1),
            lora_alpha=cfg.lora_alpha, lora_dropout=0.0, device=self.accelerator.device,
        )
        disable_dropout(model)
        self.reference = ReferenceModel(model)  # before prepare: an unwrapped, un-sharded copy
        if cfg.cuda_graphs and self._zero3:
            raise ValueError("cuda_graphs: ZeRO-3 gathers the weights anew for every search, so captured graphs "
                             "would read stale addresses; use ZeRO-2/DDP or cuda_graphs=False")
        if self.reference.model is not None:
            self.reference.model.to(self.accelerator.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self._set_deepspeed_batch_size(cfg.batch_size)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # not prepared: accelerate steps a prepared scheduler once per PROCESS at each optimizer step (it assumes
        # per-process data-loader steps), so warm-up would end N times early; ours counts global optimizer steps.
        # It sets the lr of the param groups the prepared optimizer (and DeepSpeed's wrapper) steps with.
        self.scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_steps),
                                       num_training_steps=int(cfg.max_steps))
        if cfg.prompt_split == "valid":
            self.train = list(self.data.valid)
        else:
            self.train = list(self.data.train) + (list(self.data.valid) if cfg.train_on_valid else [])
        if not self.train:
            raise ValueError(f"{cfg.data}: the {cfg.prompt_split} split is empty")
        if cfg.train_samples is not None and cfg.train_samples < len(self.train):
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(self.train), cfg.train_samples, replace=False))
            self.train = [self.train[i] for i in keep]
        self.rng = np.random.default_rng(cfg.seed + 1000 * self.accelerator.process_index)

    def learnable_samples(self) -> list:
        """Every sample this run may learn from: train, + valid when it trains on valid (``train_on_valid``, or valid
        prompts), whatever ``train_samples`` keeps of them as prompts."""
        cfg = self.cfg
        with_valid = cfg.train_on_valid or cfg.prompt_split == "valid"
        return list(self.data.train) + (list(self.data.valid) if with_valid else [])

    def _set_deepspeed_batch_size(self, batch_size: int) -> None:
        # no DataLoader goes through prepare(), so DeepSpeed's "auto" micro batch is filled here
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None:
            plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size

    @property
    def _zero3(self) -> bool:
        """Weights sharded by DeepSpeed ZeRO-3 (gathered anew for every search)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def prompts(self, samples: Sequence) -> Tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask of ``samples`` (on the device)."""
        style = model_prompt_style(self.unwrapped)
        texts = [rec_prompt(s.history, self.data.catalog, style) for s in samples]
        ids, mask = encode_prompts(self.tokenizer, texts, max_length=self.cfg.max_prompt_length)
        return ids.to(self.device), mask.to(self.device)

    def reference_logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           response_ids: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Reference log-probs (:meth:`ReferenceModel.logprobs`: [R] or [R, L] per token for [R, L] responses, [P, C]
        or [P, C, L] for [P, C, L]) under the same autocast as the policy's forward (no grad)."""
        with self.accelerator.autocast():
            return self.reference.logprobs(prompt_ids, prompt_mask, response_ids, per_token=per_token)

    def response_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """SID codes [..., L] -> token ids [R, L] on the device."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        return self.sid_vocab.token_ids(codes.reshape(-1, codes.shape[-1]).cpu()).to(self.device)

    @contextlib.contextmanager
    def rollout_model(self):
        """The policy for beam search and evaluation: unwrapped, eval mode, autocast, no grad.

        Under ZeRO-3 the sharded weights are gathered for the duration (the search reads the LM
        head directly). Under LoRA the adapter-wrapped model is searched as it is (the beam
        search reads the wrapped head's effective weight).
        """
        model = self.unwrapped
        gather = contextlib.nullcontext()
        if self._zero3:
            import deepspeed  # lazy: optional (the 'deepspeed' extra), only under ZeRO-3

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
        with eval_mode(model), gather, torch.no_grad(), self.accelerator.autocast():
            yield model

    def beam_search(self, ids: torch.Tensor, mask: torch.Tensor, num_beams: int):
        """Constrained beam search of the current policy; refuses groups with padding beams."""
        with self.rollout_model() as model:
            res = beam_search(model, ids, mask, self.trie, self.sid_vocab, num_beams, score="full_vocab",
                              cuda_graphs=self.cfg.cuda_graphs, **self.cfg.search_kwargs())
        if bool((res.leaf_ids < 0).any()):
            raise ValueError(
                f"beam search returned fewer than {num_beams} beams for some prompts: the catalogue has "
                f"{self.trie.num_leaves} distinct SIDs; lower the number of beams"
            )
        return res

    def backward_and_step(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss``; returns the gradient norm before clipping."""
        self.accelerator.backward(loss)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm) if norm is not None else float("nan")

    def batches(self, start: int = 0):
        """Endless stream of this process's slice of each global batch (seeded epochs), from the
        ``start``-th global batch on (a resumed run continues where its checkpoint was taken)."""
        world, rank, bs = self.accelerator.num_processes, self.accelerator.process_index, self.cfg.batch_size
        per_step = world * bs
        if len(self.train) < per_step:
            raise ValueError(f"{len(self.train)} train samples < one global batch of {per_step}")
        per_epoch = len(self.train) // per_step
        epoch, first = divmod(start, per_epoch)
        while True:
            order = np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.train))
            for b in range(first, per_epoch):
                mine = order[b * per_step + rank * bs : b * per_step + (rank + 1) * bs]
                yield [self.train[i] for i in mine]
            epoch, first = epoch + 1, 0

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """The policy's metrics per eval split. From the second call on, each split's entry also holds
        "vs_start": paired bootstrap intervals of (this policy - the policy of the first call) on the same
        samples (``genrec_fast.eval.compare_results``)."""
        out = {}
        first = self.__dict__.setdefault("_first_eval", {})
        for split in self.cfg.eval_splits:
            with self.rollout_model() as model:
                res = evaluate_split(
                    model, self.tokenizer, self.sid_vocab, self.data, split,
                    num_beams=self.cfg.eval_beams, batch_size=self.cfg.eval_batch_size,
                    max_samples=self.cfg.eval_samples, seed=self.cfg.seed, trie=self.trie,
                    max_prompt_length=self.cfg.max_prompt_length, print_table=False,
                    cuda_graphs=self.cfg.cuda_graphs, search_options=self.cfg.search_kwargs(),
                    sasrec=False,  # only the policy's metrics are kept
                )
            ps = res["per_sample"]  # the policy's rank of every sample's target, for pairing across runs
            out[split] = {**res["model"], "per_sample": {"user_id": ps["user_id"], "samples_sha1": ps["samples_sha1"],
                                                          "ranks": {"model": ps["ranks"]["model"]}}}
            if split in first:
                out[split]["vs_start"] = compare_results(res, first[split], seed=self.cfg.seed)
            else:
                first[split] = res
        return out

    def save(self, out_dir: Path) -> Path:
        """Write the policy (merged LoRA, if any) and tokenizer to out_dir/model, atomically."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # every process takes part (ZeRO-3 gathers)
        target = out_dir / "model"
        if acc.is_main_process:
            save_model_dir(self.unwrapped, self.tokenizer, target, self.data.catalog, state_dict=state)
        acc.wait_for_everyone()
        return target


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def post_train(cfg: PostTrainConfig, make_step: Callable[[Session], Callable[[list], Dict[str, float]]],
               name: str) -> Dict[str, Any]:
    """Run ``cfg.max_steps`` steps of ``make_step(session)`` (resuming the newest checkpoint in ``cfg.output_dir``
    when ``cfg.resume``); evaluate before/after; save; return the metrics dict. One run at a time per output dir."""
    with run_lock(Path(cfg.output_dir), enabled=is_main_process()):
        return PostTrainer(cfg, name, make_step).run()


class PostTrainer(StageTrainer):
    """One post-training run (S-DPO or GRPO: the ``make_step`` of the stage) on a :class:`Session`."""

    outputs = POST_OUTPUTS

    def __init__(self, cfg: PostTrainConfig, name: str, make_step):
        self.t0 = time.perf_counter()
        self.session = Session(cfg)
        super().__init__(cfg, Path(cfg.output_dir), self.session.accelerator)
        self.stage = name
        self.step_fn = make_step(self.session)

    def rng_states(self) -> Dict[str, Any]:
        return {**rng_state(), "session": self.session.rng.bit_generator.state}

    def set_rng_states(self, state: Dict[str, Any]) -> None:
        set_rng_state(state)
        self.session.rng.bit_generator.state = state["session"]

    def run_key(self) -> Dict[str, Any]:
        """What a checkpoint must share with the run that resumes it (see ``_RESUMABLE_CHANGES``)."""
        key = {k: v for k, v in _jsonable(dataclasses.asdict(self.cfg)).items() if k not in _RESUMABLE_CHANGES}
        key.update(stage=self.stage, num_processes=self.acc.num_processes)
        return key

    def run(self) -> Dict[str, Any]:
        cfg, acc, session = self.cfg, self.acc, self.session
        result: Dict[str, Any] = {"stage": self.stage, "config": _jsonable(dataclasses.asdict(cfg)),
                                  "num_processes": acc.num_processes}
        run = self._start()
        if "before" in run:
            result["before"] = run["before"]
        t_train = time.perf_counter() - run["train_seconds"]
        try:
            self._train(run, t_train)
        finally:
            self.finish_trackers()
        result["train_seconds"] = round(time.perf_counter() - t_train, 2)
        result["log"] = run["log"]
        result["after"] = session.evaluate()
        self.info("[%s] after: %s", self.stage, _fmt_eval(result["after"]))
        if cfg.save:
            result["model_dir"] = str(session.save(self.out))
        result["seconds"] = round(time.perf_counter() - self.t0, 2)
        if self.is_main:
            plot_panels(post_training_panels(result["log"], result.get("before"), result["after"], cfg.max_steps),
                        self.out / "curves.png", self.stage)
            _write_json(self.out / "metrics.json", result)
        acc.wait_for_everyone()
        result["session"] = session
        return result

    def _start(self) -> Dict[str, Any]:
        """The run's progress: from the newest readable checkpoint (policy, optimizer, scheduler and every
        process's RNG states restored), or a fresh start (the starting policy evaluated when eval_before)."""
        session = self.session
        blob = self.resume_or_start(self.run_key())
        if blob is not None:
            session.unwrapped.load_state_dict(blob["model"])
            session.optimizer.load_state_dict(blob["optimizer"])
            session.scheduler.load_state_dict(blob["scheduler"])
            session.__dict__["_first_eval"] = blob["first_eval"]  # "vs_start" of the final eval compares with it
            self.info("[%s] resumed from step %d (%s)", self.stage, blob["trainer"]["step"], self.out / "checkpoints")
            return blob["trainer"]
        run: Dict[str, Any] = {"step": 0, "log": [], "window": [], "train_seconds": 0.0}
        if self.cfg.eval_before:
            run["before"] = session.evaluate()
            self.info("[%s] before: %s", self.stage, _fmt_eval(run["before"]))
        return run

    def _train(self, run: Dict[str, Any], t_train: float) -> None:
        cfg, session = self.cfg, self.session
        session.model.train()
        batches = session.batches(start=run["step"])
        bar = self.progress_bar(cfg.max_steps, initial=run["step"])
        for i in range(run["step"], cfg.max_steps):
            run["window"].append(self.step_fn(next(batches)))
            run["step"] = i + 1
            bar.update(1)
            if run["step"] % cfg.log_every == 0 or run["step"] == cfg.max_steps:
                row = _reduce(self.acc, run["window"])
                row["step"], row["lr"] = run["step"], session.scheduler.get_last_lr()[0]
                run["log"].append(row)
                run["window"] = []
                self.log_metrics(row)
                self.info("[%s] step %d/%d %s", self.stage, run["step"], cfg.max_steps,
                          " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
            if cfg.save_every and (run["step"] % cfg.save_every == 0 or run["step"] == cfg.max_steps):
                run["train_seconds"] = time.perf_counter() - t_train
                self._save_checkpoint(run)
        bar.close()

    def _save_checkpoint(self, run: Dict[str, Any]) -> None:
        """A checkpoint at ``run["step"]``; none under DeepSpeed (its optimizer state is sharded across
        processes), which a warning says once."""
        if getattr(self.acc.state, "deepspeed_plugin", None) is not None:
            if not getattr(self, "_warned_deepspeed", False):
                logger.warning("%s: no checkpoints under DeepSpeed (sharded optimizer state); a restart starts "
                               "afresh", self.stage)
                self._warned_deepspeed = True
            return
        session = self.session
        self.save_checkpoint(run["step"], {
            "model": session.unwrapped.state_dict(), "optimizer": session.optimizer.state_dict(),
            "scheduler": session.scheduler.state_dict(), "trainer": run,
            "first_eval": session.__dict__.get("_first_eval", {}), "run_key": self.run_key()})
        self.acc.wait_for_everyone()


def _reduce(acc, window: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each logged statistic over the window and over processes."""
    keys = sorted(window[0])
    local = torch.tensor([[float(w[k]) for k in keys] for w in window], dtype=torch.float64).mean(0)
    if acc.num_processes > 1:
        local = acc.reduce(local.to(acc.device), reduction="mean").cpu()
    return {k: float(v) for k, v in zip(keys, local)}


def _fmt_eval(res: Dict[str, Dict[str, float]]) -> str:
    return " ".join(f"{s}: HR@10={m['HR@10']:.4f} NDCG@10={m['NDCG@10']:.4f}" for s, m in res.items())


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ---- command line --------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--option`` per field of a post-training config dataclass (``genrec_fast.config_cli``: types and
    defaults from the dataclass, help texts from the fields' ``metadata["help"]``); model, data and out first,
    model and data required (output_dir is checked by the config: it may come as --out)."""
    add_dataclass_arguments(parser, config_cls, first=("model", "data", "output_dir", "out"),
                            required=("model", "data"))


def run_cli(config_cls, train_fn, args: argparse.Namespace) -> int:
    cli_logging()
    result = train_fn(config_from_args(config_cls, args))
    before, after = result.get("before"), result["after"]
    if result["session"].accelerator.is_main_process:
        for split, m in after.items():
            b = f" (SFT {before[split]['NDCG@10']:.4f})" if before else ""
            print(f"{split}: NDCG@10 {m['NDCG@10']:.4f}{b}  HR@10 {m['HR@10']:.4f}")
        print(f"metrics: {Path(result['config']['output_dir']) / 'metrics.json'}")
    return 0
