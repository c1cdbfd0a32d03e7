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
* bf16 autocast on GPU; checkpoints hold model, optimizer, scheduler, RNG states and the data
  position (epoch + batch), so a resumed run continues exactly; tqdm progress; early stopping
  on valid NDCG@10 from ``genrec_fast.eval.evaluate`` (constrained beam search) on a fixed
  valid subset; a PNG of the loss and valid-metric curves (``curves.png``).

Python API: ``train_sft(SFTConfig(...), data=RecData)``; CLI: ``genrec-fast sft``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genrec_fast.io import atomic_dir, atomic_write_text, recover_dir
from genrec_fast.model import lm_modules
from genrec_fast.prompts import DEFAULT_TASKS, check_prompt_style, check_tasks

PACK_WINDOW = 8  # open rows a packed example may go to


@dataclass
class SFTConfig:
    data: Optional[str] = None  # a MiniOneRec-format directory (or pass data= to train_sft)
    model: str = "tiny"  # "tiny" or an HF name/path
    output_dir: str = "runs/sft"
    tasks: Tuple[str, ...] = DEFAULT_TASKS
    prompt_style: str = "minionerec"  # genrec_fast.prompts: "minionerec" (the MiniOneRec template) or "compact"
    sequence_loss: bool = False  # compact only: loss on every history item of sid_seq too (prompts.build_examples)
    whole_sequences: bool = False  # with sequence_loss: one sid_seq example per user sequence, not per window
    epochs: float = 3.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    batch_tokens: int = 8192  # tokens per micro-batch (packed) / padded-token budget (bucketed)
    pack_length: int = 512  # tokens per packed row
    grad_accum: int = 1
    max_length: int = 512  # tokens per example (prompt cut from the left)
    packing: bool = True
    compile: bool = False  # torch.compile the base forward; batches padded to [batch_tokens // pack_length, pack_length]
    cuda_graphs: bool = False  # valid/test beam searches replayed from CUDA graphs (decode.graphs; CUDA only)
    bf16: Optional[bool] = None  # None: bf16 autocast on CUDA only
    seed: int = 0
    eval_every: int = 0  # optimizer steps between valid evals; 0: once per epoch; <0: never
    eval_epochs: float = 0.0  # > 0: epochs between valid evals instead (eval_every >= 0), e.g. 5.0 for short epochs
    eval_samples: int = 256
    eval_beams: int = 20
    eval_batch_size: int = 32
    patience: int = 3  # evals without a better valid NDCG@10 before stopping
    train_on_valid: bool = False  # also train on the valid samples outside the early-stopping subset
    save_every: int = 0  # optimizer steps between checkpoints; 0: at every eval
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir if any
    log_every: int = 10
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    model_overrides: Dict[str, int] = field(default_factory=dict)
    tokenizer_vocab_size: int = 3000
    test: bool = False  # after training, evaluate the selected model on the test split (+ baselines)
    test_beams: int = 50
    test_batch_size: int = 32
    progress: bool = True

    def __post_init__(self):
        self.tasks = tuple(check_tasks(self.tasks))
        check_prompt_style(self.prompt_style)
        if self.sequence_loss and self.prompt_style != "compact":
            raise ValueError("sequence_loss needs prompt_style='compact'")
        if self.whole_sequences and not self.sequence_loss:
            raise ValueError("whole_sequences needs sequence_loss")
        if self.pack_length > self.batch_tokens:
            raise ValueError(f"pack_length {self.pack_length} exceeds batch_tokens {self.batch_tokens}")
        if self.max_length > self.pack_length and self.packing:
            raise ValueError(f"max_length {self.max_length} exceeds pack_length {self.pack_length}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1 (evals without a better valid NDCG@10 before stopping), "
                             f"got {self.patience}")
        if self.eval_every >= 0 and self.eval_beams < 10:
            raise ValueError(f"eval_beams {self.eval_beams} < 10: early stopping ranks by valid NDCG@10, which needs "
                             f">= 10 beams (or set eval_every < 0 for no valid evals)")
        if self.compile and not self.packing:
            raise ValueError("compile needs packing=True: only packed batches have one fixed shape "
                             "([batch_tokens // pack_length, pack_length])")


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
            raise ValueError("collate: pad_to needs packed=True (padded rows of an unpacked batch carry an attention mask)")
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
    if attention_mask is None and input_ids.shape[0] > 1 and isinstance(impl, str) and impl.startswith("flash_attention"):
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
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - torch without the helper: CUDA has the kernel everywhere
        devices = {"cuda"}
    fused = bool(tensors) and all(p.device.type in devices and torch.is_floating_point(p) for p in tensors)
    return torch.optim.AdamW(groups, fused=fused or None, **kw)


# ---- checkpoints ---------------------------------------------------------------------------------

# SFTConfig fields a resumed run may change: where and how it runs, not what it trains on or how
_RESUMABLE_CHANGES = ("data", "output_dir", "compile", "cuda_graphs", "eval_batch_size", "save_every",
                      "keep_checkpoints", "resume", "log_every", "test", "test_beams", "test_batch_size", "progress")


def _run_key(cfg: "SFTConfig", lengths: Sequence[int]) -> dict:
    """What a checkpoint must share with the run that resumes it: the config fields that shape the
    training (the data path may move) and a fingerprint of the tokenized examples (so other data, tasks
    or tokenizer show up even under the same path)."""
    key = {k: v for k, v in asdict(cfg).items() if k not in _RESUMABLE_CHANGES}
    key["tasks"] = list(key["tasks"])
    key["examples"] = [len(lengths), int(sum(lengths)), zlib.crc32(np.asarray(lengths, dtype=np.int64).tobytes())]
    return key


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _checkpoints(out: Path) -> List[Path]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.pt").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def _save_pretrained(model, tokenizer, path: Path) -> None:
    """Save a plain HF model + tokenizer (a LoRA model is merged into a copy first)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()

    def write(tmp: Path):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_dir(path, write)


def plot_curves(history: dict, path: Path, title: str = "SFT") -> Path:
    """PNG of the training loss and the valid metrics over optimizer steps (matplotlib Agg, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if history["loss"]:
        steps, losses = zip(*history["loss"])
        ax1.plot(steps, losses, lw=1)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss (response tokens)")
    ax1.set_title(f"{title}: loss")
    for name in ("NDCG@10", "HR@10"):
        pts = [(s, m[name]) for s, m in history["valid"] if name in m]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=f"valid {name}")
    ax2.set_xlabel("optimizer step")
    ax2.set_title(f"{title}: valid metrics")
    if history["valid"]:
        ax2.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ---- the loop ------------------------------------------------------------------------------------

def _load_data(cfg: SFTConfig):
    from genrec_fast.data import load_minionerec

    if cfg.data is None:
        raise ValueError("no data: set SFTConfig.data (a MiniOneRec-format directory) or pass data=")
    return load_minionerec(cfg.data)


def train_sft(config: Optional[SFTConfig] = None, data=None, **overrides) -> SFTResult:
    """Train (or resume) an SFT run; returns the selected model, its tokenizer/SIDVocab and the output paths.

    ``data`` is a :class:`genrec_fast.data.RecData` with SIDs (default: read ``config.data``).
    Keyword ``overrides`` replace config fields.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from genrec_fast.eval import catalog_trie, evaluate
    from genrec_fast.model import load_model_and_tokenizer
    from genrec_fast.prompts import build_examples, tokenizer_corpus

    cfg = SFTConfig(**{**(asdict(config) if config else {}), **overrides})
    data = data if data is not None else _load_data(cfg)
    if data.catalog.codes is None:
        raise ValueError("SFT needs SIDs: the catalogue has none (build them with `genrec-fast sids`)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    use_cuda = torch.cuda.is_available()
    bf16 = use_cuda if cfg.bf16 is None else bool(cfg.bf16)
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no", gradient_accumulation_steps=cfg.grad_accum,
                      cpu=not use_cuda)
    if cfg.cuda_graphs and acc.device.type != "cuda":
        raise ValueError(f"sft: cuda_graphs needs a CUDA device for the evaluation's beam search, training runs on {acc.device}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    model, tokenizer, sid_vocab = load_model_and_tokenizer(
        cfg.model, data.catalog.codebook_sizes, corpus=tokenizer_corpus(data.catalog),
        tokenizer_vocab_size=cfg.tokenizer_vocab_size, model_overrides=cfg.model_overrides or None,
        lora=cfg.lora, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, device=acc.device, seed=cfg.seed)
    # saved with the model: evaluation, S-DPO and RL prompt it in this style (prompts.model_prompt_style)
    (model.get_base_model() if hasattr(model, "get_base_model") else model).config.prompt_style = cfg.prompt_style
    if cfg.cuda_graphs:  # before training, not at the first valid eval
        from genrec_fast.decode import graphs

        graphs.check_supported(lm_modules(model)[0])
    valid_pick = np.arange(len(data.valid))
    if len(data.valid) > cfg.eval_samples:
        valid_pick = np.sort(np.random.default_rng(cfg.seed).choice(len(data.valid), cfg.eval_samples, replace=False))
    valid = [data.valid[i] for i in valid_pick] if cfg.eval_every >= 0 else []
    train_samples = list(data.train)
    if cfg.train_on_valid:
        held_out = set(valid_pick.tolist()) if valid else set()
        train_samples += [s for i, s in enumerate(data.valid) if i not in held_out]
    examples = build_examples(data, cfg.tasks, samples=train_samples, style=cfg.prompt_style,
                              sequence_loss=cfg.sequence_loss, whole_sequences=cfg.whole_sequences)
    if not examples:
        raise ValueError(f"sft: no training examples: {len(train_samples)} training samples and tasks {list(cfg.tasks)}")
    tokenized = tokenize_examples(tokenizer, examples, cfg.max_length)
    lengths = [len(t[0]) for t in tokenized]
    world, rank = acc.num_processes, acc.process_index

    def batches_of(epoch: int):
        b = epoch_batches(lengths, epoch, cfg.seed, cfg.batch_tokens, cfg.pack_length, cfg.packing)
        n = len(b) // world * world  # every process gets the same number of micro-batches
        return b[rank:n:world]

    n_epoch0 = len(epoch_batches(lengths, 0, cfg.seed, cfg.batch_tokens, cfg.pack_length, cfg.packing))
    micro_per_epoch, dropped = divmod(n_epoch0, world)  # = len(batches_of(0)), and what it leaves out
    if micro_per_epoch == 0:
        raise ValueError(f"sft: {len(tokenized)} training examples make {n_epoch0} micro-batch(es) of <= "
                         f"{cfg.batch_tokens} tokens, fewer than the {world} process(es): every process needs at least one")
    if dropped:
        acc.print(f"sft: {dropped} micro-batch(es) of each epoch left out so that the {world} processes get the same "
                  "number (a different one each epoch: the order is reshuffled)")
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    # accumulation runs on across epoch ends (a partial group is finished with the next epoch's first
    # micro-batches), so `epochs` is counted in micro-batches (epoch 0's count; packing varies it by a few)
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(
        1, int(math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum)))
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = adamw([{"params": decay, "weight_decay": cfg.weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    lm = model
    model, optimizer = acc.prepare(ResponseLoss(lm, compile=cfg.compile), optimizer)  # model: the wrapped loss module
    pad_to = (max(1, cfg.batch_tokens // cfg.pack_length), cfg.pack_length) if cfg.compile else None

    eval_every = steps_per_epoch if cfg.eval_every == 0 else cfg.eval_every
    if cfg.eval_epochs > 0 and cfg.eval_every >= 0:
        eval_every = max(1, int(round(cfg.eval_epochs * steps_per_epoch)))
    save_every = cfg.save_every or (eval_every if eval_every > 0 else steps_per_epoch)
    if eval_every > 0 and not valid:
        raise ValueError("early stopping needs a non-empty valid split (or set eval_every < 0)")
    trie = catalog_trie(data.catalog)

    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False, "tokens": 0, "train_seconds": 0.0,
             "history": {"loss": [], "valid": []}}
    if acc.is_main_process:
        recover_dir(out / "model")  # what a crash inside its folder swap can leave behind
        if not (cfg.resume and _checkpoints(out)):  # a fresh start: nothing of an earlier run may be resumed later
            (out / "train_log.jsonl").unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    acc.wait_for_everyone()
    ckpts = _checkpoints(out) if cfg.resume else []
    run_key = _run_key(cfg, lengths)
    if ckpts:
        blob = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        saved = blob.get("run_key")
        if saved is not None and saved != run_key:
            diff = "; ".join(f"{k} {saved.get(k)!r} then, {run_key.get(k)!r} now"
                             for k in sorted(set(saved) | set(run_key)) if saved.get(k) != run_key.get(k))
            raise ValueError(f"sft: {ckpts[-1]} was made with other settings ({diff}): resuming would mix two "
                             "runs; use --no-resume (a fresh start) or another --output-dir")
        lm.load_state_dict(blob["model"])
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        state = blob["trainer"]
        _set_rng_state(blob["rng"])
        acc.print(f"sft: resumed from {ckpts[-1]} (step {state['step']})")
        if acc.is_main_process and (out / "train_log.jsonl").exists():  # drop what was logged after the checkpoint
            lines = (out / "train_log.jsonl").read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= state["step"]]
            atomic_write_text(out / "train_log.jsonl", "".join(ln + "\n" for ln in keep))
    if acc.is_main_process:  # the config of the latest (re)start
        atomic_write_text(out / "sft_config.json", json.dumps(asdict(cfg), indent=2))

    def save_checkpoint():
        if not acc.is_main_process:
            return
        blob = {"model": lm.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "trainer": state, "rng": _rng_state(), "run_key": run_key}
        atomic_dir(out / "checkpoints" / f"step-{state['step']:07d}", lambda d: torch.save(blob, d / "state.pt"))
        for old in _checkpoints(out)[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(old)

    def run_eval() -> bool:
        """Valid NDCG@10 on the fixed subset; saves the best model; True when patience ran out."""
        metrics = evaluate(lm, tokenizer, sid_vocab, trie, valid, data.catalog,
                           num_beams=cfg.eval_beams, batch_size=cfg.eval_batch_size, ks=(1, 5, 10),
                           cuda_graphs=cfg.cuda_graphs)
        state["history"]["valid"].append((state["step"], {k: float(v) for k, v in metrics.items()}))
        score = metrics["NDCG@10"]
        if state["best"] is None or score > state["best"]:
            state.update(best=float(score), best_step=state["step"], bad_evals=0)
            if acc.is_main_process:
                _save_pretrained(lm, tokenizer, out / "model")
        else:
            state["bad_evals"] += 1
        acc.print(f"sft: step {state['step']} valid NDCG@10 {score:.4f} HR@10 {metrics['HR@10']:.4f} "
                  f"(best {state['best']:.4f} at step {state['best_step']})")
        if acc.is_main_process:
            plot_curves(state["history"], out / "curves.png")
        return state["bad_evals"] >= cfg.patience

    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step",
               disable=not (cfg.progress and acc.is_main_process))
    model.train()
    t_start, run_loss, run_n, log_tokens, t_log = time.perf_counter(), 0.0, 0, 0, time.perf_counter()
    done = state["step"] >= total_steps or state["stopped_early"]
    while not done:
        batches = batches_of(state["epoch"])
        while state["batch"] < len(batches) and not done:
            batch = collate(tokenized, batches[state["batch"]], tokenizer.pad_token_id, cfg.packing, pad_to)
            batch = {k: v.to(acc.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            with acc.accumulate(model):
                loss = model(batch)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batch"] += 1
            run_loss += loss.detach().double()  # read at log time: no device sync per micro-batch
            run_n += 1
            log_tokens += batch["num_tokens"]
            if not acc.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                now = time.perf_counter()
                rec = {"step": state["step"], "epoch": state["epoch"], "loss": float(run_loss) / run_n,
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": log_tokens * world / (now - t_log)}
                state["history"]["loss"].append((state["step"], rec["loss"]))
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if acc.is_main_process:
                    with open(out / "train_log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                state["tokens"] += log_tokens * world
                run_loss, run_n, log_tokens, t_log = 0.0, 0, 0, now
            stop = False
            if eval_every > 0 and state["step"] % eval_every == 0:
                stop = run_eval()
                state["stopped_early"] = stop
            if stop or state["step"] >= total_steps:
                done = True
            if done or state["step"] % save_every == 0:
                state["train_seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save_checkpoint()
        if not done:
            state["epoch"] += 1
            state["batch"] = 0
    bar.close()
    if eval_every > 0 and (not state["history"]["valid"] or state["history"]["valid"][-1][0] != state["step"]) \
            and not state["stopped_early"]:
        run_eval()
    if state["best"] is None and acc.is_main_process:
        _save_pretrained(lm, tokenizer, out / "model")
    acc.wait_for_everyone()
    if acc.is_main_process:
        plot_curves(state["history"], out / "curves.png")

    from genrec_fast.model import load_model_and_tokenizer as _load

    best, tok, vocab = _load(str(out / "model"), device=acc.device, torch_dtype=torch.bfloat16 if bf16 else None)
    best.eval()
    result = {k: state[k] for k in ("step", "epoch", "best", "best_step", "stopped_early", "tokens",
                                    "train_seconds")}
    result.update(train_examples=len(examples), valid_subset=len(valid))
    test_metrics = None
    if cfg.test:
        from genrec_fast.eval import evaluate_split

        t0 = time.perf_counter()
        test_metrics = evaluate_split(best, tok, vocab, data, "test", num_beams=cfg.test_beams,
                                      batch_size=cfg.test_batch_size, trie=trie,
                                      out=str(out / "test_metrics.json"), cuda_graphs=cfg.cuda_graphs)
        result["test_seconds"] = time.perf_counter() - t0
    if acc.is_main_process:
        atomic_write_text(out / "sft_result.json", json.dumps(result, indent=2))
    return SFTResult(model=best, tokenizer=tok, sid_vocab=vocab, output_dir=out, model_dir=out / "model",
                     curves_png=out / "curves.png", history=state["history"], test_metrics=test_metrics)


# ---- CLI -----------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    d = SFTConfig()
    parser.add_argument("--data", help="MiniOneRec-format directory (train/valid/test.csv, index.json, ...)")
    parser.add_argument("--model", default=d.model, help="'tiny' or an HF causal LM name/path")
    parser.add_argument("--output-dir", default=d.output_dir)
    parser.add_argument("--tasks", nargs="+", default=list(d.tasks), help=f"SFT tasks to enable (of {list(d.tasks)})")
    flags = [f.name for f in fields(SFTConfig) if isinstance(f.default, bool)]
    for f in fields(SFTConfig):
        if f.name in ("data", "model", "output_dir", "tasks", "model_overrides", "bf16") or f.name in flags:
            continue
        typ = {"max_steps": int}.get(f.name, type(f.default))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=f.default)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on CUDA)")
    for name in flags:
        parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                            default=getattr(d, name))
    parser.add_argument("--model-overrides", type=json.loads, default={},
                        help='JSON dict of tiny-preset config fields, e.g. \'{"hidden_size": 256}\'')


def run(args) -> int:
    names = {f.name for f in fields(SFTConfig)}
    cfg = SFTConfig(**{k: v for k, v in vars(args).items() if k in names})
    res = train_sft(cfg)
    print(f"sft: model in {res.model_dir}, curves in {res.curves_png}")
    return 0
