"""Multi-task SFT: a plain accelerate loop over packed, response-only-loss batches.

* Examples come from the task registry (``genrec_fast.prompts``); each is tokenized as
  ``prompt + response + eos`` and the loss covers the response tokens only.
* Packing: examples are laid end to end in rows of ``pack_length`` tokens with position ids
  restarting per example and no attention mask, so HF attention keeps the examples apart
  (flash-attn varlen over the batch as one row, or a block-diagonal sdpa mask); no padding is computed except a row's
  tail. ``packing=False`` uses length-bucketed padded batches instead.
* Logits are computed only at the positions that predict a response token: the base
  transformer's hidden states are gathered there and the LM head runs on those rows only, then an
  fp32 cross-entropy: the [tokens, vocab] logits of the prompt are never formed.
* ``compile=True`` (``--compile``): the base transformer's forward and backward through
  ``torch.compile``, every packed batch padded to one [batch_tokens // pack_length, pack_length]
  shape so it compiles once.
* bf16 autocast on GPU; checkpoints hold model, optimizer, scheduler, every process's RNG states, the
  data position (epoch + batch) and the open log window, so a resumed run continues exactly; a
  non-finite loss stops the run; early stopping on valid NDCG@10 from ``genrec_fast.eval.evaluate``
  (constrained beam search) on a fixed valid subset; a PNG of the loss and valid-metric curves
  (``curves.png``).
* :class:`SFTTrainer` on the stages' shared base (``genrec_fast.train.runtime``: the output-dir lock,
  resume or fresh start, checkpoints, the JSONL log, progress bar, messages, the model directory).

Python API: ``train_sft(SFTConfig(...), data=RecData)``; CLI: ``genrec-fast sft``.
"""
from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from genrec_fast.config_cli import add_dataclass_arguments, config_from_args
from genrec_fast.data import history_suffixes, load_minionerec
from genrec_fast.data.interactions import check_suffix_lengths
from genrec_fast.decode import graphs
from genrec_fast.decode.options import SEARCH_OPTIONS, SearchOptions, check_search_options
from genrec_fast.eval import catalog_trie, evaluate, evaluate_split
from genrec_fast.eval.hybrid import check_weight
from genrec_fast.io import atomic_write_text
from genrec_fast.model import add_key_dropout, add_train_dropout, lm_modules
from genrec_fast.prompts import DEFAULT_TASKS, build_examples, check_prompt_style, check_tasks, tokenizer_corpus
from genrec_fast.train.curves import plot_panels
from genrec_fast.train.runtime import (
    ALIASES,
    StageConfig,
    StageTrainer,
    check_finite,
    cli_logging,
    is_main_process,
    load_model_dir,
    opt,
    run_lock,
    tracker_kwargs,
)

try:  # torch's list of the devices with a fused AdamW kernel (a private helper)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover - torch without the helper: CUDA has the kernel everywhere
    _get_fused_kernels_supported_devices = None

PACK_WINDOW = 8  # open rows a packed example may go to
# what an SFT run writes in output_dir (its result marker first): a fresh start removes an earlier run's
SFT_OUTPUTS = ("sft_result.json", "model", "test_metrics.json", "curves.png", "sft_config.json")


@dataclass
class SFTConfig(StageConfig, SearchOptions):
    data: Optional[str] = opt(None, "MiniOneRec-format directory (train/valid/test.csv, index.json, ...); "
                                    "or pass data= to train_sft")
    model: str = opt("tiny", "'tiny' (a small Qwen2 from scratch) or an HF causal LM name/path")
    output_dir: str = opt("runs/sft", "output directory: model/, checkpoints/, train_log.jsonl, curves.png, "
                                      "sft_result.json")
    max_steps: Optional[int] = opt(None, "optimizer steps (>= 1); overrides epochs")
    tasks: Tuple[str, ...] = opt(DEFAULT_TASKS, "SFT tasks to enable (genrec_fast.prompts)")
    prompt_style: str = opt("minionerec", "'minionerec' (the MiniOneRec template), 'compact' (the history SIDs "
                                          "alone) or 'short' (the template without its instruction line); saved "
                                          "with the model")
    sequence_loss: bool = opt(False, "compact only: loss on every history item of sid_seq too")
    whole_sequences: bool = opt(False, "with sequence_loss: one sid_seq example per user sequence, not per window")
    sequence_window: int = opt(0, "with whole_sequences: cut each user sequence into windows of at most this many "
                                  "items (as SASRec trains; each transition still once); 0: whole sequences")
    history_suffixes: Tuple[int, ...] = opt((), "extra sid_seq examples: each training sample with its history cut "
                                                "to its last K items, for each K given (genrec_fast.data."
                                                "history_suffixes; 1: every last-item -> target pair alone too; "
                                                "with whole_sequences, each copy is an example of its own; 0: none)")
    epochs: float = opt(3.0, "epochs (> 0), counted in micro-batches / grad_accum")
    warmup_ratio: float = opt(0.03, "share of the steps with a linear warm-up, in [0, 1) (then cosine decay)")
    batch_tokens: int = opt(8192, "tokens per micro-batch (packed) / padded-token budget (bucketed)")
    pack_length: int = opt(512, "tokens per packed row")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    max_length: int = opt(512, "tokens per example (the prompt is cut from the left)")
    packing: bool = opt(True, "pack examples into rows (else length-bucketed padded batches)")
    compile: bool = opt(False, "torch.compile the base forward; batches padded to [batch_tokens // pack_length, "
                               "pack_length]")
    eval_every: int = opt(0, "optimizer steps between valid evals; 0: once per epoch; < 0: never")
    eval_epochs: float = opt(0.0, "> 0: epochs between valid evals instead (with eval_every >= 0)")
    eval_samples: int = opt(256, "valid samples in the fixed early-stopping subset")
    eval_beams: int = opt(20, "beams of the valid evals (>= 10: early stopping ranks by NDCG@10)")
    eval_batch_size: int = opt(32, "prompts per valid beam search")
    patience: int = opt(3, "evals without a better valid NDCG@10 before stopping")
    train_on_valid: bool = opt(False, "also train on the valid samples outside the early-stopping subset")
    save_every: int = opt(0, "optimizer steps between checkpoints; 0: at every eval")
    lora_alpha: int = opt(32, "LoRA alpha")
    dropout: float = opt(0.0, "train-time dropout in [0, 1) on the token embeddings and every attention / MLP output "
                              "(model.add_train_dropout; not saved with the model)")
    key_dropout: float = opt(0.0, "train-time DropKey in [0, 1): each attention key masked out before the softmax, "
                                  "per head and query (model.add_key_dropout; sdpa keeps its fused kernel)")
    model_overrides: Dict[str, int] = opt(help="tiny-preset config fields, e.g. {\"hidden_size\": 256}", factory=dict)
    tokenizer_vocab_size: int = opt(3000, "BPE vocabulary of the tiny preset's tokenizer")
    test: bool = opt(False, "after training, evaluate the selected model on the test split (+ baselines)")
    test_beams: int = opt(50, "beams of the test evaluation")
    test_batch_size: int = opt(32, "prompts per test beam search")
    test_hybrid_weight: Optional[float] = opt(None, "the test table also shows the hybrid row (the model's beams "
                                                    "re-ranked with last-item transition counts at this weight, "
                                                    "chosen on valid: genrec_fast.eval.hybrid); none: no such row")

    def __post_init__(self):
        super().__post_init__()
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise ValueError(f"SFTConfig: mixed_precision must be 'auto' (bf16 autocast on CUDA only), 'bf16' or 'no', "
                             f"got {self.mixed_precision!r}")
        self.tasks = tuple(check_tasks(self.tasks))
        check_prompt_style(self.prompt_style)
        check_search_options("SFTConfig", self)
        self._check_steps()
        if self.sequence_loss and self.prompt_style != "compact":
            raise ValueError("sequence_loss needs prompt_style='compact'")
        if self.whole_sequences and not self.sequence_loss:
            raise ValueError("whole_sequences needs sequence_loss")
        if tuple(int(k) for k in self.history_suffixes) == (0,):  # the command line's way to say none
            self.history_suffixes = ()
        self.history_suffixes = check_suffix_lengths(self.history_suffixes, "SFTConfig: history_suffixes")
        if self.history_suffixes and "sid_seq" not in self.tasks:
            raise ValueError("SFTConfig: history_suffixes adds sid_seq examples; enable the sid_seq task")
        if self.sequence_window and (not self.whole_sequences or self.sequence_window < 2):
            raise ValueError(f"sequence_window={self.sequence_window} needs whole_sequences and >= 2 items per window")
        if self.pack_length > self.batch_tokens:
            raise ValueError(f"pack_length {self.pack_length} exceeds batch_tokens {self.batch_tokens}")
        if self.max_length > self.pack_length and self.packing:
            raise ValueError(f"max_length {self.max_length} exceeds pack_length {self.pack_length}")
        for name in ("dropout", "key_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"SFTConfig: {name} must be in [0, 1), got {getattr(self, name)}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 (evals without a better valid NDCG@10 before stopping), "
                             f"got {self.patience}")
        if self.eval_every >= 0 and self.eval_beams < 10:
            raise ValueError(f"eval_beams {self.eval_beams} < 10: early stopping ranks by valid NDCG@10, which needs "
                             f">= 10 beams (or set eval_every < 0 for no valid evals)")
        if self.test_hybrid_weight is not None:
            check_weight(self.test_hybrid_weight, "SFTConfig: test_hybrid_weight")
        if self.compile and not self.packing:
            raise ValueError("compile needs packing=True: only packed batches have one fixed shape "
                             "([batch_tokens // pack_length, pack_length])")

    def _check_steps(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"SFTConfig: max_steps must be >= 1 (optimizer steps; None: from epochs), "
                             f"got {self.max_steps}")
        if not (isinstance(self.epochs, (int, float)) and math.isfinite(self.epochs) and self.epochs > 0):
            raise ValueError(f"SFTConfig: epochs must be a finite number > 0, got {self.epochs!r}")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"SFTConfig: warmup_ratio must be in [0, 1) (the share of the steps that warm up), "
                             f"got {self.warmup_ratio!r}")
        for name in ("grad_accum", "batch_tokens", "pack_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig: {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SFTResult:
    model: object
    tokenizer: object
    sid_vocab: object
    output_dir: Path
    model_dir: Path  # the selected model (best on valid NDCG@10, else the last), HF save_pretrained
    curves_png: Path
    history: dict
    test_metrics: Optional[dict] = None


# ---- tokenization and batching -------------------------------------------------------------------

def tokenize_examples(tokenizer, examples, max_length: int) -> List[Tuple[List[int], int]]:
    """(ids, n_prompt) per example: prompt + response + eos, the prompt cut from the left to fit (a response
    that does not fit with one prompt token is an error naming the example)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token")
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (a prompt token and the eos), got {max_length}")
    out = []
    for i, (e, p, r) in enumerate(zip(examples, prompts, responses)):
        r = r + [eos]
        if len(r) > max_length - 1:  # the response is never cut: a cut response teaches a wrong target
            raise ValueError(f"example {i} (task {e.task!r}): its response is {len(r) - 1} tokens + eos, which leaves "
                             f"no room for a prompt token within max_length {max_length}; raise max_length")
        p = p[len(p) - (max_length - len(r)):] if len(p) + len(r) > max_length else p
        out.append((p + r, len(p)))
    return out


def epoch_batches(lengths: Sequence[int], epoch: int, seed: int, batch_tokens: int, pack_length: int,
                  packing: bool) -> List[List[List[int]]]:
    """The micro-batches of one epoch: lists of rows, a row a list of example indices.

    A deterministic function of (lengths, epoch, seed): a resumed run rebuilds the same batches.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    if packing:
        # first fit over the PACK_WINDOW most recent open rows: little padding, order stays shuffled
        rows: List[List[int]] = []
        open_rows: List[list] = []  # [tokens used, example indices]
        for i in order:
            n = int(lengths[i])
            for r in open_rows:
                if r[0] + n <= pack_length:
                    r[0] += n
                    r[1].append(int(i))
                    break
            else:
                if len(open_rows) >= PACK_WINDOW:
                    rows.append(open_rows.pop(0)[1])
                open_rows.append([n, [int(i)]])
        rows += [r[1] for r in open_rows]
        per = max(1, batch_tokens // pack_length)
        return [rows[s:s + per] for s in range(0, len(rows), per)]
    # length bucketing: sort within windows of ~50 batches, cut by padded size, shuffle the batches
    batches, window = [], max(1, 50 * batch_tokens // max(1, int(np.mean(lengths))))
    for s in range(0, len(order), window):
        chunk = sorted(order[s:s + window].tolist(), key=lambda i: lengths[i])
        cur: List[int] = []
        for i in chunk:
            if cur and lengths[i] * (len(cur) + 1) > batch_tokens:
                batches.append([[j] for j in cur])
                cur = []
            cur.append(i)
        if cur:
            batches.append([[j] for j in cur])
    perm = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in perm]


def collate(tokenized, batch: List[List[int]], pad_id: int, packed: bool,
            pad_to: Optional[Tuple[int, int]] = None) -> Dict[str, torch.Tensor]:
    """Tensors for one micro-batch.

    ``keep`` [R, T] marks positions whose NEXT token is a response token; ``targets`` are those
    tokens in row-major order and ``keep_index`` their flat indices into [R * T] (made here, so the
    device never has to count a boolean mask). Packed: position ids restart per example, no attention mask.
    Padded: one example per row, right padding, an attention mask. ``pad_to=(rows, width)``: the
    tensors get exactly that shape (padding rows and positions predict nothing), so every batch of
    a run has one shape (``SFTConfig.compile``).
    """
    lens = [[len(tokenized[i][0]) for i in row] for row in batch]
    R, width = len(batch), max(sum(n) for n in lens)
    if pad_to is not None:
        if not packed:
            raise ValueError("collate: pad_to needs packed=True (padded rows of an unpacked batch carry an "
                             "attention mask)")
        if R > pad_to[0] or width > pad_to[1]:
            raise ValueError(f"collate: a batch of {R} rows x {width} tokens does not fit pad_to={tuple(pad_to)}")
        R, width = pad_to
    ramp = np.arange(width, dtype=np.int64)
    input_ids = np.full((R, width), pad_id, dtype=np.int64)
    position_ids = np.tile(ramp, (R, 1))  # padding rows: one segment each
    keep = np.zeros((R, width), dtype=bool)
    attn = np.zeros((R, width), dtype=np.int64)
    for r, row in enumerate(batch):
        o = 0
        for i, n in zip(row, lens[r]):
            seq, n_prompt = tokenized[i]
            input_ids[r, o:o + n] = seq
            position_ids[r, o:o + n] = ramp[:n]
            keep[r, o + max(n_prompt - 1, 0):o + n - 1] = True
            o += n
        # a packed row's padded tail is one more segment (positions from 0) that nothing attends into
        position_ids[r, o:] = ramp[:width - o]
        attn[r, :o] = 1
    nxt = np.roll(input_ids, -1, axis=1)
    flat = np.flatnonzero(keep)
    out = {"input_ids": torch.from_numpy(input_ids), "position_ids": torch.from_numpy(position_ids),
           "keep": torch.from_numpy(keep), "targets": torch.from_numpy(nxt.reshape(-1)[flat]),
           "keep_index": torch.from_numpy(flat), "num_tokens": int(attn.sum())}
    if not packed:
        out["attention_mask"] = torch.from_numpy(attn)
    return out


def response_loss(model, batch: Dict[str, torch.Tensor], hidden_fn=None) -> torch.Tensor:
    """Mean fp32 cross-entropy over the response tokens; logits only where a response token is predicted.

    The base transformer runs on the batch as it is ([R, T] rows; packed rows keep their
    per-example position ids, so transformers keeps the examples apart), the last hidden states at
    the kept positions are gathered (``keep_index`` of :func:`collate`, flat indices into [R * T]), and the
    LM head module (``model.lm_modules``: plain or PEFT-wrapped) is applied to those rows only. No
    ``logits_to_keep``: the same on every transformers release. ``hidden_fn(base, input_ids,
    position_ids, attention_mask)`` replaces the base forward.
    """
    try:
        base, head = lm_modules(model)
    except ValueError as e:
        raise ValueError(f"response_loss: {e}") from e
    hidden = (hidden_fn or _last_hidden)(base, batch["input_ids"], batch["position_ids"], batch.get("attention_mask"))
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["keep_index"])
    logits = head(rows)
    return torch.nn.functional.cross_entropy(logits.float(), batch["targets"])


class ResponseLoss(torch.nn.Module):
    """:func:`response_loss` of an LM as one module: ``forward(batch) -> loss``.

    This is what ``accelerate.prepare`` wraps (DDP, DeepSpeed): the loss calls the LM's base
    transformer and head directly, so a wrapper around the LM itself would never see the forward
    (no gradient sync). ``self.model`` is the LM (checkpoints, evaluation, saving).

    ``compile=True``: the base transformer's forward (and so its backward) goes through
    ``torch.compile(dynamic=False, mode=compile_mode)``; feed it batches of one shape
    (``collate(..., pad_to=(rows, pack_length))``) or it compiles again for every new shape. The
    gather, LM head and cross-entropy stay eager (the number of response positions varies).
    ``compile_mode="reduce-overhead"`` adds CUDA graphs on a GPU. The LM itself is not changed:
    evaluation and saving use the eager model.
    """

    def __init__(self, model, compile: bool = False, compile_mode: Optional[str] = None):
        super().__init__()
        self.model = model
        self._hidden = torch.compile(_last_hidden, dynamic=False, mode=compile_mode) if compile else None

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return response_loss(self.model, batch, self._hidden)


def _last_hidden(base, input_ids, position_ids, attention_mask=None) -> torch.Tensor:
    """The base transformer's last hidden states [R, T, H] (no cache; a packed batch has no mask).

    Under flash attention a packed batch runs as ONE row of R * T tokens: transformers finds the
    examples (varlen) from the restarting position ids only when the batch has one row; with several
    rows it would run plain causal attention across each row's examples."""
    impl = getattr(base.config, "_attn_implementation", None)
    flash = isinstance(impl, str) and impl.startswith("flash_attention")
    if attention_mask is None and input_ids.shape[0] > 1 and flash:
        rows, width = input_ids.shape
        hidden = base(input_ids=input_ids.reshape(1, rows * width), position_ids=position_ids.reshape(1, rows * width),
                      use_cache=False).last_hidden_state
        return hidden.reshape(rows, width, hidden.shape[-1])
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    return base(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kw).last_hidden_state


def adamw(params, **kw) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with its fused kernel (the whole update in one op per device and dtype)
    when every parameter is a floating tensor on a device torch has one for (CUDA, and CPU from
    torch 2.4), else torch's default (foreach on CUDA). The same update rule either way."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    devices = set(_get_fused_kernels_supported_devices()) if _get_fused_kernels_supported_devices else {"cuda"}
    fused = bool(tensors) and all(p.device.type in devices and torch.is_floating_point(p) for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kw)


# ---- checkpoints ---------------------------------------------------------------------------------

# SFTConfig fields a resumed run may change: where and how it runs, not what it trains on or how
_RESUMABLE_CHANGES = ("data", "output_dir", "out", "compile", "cuda_graphs", *SEARCH_OPTIONS, "eval_batch_size",
                      "save_every",
                      "keep_checkpoints", "resume", "log_every", "test", "test_beams", "test_batch_size",
                      "test_hybrid_weight", "progress", "report_to")


def _run_key(cfg: "SFTConfig", lengths: Sequence[int]) -> dict:
    """What a checkpoint must share with the run that resumes it: the config fields that shape the
    training (the data path may move) and a fingerprint of the tokenized examples (so other data, tasks
    or tokenizer show up even under the same path)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}
    key["tasks"] = list(key["tasks"])
    key["examples"] = [len(lengths), int(sum(lengths)), zlib.crc32(np.asarray(lengths, dtype=np.int64).tobytes())]
    return key


def plot_curves(history: dict, path: Path, title: str = "SFT") -> Path:
    """PNG of the training loss and the valid metrics over optimizer steps (``genrec_fast.train.curves``): one
    5 x 4 inch panel per kind that has data (a run without valid evals gets the loss panel only)."""
    valid = {f"valid {name}": [(s, m[name]) for s, m in history["valid"] if name in m]
             for name in ("NDCG@10", "HR@10")}
    return plot_panels([("loss", {"train loss (response tokens)": list(history["loss"])}), ("valid metrics", valid)],
                       path, title)


# ---- the loop ------------------------------------------------------------------------------------

def _load_data(cfg: SFTConfig):
    if cfg.data is None:
        raise ValueError("no data: set SFTConfig.data (a MiniOneRec-format directory) or pass data=")
    return load_minionerec(cfg.data)


def train_sft(config: Optional[SFTConfig] = None, data=None, **overrides) -> SFTResult:
    """Train (or resume) an SFT run; returns the selected model, its tokenizer/SIDVocab and the output paths.

    ``data`` is a :class:`genrec_fast.data.RecData` with SIDs (default: read ``config.data``).
    Keyword ``overrides`` replace config fields. One run at a time per ``output_dir`` (its lock).
    """
    given = {k: v for k, v in asdict(config).items() if k not in ALIASES} if config else {}
    cfg = SFTConfig(**{**given, **overrides})
    data = data if data is not None else _load_data(cfg)
    if data.catalog.codes is None:
        raise ValueError("SFT needs SIDs: the catalogue has none (build them with `genrec-fast sids`)")
    with run_lock(Path(cfg.output_dir), enabled=is_main_process()):
        return SFTTrainer(cfg, data).run()


class SFTTrainer(StageTrainer):
    """One SFT run: set-up (model, examples, step plan, optimizer) in ``__init__``, then :meth:`run`."""

    stage = "sft"
    outputs = SFT_OUTPUTS

    def __init__(self, cfg: SFTConfig, data):
        use_cuda = torch.cuda.is_available()
        self.bf16 = use_cuda if cfg.mixed_precision == "auto" else cfg.mixed_precision == "bf16"
        acc = Accelerator(mixed_precision="bf16" if self.bf16 else "no", gradient_accumulation_steps=cfg.grad_accum,
                          cpu=not use_cuda, **tracker_kwargs(cfg.report_to, cfg.output_dir))
        super().__init__(cfg, Path(cfg.output_dir), acc)
        if cfg.cuda_graphs and acc.device.type != "cuda":
            raise ValueError(f"sft: cuda_graphs needs a CUDA device for the evaluation's beam search, training runs "
                             f"on {acc.device}")
        self.data = data
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self._load_model()
        self._build_examples()
        self._plan_steps()
        self._make_optimizer()
        self.trie = catalog_trie(data.catalog)
        self.state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
                      "stopped_early": False, "tokens": 0, "train_seconds": 0.0, "history": {"loss": [], "valid": []},
                      "window": [0.0, 0, 0]}  # loss sum, micro-batches and tokens since the last log line

    def _load_model(self) -> None:
        cfg, catalog = self.cfg, self.data.catalog
        self.lm, self.tokenizer, self.sid_vocab = load_model_dir(
            cfg.model, catalog.codebook_sizes, corpus=tokenizer_corpus(catalog),
            tokenizer_vocab_size=cfg.tokenizer_vocab_size, model_overrides=cfg.model_overrides or None,
            lora=cfg.lora_r > 0, lora_r=max(cfg.lora_r, 1), lora_alpha=cfg.lora_alpha, device=self.acc.device,
            seed=cfg.seed)
        # saved with the model: evaluation, S-DPO and RL prompt it in this style (prompts.model_prompt_style)
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        base.config.prompt_style = cfg.prompt_style
        add_train_dropout(self.lm, cfg.dropout)
        add_key_dropout(self.lm, cfg.key_dropout)
        if cfg.cuda_graphs:  # before training, not at the first valid eval
            graphs.check_supported(lm_modules(self.lm)[0])

    def _build_examples(self) -> None:
        """The fixed valid subset (early stopping) and the tokenized training examples."""
        cfg, data = self.cfg, self.data
        valid_pick = np.arange(len(data.valid))
        if len(data.valid) > cfg.eval_samples:
            valid_pick = np.sort(np.random.default_rng(cfg.seed).choice(len(data.valid), cfg.eval_samples,
                                                                        replace=False))
        self.valid = [data.valid[i] for i in valid_pick] if cfg.eval_every >= 0 else []
        train_samples = list(data.train)
        if cfg.train_on_valid:
            held_out = set(valid_pick.tolist()) if self.valid else set()
            train_samples += [s for i, s in enumerate(data.valid) if i not in held_out]
        self.examples = build_examples(data, cfg.tasks, samples=train_samples, style=cfg.prompt_style,
                                       sequence_loss=cfg.sequence_loss, whole_sequences=cfg.whole_sequences,
                                       sequence_window=cfg.sequence_window)
        suffixes = history_suffixes(train_samples, cfg.history_suffixes)
        if suffixes:  # never chained into the user sequences: examples of their own
            self.examples += build_examples(data, ("sid_seq",), samples=suffixes, style=cfg.prompt_style,
                                            sequence_loss=cfg.sequence_loss)
        if not self.examples:
            raise ValueError(f"sft: no training examples: {len(train_samples)} training samples and tasks "
                             f"{list(cfg.tasks)}")
        self.tokenized = tokenize_examples(self.tokenizer, self.examples, cfg.max_length)
        self.lengths = [len(t[0]) for t in self.tokenized]

    def batches_of(self, epoch: int) -> List[List[List[int]]]:
        """This process's micro-batches of ``epoch`` (every process gets the same number)."""
        cfg, world = self.cfg, self.acc.num_processes
        b = epoch_batches(self.lengths, epoch, cfg.seed, cfg.batch_tokens, cfg.pack_length, cfg.packing)
        n = len(b) // world * world
        return b[self.acc.process_index:n:world]

    def _plan_steps(self) -> None:
        """Optimizer steps in all, and between valid evals and checkpoints."""
        cfg, world = self.cfg, self.acc.num_processes
        n_epoch0 = len(epoch_batches(self.lengths, 0, cfg.seed, cfg.batch_tokens, cfg.pack_length, cfg.packing))
        micro_per_epoch, dropped = divmod(n_epoch0, world)  # = len(batches_of(0)), and what it leaves out
        if micro_per_epoch == 0:
            raise ValueError(f"sft: {len(self.tokenized)} training examples make {n_epoch0} micro-batch(es) of <= "
                             f"{cfg.batch_tokens} tokens, fewer than the {world} process(es): every process needs "
                             "at least one")
        if dropped:
            self.info("sft: %d micro-batch(es) of each epoch left out so that the %d processes get the same number "
                      "(a different one each epoch: the order is reshuffled)", dropped, world)
        steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
        # accumulation runs on across epoch ends (a partial group is finished with the next epoch's first
        # micro-batches), so `epochs` is counted in micro-batches (epoch 0's count; packing varies it by a few)
        self.total_steps = cfg.max_steps if cfg.max_steps is not None else max(
            1, int(math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum)))
        self.eval_every = steps_per_epoch if cfg.eval_every == 0 else cfg.eval_every
        if cfg.eval_epochs > 0 and cfg.eval_every >= 0:
            self.eval_every = max(1, int(round(cfg.eval_epochs * steps_per_epoch)))
        self.save_every = cfg.save_every or (self.eval_every if self.eval_every > 0 else steps_per_epoch)
        if self.eval_every > 0 and not self.valid:
            raise ValueError("early stopping needs a non-empty valid split (or set eval_every < 0)")

    def _make_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.lm.parameters() if p.requires_grad]
        optimizer = adamw([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                           {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                          lr=cfg.lr, betas=(0.9, 0.95))
        self.scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(cfg.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # self.model: the loss module accelerate wraps (DDP / DeepSpeed); self.lm: the LM inside it
        self.model, self.optimizer = self.acc.prepare(ResponseLoss(self.lm, compile=cfg.compile), optimizer)
        self.pad_to = (max(1, cfg.batch_tokens // cfg.pack_length), cfg.pack_length) if cfg.compile else None

    # ---- the run ---------------------------------------------------------------------------------

    def run(self) -> SFTResult:
        blob = self.resume_or_start(_run_key(self.cfg, self.lengths))
        if blob is not None:
            self.lm.load_state_dict(blob["model"])
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            self.state = {"window": [0.0, 0, 0], **blob["trainer"]}
            self.info("sft: resumed from step %d (%s)", self.state["step"], self.out / "checkpoints")
        if self.is_main:  # the config of the latest (re)start
            atomic_write_text(self.out / "sft_config.json", json.dumps(asdict(self.cfg), indent=2))
        try:
            self._train()
            return self._finish()
        finally:
            self.finish_trackers()

    def _train(self) -> None:
        state = self.state
        bar = self.progress_bar(self.total_steps, initial=state["step"])
        self.model.train()
        self._t_start = self._t_log = time.perf_counter()
        done = state["step"] >= self.total_steps or state["stopped_early"]
        while not done:
            batches = self.batches_of(state["epoch"])
            while state["batch"] < len(batches) and not done:
                if self._micro_step(batches[state["batch"]]):
                    bar.update(1)
                    done = self._after_step(bar)
            if not done:
                state["epoch"] += 1
                state["batch"] = 0
        bar.close()

    def _micro_step(self, rows) -> bool:
        """Forward and backward of one micro-batch (an optimizer step at the end of each accumulation group);
        True when an optimizer step was taken."""
        acc, model, window = self.acc, self.model, self.state["window"]
        batch = collate(self.tokenized, rows, self.tokenizer.pad_token_id, self.cfg.packing, self.pad_to)
        batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with acc.accumulate(model):
            loss = model(batch)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state["batch"] += 1
        window[0] += loss.detach().double()  # read at log time: no device sync per micro-batch
        window[1] += 1
        window[2] += batch["num_tokens"]
        if not acc.sync_gradients:
            return False
        self.scheduler.step()
        self.state["step"] += 1
        return True

    def _after_step(self, bar) -> bool:
        """Log, evaluate and checkpoint after an optimizer step as due; True when the run is done."""
        state = self.state
        if state["step"] % self.cfg.log_every == 0 or state["step"] == self.total_steps:
            self._log_window(bar)
        stop = False
        if self.eval_every > 0 and state["step"] % self.eval_every == 0:
            stop = self._evaluate()
            state["stopped_early"] = stop
        done = stop or state["step"] >= self.total_steps
        if done or state["step"] % self.save_every == 0:
            now = time.perf_counter()
            state["train_seconds"] += now - self._t_start
            self._t_start = now
            self._save_checkpoint()
        return done

    def _check_loss(self) -> None:
        """Every training loss so far is finite (checked before anything is evaluated, logged or saved)."""
        total, n, _ = self.state["window"]
        if n:
            check_finite("sft: the training loss", float(total) / n,
                         f"at optimizer step {self.state['step']} (lr {self.cfg.lr})")

    def _log_window(self, bar) -> None:
        self._check_loss()
        state, world = self.state, self.acc.num_processes
        total, n, tokens = state["window"]
        now = time.perf_counter()
        rec = {"step": state["step"], "epoch": state["epoch"], "loss": float(total) / n,
               "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens * world / (now - self._t_log)}
        state["history"]["loss"].append((state["step"], rec["loss"]))
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        self.log_metrics(rec)
        state["tokens"] += tokens * world
        state["window"], self._t_log = [0.0, 0, 0], now

    def _save_checkpoint(self) -> None:
        self._check_loss()
        state = {**self.state, "window": [float(self.state["window"][0]), *self.state["window"][1:]]}
        self.save_checkpoint(state["step"], {"model": self.lm.state_dict(), "optimizer": self.optimizer.state_dict(),
                                             "scheduler": self.scheduler.state_dict(), "trainer": state,
                                             "run_key": _run_key(self.cfg, self.lengths)})

    def _evaluate(self) -> bool:
        """Valid NDCG@10 on the fixed subset; saves the best model; True when patience ran out."""
        self._check_loss()
        cfg, state = self.cfg, self.state
        metrics = evaluate(self.lm, self.tokenizer, self.sid_vocab, self.trie, self.valid, self.data.catalog,
                           num_beams=cfg.eval_beams, batch_size=cfg.eval_batch_size, ks=(1, 5, 10),
                           cuda_graphs=cfg.cuda_graphs, search_options=cfg.search_kwargs())
        state["history"]["valid"].append((state["step"], {k: float(v) for k, v in metrics.items()}))
        score = metrics["NDCG@10"]
        if state["best"] is None or score > state["best"]:
            state.update(best=float(score), best_step=state["step"], bad_evals=0)
            self.save_model(self.lm, self.tokenizer, self.data.catalog)
        else:
            state["bad_evals"] += 1
        self.info("sft: step %d valid NDCG@10 %.4f HR@10 %.4f (best %.4f at step %s)", state["step"], score,
                  metrics["HR@10"], state["best"], state["best_step"])
        if self.is_main:
            plot_curves(state["history"], self.out / "curves.png")
        return state["bad_evals"] >= cfg.patience

    def _finish(self) -> SFTResult:
        """The last valid eval if due, the selected model reloaded (and tested), sft_result.json."""
        state, out = self.state, self.out
        valid = state["history"]["valid"]
        if self.eval_every > 0 and (not valid or valid[-1][0] != state["step"]) and not state["stopped_early"]:
            self._evaluate()
        if state["best"] is None:
            self.save_model(self.lm, self.tokenizer, self.data.catalog)
        self.acc.wait_for_everyone()
        if self.is_main:
            plot_curves(state["history"], out / "curves.png")
        best, tok, vocab = load_model_dir(str(out / "model"), device=self.acc.device,
                                          torch_dtype=torch.bfloat16 if self.bf16 else None)
        best.eval()
        result = {k: state[k] for k in ("step", "epoch", "best", "best_step", "stopped_early", "tokens",
                                        "train_seconds")}
        result.update(train_examples=len(self.examples), valid_subset=len(self.valid))
        test_metrics = self._test(best, tok, vocab, result) if self.cfg.test else None
        if self.is_main:
            atomic_write_text(out / "sft_result.json", json.dumps(result, indent=2))
        return SFTResult(model=best, tokenizer=tok, sid_vocab=vocab, output_dir=out, model_dir=out / "model",
                         curves_png=out / "curves.png", history=state["history"], test_metrics=test_metrics)

    def _test(self, model, tokenizer, vocab, result: dict) -> dict:
        t0 = time.perf_counter()
        metrics = evaluate_split(model, tokenizer, vocab, self.data, "test", num_beams=self.cfg.test_beams,
                                 batch_size=self.cfg.test_batch_size, trie=self.trie,
                                 out=str(self.out / "test_metrics.json"), cuda_graphs=self.cfg.cuda_graphs,
                                 search_options=self.cfg.search_kwargs(), hybrid_weight=self.cfg.test_hybrid_weight)
        result["test_seconds"] = time.perf_counter() - t0
        return metrics


# ---- CLI -----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    """One ``--option`` per SFTConfig field (``genrec_fast.config_cli``: types and defaults from the dataclass,
    help texts from the fields' ``metadata["help"]``); data, model, output_dir and tasks first."""
    add_dataclass_arguments(parser, SFTConfig, first=("data", "model", "output_dir", "tasks"))


def run(args) -> int:
    cfg = config_from_args(SFTConfig, args)
    cli_logging()
    res = train_sft(cfg)
    print(f"sft: model in {res.model_dir}, curves in {res.curves_png}")
    return 0
