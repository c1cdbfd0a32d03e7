"""What S-DPO and GRPO share: config, set-up from an SFT checkpoint, the accelerate loop,
evaluation before/after, and saving.

A trainer supplies ``make_step(session) -> step`` where ``step(samples) -> dict of floats``
computes its loss on a batch of samples, calls ``session.backward_and_step(loss)`` and
returns statistics to log; :func:`post_train` does the rest. Under ``accelerate launch`` each
process takes its own slice of every global batch (DDP or DeepSpeed through the
Accelerator), the frozen reference lives beside the policy, and evaluation is sharded by
``genrec_fast.eval.evaluate``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genrec_fast.io import atomic_dir
from genrec_fast.model import eval_mode
from genrec_fast.train.logprobs import ReferenceModel


@dataclass
class PostTrainConfig:
    """Options both post-training stages take (each stage's config adds its own)."""

    model: str = ""  # SFT checkpoint directory (model + tokenizer with the SID tokens)
    data: str = ""  # MiniOneRec-format data directory
    out: str = ""  # output directory: model/, metrics.json
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # prompts per step per process
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # S-DPO temperature / GRPO KL weight
    seed: int = 0
    max_prompt_length: Optional[int] = None
    train_samples: Optional[int] = None  # use a fixed random subset of the train split
    eval_splits: Tuple[str, ...] = ("valid", "test")
    eval_samples: Optional[int] = 500  # fixed random subset per split (None: all)
    eval_beams: int = 20
    eval_batch_size: int = 16
    eval_before: bool = True  # evaluate the SFT model on the same subsets first
    mixed_precision: str = "auto"  # "auto": bf16 on CUDA, else "no"
    lora_r: int = 0  # > 0: train a LoRA adapter; the reference is the adapter-disabled policy
    lora_alpha: int = 16
    log_every: int = 10
    save: bool = True
    cuda_graphs: bool = False  # rollouts' and evals' beam-search forwards replayed from CUDA graphs (not ZeRO-3)

    def __post_init__(self):
        for name in ("model", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{type(self).__name__}: '{name}' is required")
        for name in ("steps", "batch_size", "eval_beams", "eval_batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{type(self).__name__}: '{name}' must be >= 1, got {getattr(self, name)}")
        splits = tuple(self.eval_splits)
        self.eval_splits = () if splits == ("none",) else splits  # `--eval-splits none`: no evaluation
        if self.eval_splits and self.eval_beams < 10:
            raise ValueError(f"{type(self).__name__}: eval_beams {self.eval_beams} < 10: the evals report HR@10 / "
                             f"NDCG@10, which need >= 10 beams (or pass --eval-splits none)")
        bad = [s for s in self.eval_splits if s not in ("train", "valid", "test")]
        if bad:
            raise ValueError(f"eval_splits must name train/valid/test splits, got {bad}")


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
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from genrec_fast.data import load_minionerec
        from genrec_fast.eval import catalog_trie
        from genrec_fast.model import load_model_and_tokenizer

        self.cfg = cfg
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        self.accelerator = Accelerator(mixed_precision=mp)
        set_seed(cfg.seed)
        self.data = load_minionerec(cfg.data)
        catalog = self.data.catalog
        if catalog.codes is None:
            raise ValueError(f"{cfg.data}: the catalogue has no SIDs (index.json)")
        self.trie = catalog_trie(catalog)
        self.item_leaf = self.trie.lookup(catalog.codes)  # [N] leaf (= SID) of every item
        model, self.tokenizer, self.sid_vocab = load_model_and_tokenizer(
            cfg.model, catalog.codebook_sizes, lora=cfg.lora_r > 0, lora_r=max(cfg.lora_r, 1), lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0, device=self.accelerator.device,
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
        warm = max(int(cfg.warmup_steps), 0)
        self._set_deepspeed_batch_size(cfg.batch_size)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # not prepared: accelerate steps a prepared scheduler once per PROCESS at each optimizer step (it assumes
        # per-process data-loader steps), so warm-up would end N times early; ours counts global optimizer steps.
        # It sets the lr of the param groups the prepared optimizer (and DeepSpeed's wrapper) steps with.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)))
        self.train = list(self.data.train)
        if not self.train:
            raise ValueError(f"{cfg.data}: the train split is empty")
        if cfg.train_samples is not None and cfg.train_samples < len(self.train):
            keep = np.sort(np.random.default_rng(cfg.seed).choice(len(self.train), cfg.train_samples, replace=False))
            self.train = [self.train[i] for i in keep]
        self.rng = np.random.default_rng(cfg.seed + 1000 * self.accelerator.process_index)

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
        from genrec_fast.model import encode_prompts
        from genrec_fast.prompts import model_prompt_style, rec_prompt

        style = model_prompt_style(self.unwrapped)
        texts = [rec_prompt(s.history, self.data.catalog, style) for s in samples]
        ids, mask = encode_prompts(self.tokenizer, texts, max_length=self.cfg.max_prompt_length)
        return ids.to(self.device), mask.to(self.device)

    def reference_logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           response_ids: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """Reference log-probs ([R], or [R, L] per token) under the same autocast as the policy's forward (no grad)."""
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
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
        with eval_mode(model), gather, torch.no_grad(), self.accelerator.autocast():
            yield model

    def beam_search(self, ids: torch.Tensor, mask: torch.Tensor, num_beams: int):
        """Constrained beam search of the current policy; refuses groups with padding beams."""
        from genrec_fast.decode import beam_search

        with self.rollout_model() as model:
            res = beam_search(model, ids, mask, self.trie, self.sid_vocab, num_beams, score="full_vocab",
                              cuda_graphs=self.cfg.cuda_graphs)
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

    def batches(self):
        """Endless stream of this process's slice of each global batch (seeded epochs)."""
        world, rank, bs = self.accelerator.num_processes, self.accelerator.process_index, self.cfg.batch_size
        per_step = world * bs
        if len(self.train) < per_step:
            raise ValueError(f"{len(self.train)} train samples < one global batch of {per_step}")
        epoch = 0
        while True:
            order = np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.train))
            for start in range(0, len(order) - per_step + 1, per_step):
                mine = order[start + rank * bs : start + (rank + 1) * bs]
                yield [self.train[i] for i in mine]
            epoch += 1

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """The policy's metrics per eval split. From the second call on, each split's entry also holds
        "vs_start": paired bootstrap intervals of (this policy - the policy of the first call) on the same
        samples (``genrec_fast.eval.compare_results``)."""
        from genrec_fast.eval import compare_results, evaluate_split

        out = {}
        first = self.__dict__.setdefault("_first_eval", {})
        for split in self.cfg.eval_splits:
            with self.rollout_model() as model:
                res = evaluate_split(
                    model, self.tokenizer, self.sid_vocab, self.data, split,
                    num_beams=self.cfg.eval_beams, batch_size=self.cfg.eval_batch_size,
                    max_samples=self.cfg.eval_samples, seed=self.cfg.seed, trie=self.trie,
                    max_prompt_length=self.cfg.max_prompt_length, print_table=False,
                    cuda_graphs=self.cfg.cuda_graphs, sasrec=False,  # only the policy's metrics are kept
                )
            out[split] = res["model"]
            if split in first:
                out[split] = {**res["model"], "vs_start": compare_results(res, first[split], seed=self.cfg.seed)}
            else:
                first[split] = res
        return out

    def save(self, out_dir: Path) -> Path:
        """Write the policy (merged LoRA, if any) and tokenizer to out_dir/model, atomically."""
        acc = self.accelerator
        state = acc.get_state_dict(self.model)  # every process takes part (ZeRO-3 gathers)
        target = out_dir / "model"
        if acc.is_main_process:
            model = self.unwrapped
            if self.reference.uses_adapter:
                model = copy.deepcopy(model).merge_and_unload()  # adapter folded in: a plain checkpoint
                state = None

            def write(tmp: Path) -> None:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)

            atomic_dir(target, write)
        acc.wait_for_everyone()
        return target


def _write_json(path: Path, obj: Any) -> None:
    from genrec_fast.io import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def post_train(cfg: PostTrainConfig, make_step: Callable[[Session], Callable[[list], Dict[str, float]]],
               name: str) -> Dict[str, Any]:
    """Run ``cfg.steps`` steps of ``make_step(session)``; evaluate before/after; save; return the metrics dict."""
    t0 = time.perf_counter()
    session = Session(cfg)
    step = make_step(session)
    acc = session.accelerator
    out_dir = Path(cfg.out)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    result: Dict[str, Any] = {"stage": name, "config": _jsonable(dataclasses.asdict(cfg)),
                              "num_processes": acc.num_processes}
    if cfg.eval_before:
        result["before"] = session.evaluate()
        _log(acc, f"[{name}] before: {_fmt_eval(result['before'])}")
    session.model.train()
    log: List[Dict[str, float]] = []
    window: List[Dict[str, float]] = []
    batches = session.batches()
    t_train = time.perf_counter()
    for i in range(cfg.steps):
        stats = step(next(batches))
        window.append(stats)
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
            row = _reduce(acc, window)
            row["step"], row["lr"] = i + 1, session.scheduler.get_last_lr()[0]
            log.append(row)
            window = []
            _log(acc, f"[{name}] step {i + 1}/{cfg.steps} " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step"))
    result["train_seconds"] = round(time.perf_counter() - t_train, 2)
    result["log"] = log
    result["after"] = session.evaluate()
    _log(acc, f"[{name}] after: {_fmt_eval(result['after'])}")
    if cfg.save:
        result["model_dir"] = str(session.save(out_dir))
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if acc.is_main_process:
        _write_json(out_dir / "metrics.json", result)
    acc.wait_for_everyone()
    result["session"] = session
    return result


def _reduce(acc, window: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean of each logged statistic over the window and over processes."""
    keys = sorted(window[0])
    local = torch.tensor([[float(w[k]) for k in keys] for w in window], dtype=torch.float64).mean(0)
    if acc.num_processes > 1:
        local = acc.reduce(local.to(acc.device), reduction="mean").cpu()
    return {k: float(v) for k, v in zip(keys, local)}


def _log(acc, text: str) -> None:
    if acc.is_main_process:
        print(text, flush=True)


def _fmt_eval(res: Dict[str, Dict[str, float]]) -> str:
    return " ".join(f"{s}: HR@10={m['HR@10']:.4f} NDCG@10={m['NDCG@10']:.4f}" for s, m in res.items())


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ---- command line --------------------------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--option`` per field of a config dataclass (types and defaults from the dataclass)."""
    hints = {f.name: f for f in dataclasses.fields(config_cls)}
    for name, f in hints.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if name in ("model", "data", "out"):
            parser.add_argument(flag, dest=name, required=True)
        elif "bool" in kind:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default)
        elif "Tuple" in kind:
            parser.add_argument(flag, dest=name, nargs="+", default=list(default))
        elif "float" in kind:
            parser.add_argument(flag, dest=name, type=_optional(float), default=default)
        elif "int" in kind:
            parser.add_argument(flag, dest=name, type=_optional(int), default=default)
        else:
            parser.add_argument(flag, dest=name, type=_optional(str), default=default)


def _optional(conv):
    def parse(text):
        if isinstance(text, str) and text.lower() in ("none", "null"):
            return None
        return conv(text)

    parse.__name__ = conv.__name__
    return parse


def config_from_args(config_cls, args: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def run_cli(config_cls, train_fn, args: argparse.Namespace) -> int:
    result = train_fn(config_from_args(config_cls, args))
    before, after = result.get("before"), result["after"]
    if result["session"].accelerator.is_main_process:
        for split, m in after.items():
            b = f" (SFT {before[split]['NDCG@10']:.4f})" if before else ""
            print(f"{split}: NDCG@10 {m['NDCG@10']:.4f}{b}  HR@10 {m['HR@10']:.4f}")
        print(f"metrics: {Path(result['config']['out']) / 'metrics.json'}")
    return 0


def check_finite(name: str, value: torch.Tensor) -> None:
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{name} is not finite: {value.detach().flatten()[:8].tolist()}")


