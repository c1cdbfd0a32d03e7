"""SASRec (Kang & McAuley, 2018) as a learned baseline: causal self-attention over item ids, plain torch.

Model: learned item and position embeddings (item ids shifted by one, 0 = padding, sequences
left-padded so the last position is always the newest item), ``num_layers`` transformer blocks
(post-LN as in RecBole by default, pre-LN with ``pre_ln=True``; causal, padding keys masked),
dropout on the embeddings, attention weights, and block outputs; item scores are dot products with
the (tied) item embeddings.

Training (``fit_sasrec``): the fitting samples are chained back into per-user sequences
(``genrec_fast.data.user_sequences``: a sample whose history is the end of its user's sequence so far extends it,
anything else starts a new sequence, so sliding-window samples of one user become one sequence and
every sample's history is exactly the context before its target); each sequence is cut, from its
newest end, into non-overlapping windows of ``max_len`` items (``max_len - 1`` inputs, so a target
never sees more than the longest history in the data, like the evaluation). Loss: full-softmax cross
entropy over the whole catalogue at every non-padding position. Adam; after every epoch NDCG@10 on the
stopping samples; training stops after ``patience`` epochs without improvement and the best epoch's
weights are kept. Seeded (weights, shuffling, dropout) and run under ``torch.random.fork_rng``, so it
leaves the caller's RNG state alone.

Stopping samples (``stopping_split``): for a test evaluation, the valid samples of a seeded subset of
the valid users (``stop_frac``, at most ``max_stop_users``), fitting on train + the rest of valid; for
a valid evaluation, the last train sample of a seeded subset of the train users, fitting on the rest
of train. With fewer than two users to draw from there is no stopping set and training runs
``fallback_epochs`` epochs.

Scoring: full-catalogue logits at the last position of the sample's history; every item is ranked
(nothing is filtered out, as for the other baselines); ties go to the lower item index. (A sample
with an empty history has no position to read: every item scores 0, i.e. ranked by index. Neither
MovieLens nor the Amazon release has such eval samples.)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genrec_fast.data import interactions
from genrec_fast.data.interactions import sequence_windows, user_sequences


@dataclass
class SASRecConfig:
    hidden: int = 128
    num_layers: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    ffn_mult: int = 4                     # feed-forward width = ffn_mult * hidden
    pre_ln: bool = False                  # False: post-LN blocks as in RecBole / the paper
    max_len: Optional[int] = None         # items per training window; None: longest history in the data + 1
    stride: Optional[int] = None          # window starts, from the newest end; None: max_len - 1 (no overlap)
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256                 # windows per step
    max_epochs: int = 200
    patience: int = 5                     # epochs without a better stopping NDCG@10
    fallback_epochs: int = 20             # epochs when there is no stopping set
    stop_frac: float = 0.2                # share of users held out for early stopping (at most max_stop_users)
    max_stop_users: int = 1000
    stop_seed: int = 0                    # which users are held out for stopping (fixed across model seeds)
    seed: int = 0                         # weights, shuffling, dropout
    eval_batch_size: int = 1024
    device: str = "cpu"

    def check(self) -> None:
        if self.hidden % self.num_heads:
            raise ValueError(f"SASRec: hidden={self.hidden} is not a multiple of num_heads={self.num_heads}")
        for name in ("hidden", "num_layers", "num_heads", "batch_size", "max_epochs", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRec: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"SASRec: max_len must be >= 2 (one input and one target), got {self.max_len}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 < self.stop_frac < 1.0:
            raise ValueError(f"SASRec: dropout must be in [0, 1) and stop_frac in (0, 1), "
                             f"got {self.dropout} and {self.stop_frac}")


def as_config(cfg) -> SASRecConfig:
    """A SASRecConfig from None / a config / a dict of its fields."""
    if cfg is None or cfg is True:
        cfg = SASRecConfig()
    elif isinstance(cfg, dict):
        cfg = SASRecConfig(**cfg)
    elif not isinstance(cfg, SASRecConfig):
        raise TypeError(f"SASRec config must be a SASRecConfig or a dict, got {type(cfg).__name__}")
    cfg.check()
    return cfg


# ---- model ---------------------------------------------------------------------------------------

class _Dropout(nn.Module):
    """Inverted dropout. On CPU the masks come from a seeded numpy generator (``rng``, set by the owner):
    torch's CPU bernoulli took a third of a training step; the drop probability is then rounded to
    a multiple of 1/256. Elsewhere it is ``F.dropout``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.rng: Optional[np.random.Generator] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.rng is None:
            return F.dropout(x, self.p, True)
        cut = int(round(self.p * 256))
        keep = np.frombuffer(self.rng.bytes(x.numel()), np.uint8).reshape(x.shape) >= cut
        return x * torch.from_numpy(keep).to(x.dtype) * (256.0 / (256 - cut))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, ffn: int, pre_ln: bool):
        super().__init__()
        self.heads, self.pre_ln = heads, pre_ln
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), nn.Linear(ffn, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn_drop, self.drop1, self.drop2 = _Dropout(dropout), _Dropout(dropout), _Dropout(dropout)

    def attn(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(D // self.heads))
        w = self.attn_drop(w.masked_fill(~mask, float("-inf")).softmax(-1))
        return self.proj((w @ v).transpose(1, 2).reshape(B, L, D))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop1(self.attn(self.ln1(x), mask))
            return x + self.drop2(self.ff(self.ln2(x)))
        x = self.ln1(x + self.drop1(self.attn(x, mask)))
        return self.ln2(x + self.drop2(self.ff(x)))


class SASRec(nn.Module):
    """Inputs: [B, L] item ids + 1 (0 = padding, on the left), L <= max_inputs. Output: [B, L, hidden]."""

    def __init__(self, num_items: int, max_inputs: int, cfg: SASRecConfig):
        super().__init__()
        d = cfg.hidden
        self.num_items, self.max_inputs = num_items, max_inputs
        self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(max_inputs, d)
        self.emb_ln = nn.LayerNorm(d)
        self.drop = _Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.num_heads, cfg.dropout, cfg.ffn_mult * d, cfg.pre_ln)
                                    for _ in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(d) if cfg.pre_ln else nn.Identity()
        self.pre_ln = cfg.pre_ln
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()

    def seed_dropout(self, seed: int) -> None:
        """Seed the CPU dropout masks (one numpy generator shared by every dropout of the model)."""
        rng = np.random.default_rng(seed)
        for m in self.modules():
            if isinstance(m, _Dropout):
                m.rng = rng

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L = x.shape
        real = x > 0
        h = self.item(x) + self.pos.weight[self.max_inputs - L:][None]  # right-aligned positions
        h = self.drop(h) if self.pre_ln else self.drop(self.emb_ln(h))
        h = h * real[..., None]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        # a query attends to earlier real items and to itself (a padding query then has one key: no NaN)
        mask = (causal[None] & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)[None]
        mask = mask[:, None]
        for blk in self.blocks:
            h = blk(h, mask) * real[..., None]
        return self.final_ln(h)

    def item_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Scores of every catalogue item (index order) for hidden states [..., hidden]."""
        return h @ self.item.weight[1:].T


# ---- data ----------------------------------------------------------------------------------------

def training_windows(seqs: Sequence[Sequence[int]], max_len: int,
                     stride: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The :func:`genrec_fast.data.sequence_windows` of each sequence as (inputs, targets), both int64
    [W, max_len - 1], item ids + 1, left-padded with 0."""
    L = max_len - 1
    xs, ys = [], []
    for seq in seqs:
        for w in sequence_windows(seq, max_len, stride):
            x = np.zeros(L, dtype=np.int64)
            y = np.zeros(L, dtype=np.int64)
            x[L - len(w) + 1:] = np.asarray(w[:-1]) + 1
            y[L - len(w) + 1:] = np.asarray(w[1:]) + 1
            xs.append(x)
            ys.append(y)
    if not xs:
        return np.zeros((0, L), np.int64), np.zeros((0, L), np.int64)
    return np.stack(xs), np.stack(ys)


def history_inputs(samples: Sequence, max_inputs: int) -> np.ndarray:
    """Each sample's last ``max_inputs`` history items + 1, left-padded: int64 [N, max_inputs]."""
    out = np.zeros((len(samples), max_inputs), dtype=np.int64)
    for i, s in enumerate(samples):
        h = [int(x) for x in s.history][-max_inputs:]
        if h:
            out[i, max_inputs - len(h):] = np.asarray(h) + 1
    return out


def _held_out_users(users: Sequence, frac: float, cap: int, seed: int) -> set:
    uniq = sorted(set(users), key=str)
    if len(uniq) < 2:
        return set()
    k = min(cap, max(1, int(round(frac * len(uniq)))), len(uniq) - 1)
    pick = np.random.default_rng(seed).choice(len(uniq), size=k, replace=False)
    return {uniq[i] for i in pick}


def stopping_split(data, split: str, cfg: SASRecConfig) -> Tuple[list, list]:
    """(fitting samples, early-stopping samples) for evaluating ``split`` of a RecData (see module doc)."""
    if split == "test":
        held = _held_out_users([s.user_id for s in data.valid], cfg.stop_frac, cfg.max_stop_users, cfg.stop_seed)
        fit = list(data.train) + [s for s in data.valid if s.user_id not in held]
        stop = [s for s in data.valid if s.user_id in held]
        return fit, stop
    if split == "valid":
        train = list(data.train)
        held = _held_out_users([s.user_id for s in train], cfg.stop_frac, cfg.max_stop_users, cfg.stop_seed)
        last = {s.user_id: i for i, s in enumerate(train) if s.user_id in held}
        drop = set(last.values())
        return [s for i, s in enumerate(train) if i not in drop], [train[i] for i in sorted(drop)]
    raise ValueError(f"SASRec is fitted for a 'valid' or 'test' evaluation, got {split!r}")


# ---- fitting and scoring -------------------------------------------------------------------------

class FittedSASRec:
    """A trained SASRec with what its training did (``info``: epochs, best epoch, stopping curve, seconds)."""

    def __init__(self, model: SASRec, cfg: SASRecConfig, info: dict):
        self.model, self.cfg, self.info = model, cfg, info

    @torch.no_grad()
    def logits(self, samples: Sequence) -> np.ndarray:
        """Full-catalogue scores at the last history position: float32 [N, num_items]."""
        if not len(samples):
            return np.zeros((0, self.model.num_items), np.float32)
        return torch.cat(list(self._logit_batches(samples))).numpy()

    def _logit_batches(self, samples: Sequence):
        model = self.model
        was = model.training
        model.eval()
        try:
            x = torch.from_numpy(history_inputs(samples, model.max_inputs))
            dev = next(model.parameters()).device
            for i in range(0, len(samples), self.cfg.eval_batch_size):
                h = model(x[i:i + self.cfg.eval_batch_size].to(dev))[:, -1]
                yield model.item_logits(h).float().cpu()
        finally:
            model.train(was)

    @torch.no_grad()
    def ranks(self, samples: Sequence, top_n: Optional[int] = None) -> np.ndarray:
        """0-based rank of each target among all items (score desc, ties: lower index); -1 if >= top_n."""
        out = []
        targets = torch.tensor([int(s.target) for s in samples], dtype=torch.int64)
        start = 0
        for lg in self._logit_batches(samples):
            t = targets[start:start + len(lg)]
            start += len(lg)
            ts = lg.gather(1, t[:, None])
            idx = torch.arange(lg.shape[1])[None]
            r = (lg > ts).sum(1) + ((lg == ts) & (idx < t[:, None])).sum(1)
            out.append(r)
        r = torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)
        if top_n is not None:
            r = np.where(r < top_n, r, -1)
        return r


def _ndcg10(fitted: FittedSASRec, samples: Sequence) -> float:
    r = fitted.ranks(samples, 10)
    return float(np.where(r >= 0, 1.0 / np.log2(np.maximum(r, 0) + 2.0), 0.0).mean())


def fit_sasrec(fit: Sequence, stop: Sequence, num_items: int, cfg: Optional[SASRecConfig] = None,
               max_history: Optional[int] = None, verbose: bool = False) -> FittedSASRec:
    """Train SASRec on ``fit`` samples, early-stopped on ``stop`` samples (NDCG@10); see the module doc.

    max_history: the longest history the model must read (default: the longest in fit + stop); the
    windows hold ``cfg.max_len`` (default max_history + 1) items.
    """
    cfg = as_config(cfg)
    t0 = time.perf_counter()
    for what, ss in (("fit", fit), ("stop", stop)):
        for i, s in enumerate(ss):
            bad = [x for x in list(s.history) + [s.target] if not 0 <= int(x) < num_items]
            if bad:
                raise ValueError(f"SASRec {what} sample {i}: item index {bad[0]} out of range 0..{num_items - 1}")
    if max_history is None:
        max_history = max([len(s.history) for s in list(fit) + list(stop)] + [1])
    max_len = cfg.max_len or max_history + 1
    seqs = user_sequences(fit, max_history)
    X, Y = training_windows(seqs, max_len, cfg.stride)
    if len(X) == 0:
        raise ValueError("SASRec: no training targets (every fitting sample has an empty history)")
    device = torch.device(cfg.device)
    cuda_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_ids):
        torch.manual_seed(cfg.seed)
        model = SASRec(num_items, max_len - 1, cfg).to(device)
        model.seed_dropout(cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
        fitted = FittedSASRec(model, cfg, {})
        epochs = cfg.max_epochs if len(stop) else min(cfg.fallback_epochs, cfg.max_epochs)
        best, best_epoch, best_state, curve, losses = -1.0, 0, None, [], []
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(len(Xt), generator=gen)
            total, count = 0.0, 0
            for i in range(0, len(order), cfg.batch_size):
                b = order[i:i + cfg.batch_size]
                x, y = Xt[b].to(device), Yt[b].to(device)
                h = model(x)
                keep = y > 0
                loss = F.cross_entropy(model.item_logits(h[keep]), y[keep] - 1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = int(keep.sum())
                total, count = total + float(loss.detach()) * n, count + n
            losses.append(round(total / max(count, 1), 5))
            if not len(stop):
                continue
            score = _ndcg10(fitted, stop)
            curve.append(round(score, 5))
            if verbose:
                print(f"SASRec epoch {epoch}: loss {losses[-1]:.4f}  stop NDCG@10 {score:.4f}", flush=True)
            if score > best:
                best, best_epoch, best_state = score, epoch, copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= cfg.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            best_epoch = len(losses)
    model.eval()
    fitted.info = {"epochs": len(losses), "best_epoch": best_epoch,
                   "stop_NDCG@10": round(best, 5) if len(stop) else None, "stop_samples": len(stop),
                   "fit_samples": len(fit), "sequences": len(seqs), "windows": int(len(X)),
                   "train_targets": int((Y > 0).sum()), "max_len": int(max_len),
                   "fit_seconds": round(time.perf_counter() - t0, 2), "stop_curve": curve, "loss_curve": losses}
    return fitted


# ---- the baseline on a RecData split -------------------------------------------------------------

_CACHE: Dict[str, FittedSASRec] = {}
_CACHE_SIZE = 4
# the folder fitted models are kept in between processes; "off" (or 0, none, empty) keeps none
DISK_CACHE_ENV = "GENREC_FAST_SASREC_CACHE"
# a change to this module or to how samples become training sequences (data.interactions) refits
_SOURCE_SHA = hashlib.sha1(Path(__file__).read_bytes() + Path(interactions.__file__).read_bytes()).hexdigest()


def disk_cache_dir() -> Optional[Path]:
    """Where fitted SASRec baselines are kept between runs: ``$GENREC_FAST_SASREC_CACHE``, else
    ``$GENREC_FAST_CACHE/sasrec`` (default ``~/.cache/genrec_fast/sasrec``); None when the variable says off."""
    value = os.environ.get(DISK_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none") else Path(value).expanduser()
    return Path(os.environ.get("GENREC_FAST_CACHE", Path.home() / ".cache" / "genrec_fast")) / "sasrec"


def _machine(cfg: SASRecConfig) -> tuple:
    """What a seeded fit's floats depend on besides the data and the config: this module's code, torch, the
    device and (on CPU) the kernels' ISA and the thread count, (on CUDA) the GPU."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        where = (torch.cuda.get_device_name(device), torch.version.cuda)
    else:
        where = (platform.machine(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
    return _SOURCE_SHA, torch.__version__, device.type, where


def _load_fitted(path: Path, num_items: int, max_len: int, cfg: SASRecConfig) -> Optional[FittedSASRec]:
    """The fit saved at ``path`` (None when there is none; an unreadable one is warned about and refitted)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location=cfg.device, weights_only=True)
        model = SASRec(num_items, max_len - 1, cfg).to(cfg.device)
        model.load_state_dict(saved["state"])
    except Exception as e:  # a cache entry is never a reason to fail: fit again and replace it
        first = (str(e).splitlines() or [""])[0]
        warnings.warn(f"SASRec cache {path}: unreadable ({type(e).__name__}: {first}); fitting again", stacklevel=3)
        return None
    model.eval()
    return FittedSASRec(model, cfg, {**saved["info"], "cache": str(path)})


def _save_fitted(path: Path, fitted: FittedSASRec) -> None:
    """Write the fit to ``path`` atomically (temp file + rename); a folder that cannot be written is warned about."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": fitted.model.state_dict(), "info": fitted.info}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"SASRec cache {path}: not written ({e})", stacklevel=3)


def _fingerprint(num_items: int, max_history: int, cfg: SASRecConfig, fit: Sequence, stop: Sequence) -> str:
    h = hashlib.sha1(repr((num_items, max_history, sorted(dataclasses.asdict(cfg).items()))).encode())
    for ss in (fit, stop):
        h.update(b"|")
        for s in ss:
            h.update(repr((s.user_id, list(map(int, s.history)), int(s.target))).encode())
    return h.hexdigest()


def fitted_for_split(data, split: str, cfg=None) -> FittedSASRec:
    """SASRec fitted for evaluating ``split`` of a RecData, memoised on the data's content and the config: in this
    process, and on disk (:func:`disk_cache_dir`) for the same code, torch, device, CPU ISA and thread count, so a
    later evaluation of the same split loads the fit a fresh one would give instead of training again (its info
    then holds "cache": the file; its "fit_seconds" are the original fit's)."""
    cfg = as_config(cfg)
    fit, stop = stopping_split(data, split, cfg)
    max_history = max([len(s.history) for sp in (data.train, data.valid, data.test) for s in sp] + [1])
    n = len(data.catalog.item_ids)
    key = _fingerprint(n, max_history, cfg, fit, stop)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        folder = disk_cache_dir()
        path = None
        if folder is not None:
            path = folder / f"{hashlib.sha1(repr((key, _machine(cfg))).encode()).hexdigest()}.pt"
        max_len = cfg.max_len or max_history + 1
        fitted = _load_fitted(path, n, max_len, cfg) if path is not None else None
        if fitted is None:
            fitted = fit_sasrec(fit, stop, n, cfg, max_history=max_history)
            if path is not None:
                _save_fitted(path, fitted)
        _CACHE[key] = fitted
    return _CACHE[key]


def sasrec_ranks(data, split: str, samples: Sequence, top_n: int, cfg=None) -> Tuple[np.ndarray, dict]:
    """(0-based target ranks, -1 beyond ``top_n``; fit info) of SASRec on ``samples`` of ``split``."""
    fitted = fitted_for_split(data, split, cfg)
    n = len(data.catalog.item_ids)
    for i, s in enumerate(samples):
        bad = [x for x in list(s.history) + [s.target] if not 0 <= int(x) < n]
        if bad:
            raise ValueError(f"eval sample {i}: item index {bad[0]} out of range 0..{n - 1}")
    return fitted.ranks(samples, top_n), fitted.info
