"""Which SID level loses the target: the level-by-level view of a model beside the baselines' distributions.

For each sample and each SID level l, the log-probability of the target's level-l code given the target's first
l codes, normalised over the children that prefix has in the catalogue's trie, and the code's rank among those
children (0: the most probable; ties rank in the code's favour). Summed over the levels this is the log-probability
of the target's SID under ``score="sid"`` beam scores.

- The model (:func:`model_level_logprobs`): teacher-forced, one forward pass per sample over prompt + the target's
  SID tokens; each level's logits over its own SID tokens, masked to the prefix's children.
- Any distribution over items (:func:`item_level_logprobs`): SASRec's softmax over the catalogue, or popularity
  (add-one smoothed counts of the fitting samples' targets). A prefix's probability is the sum over the items
  under it, so a baseline is compared with the model on the model's own factorisation.

:func:`level_report` gathers both for one split (``genrec-fast eval --levels``); :func:`level_table` prints it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from genrec_fast.eval.baselines import fit_samples, item_counts
from genrec_fast.eval.sasrec import fitted_for_split
from genrec_fast.model import encode_prompts, eval_mode, join_prompt_response
from genrec_fast.prompts import check_prompt_style, model_prompt_style, rec_prompt

TOP_RANKS = (1, 3)  # the report's "top1" / "top3": share of samples whose code ranks below 1 / 3


class Prefixes:
    """The catalogue's SID prefixes per level: ``ids[l]`` [N items] the id of each item's first l + 1 codes,
    ``parent[l]`` [num prefixes at l] the id of each prefix's parent at level l - 1 (0 at level 0: the root),
    ``code[l]`` [num prefixes at l] its last code."""

    def __init__(self, codes):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"levels: SID codes must be a non-empty [items, levels] array, got shape {codes.shape}")
        if codes.min() < 0:
            raise ValueError(f"levels: negative SID code at item {int(np.argwhere(codes < 0)[0][0])}")
        self.num_levels = codes.shape[1]
        self.ids: List[np.ndarray] = []
        self.parent: List[np.ndarray] = []
        self.code: List[np.ndarray] = []
        for level in range(self.num_levels):
            uniq, first, inv = np.unique(codes[:, :level + 1], axis=0, return_index=True, return_inverse=True)
            self.ids.append(inv.reshape(-1).astype(np.int64))
            self.parent.append(np.zeros(len(uniq), np.int64) if level == 0 else self.ids[level - 1][first])
            self.code.append(uniq[:, level].astype(np.int64))

    def num_children(self, targets: np.ndarray) -> np.ndarray:
        """[R, L] children of each target's prefix above level l (its siblings + itself)."""
        out = np.zeros((len(targets), self.num_levels), np.int64)
        for level in range(self.num_levels):
            counts = np.bincount(self.parent[level])
            parent = 0 if level == 0 else self.ids[level - 1][targets]
            out[:, level] = counts[parent]
        return out


def _check_targets(targets, num_items: int) -> np.ndarray:
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    bad = np.nonzero((t < 0) | (t >= num_items))[0]
    if len(bad):
        raise ValueError(f"levels: sample {int(bad[0])}: target item {int(t[bad[0]])} out of range 0..{num_items - 1}")
    return t


def item_level_logprobs(item_log_probs: torch.Tensor, codes, targets,
                        chunk_rows: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Per-level (log-probabilities [R, L], ranks [R, L]) of each target's codes under a distribution over items.

    item_log_probs: [R, N] log-probabilities over the N catalogue items (rows need not be normalised: each level
    is a ratio of prefix masses), or [1, N] for one distribution shared by all R targets. ``codes``: the
    catalogue's SID codes [N, L] or their :class:`Prefixes`. Works ``chunk_rows`` targets at a time.
    """
    pre = codes if isinstance(codes, Prefixes) else Prefixes(codes)
    n = len(pre.ids[0])
    t = _check_targets(targets, n)
    lp = torch.as_tensor(item_log_probs, dtype=torch.float64)
    if lp.dim() != 2 or lp.shape[1] != n or lp.shape[0] not in (1, len(t)):
        raise ValueError(f"item_level_logprobs: item log-probs must be [{len(t)} or 1, {n}], got {tuple(lp.shape)}")
    logps = np.zeros((len(t), pre.num_levels))
    ranks = np.zeros((len(t), pre.num_levels), np.int64)
    for s in range(0, len(t), chunk_rows):
        rows = slice(s, min(s + chunk_rows, len(t)))
        part = lp if lp.shape[0] == 1 else lp[rows]
        logps[rows], ranks[rows] = _levels_of(torch.exp(part - part.max(dim=1, keepdim=True).values), pre, t[rows])
    return logps, ranks


def _levels_of(probs: torch.Tensor, pre: Prefixes, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`item_level_logprobs` for one chunk: ``probs`` [R or 1, N] unnormalised item probabilities."""
    r = len(t)
    logps, ranks = np.zeros((r, pre.num_levels)), np.zeros((r, pre.num_levels), np.int64)
    parent_mass = probs.sum(dim=1).expand(r)
    rows = torch.arange(r)
    for level in range(pre.num_levels):
        ids = torch.from_numpy(pre.ids[level])
        mass = torch.zeros(probs.shape[0], int(ids.max()) + 1, dtype=torch.float64).index_add_(1, ids, probs)
        mass = mass.expand(r, -1)
        child = torch.from_numpy(pre.ids[level][t])
        mine = mass[rows, child]
        parent = torch.from_numpy(pre.parent[level])
        siblings = parent[None, :] == parent[child][:, None]
        ranks[:, level] = ((mass > mine[:, None]) & siblings).sum(dim=1).numpy()
        logps[:, level] = (torch.log(mine) - torch.log(parent_mass)).numpy()
        parent_mass = mine
    return logps, ranks


@torch.no_grad()
def model_level_logprobs(model, tokenizer, sid_vocab, catalog, samples: Sequence, batch_size: int = 32,
                         prompt_style: Optional[str] = None,
                         max_prompt_length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Per-level (log-probabilities [R, L], ranks [R, L]) of each sample's target SID under the model, prompted with
    the sample's history in ``prompt_style`` (None: the model's own); each level normalised over the children of the
    target's prefix in the catalogue."""
    if batch_size < 1:
        raise ValueError(f"model_level_logprobs: batch_size must be >= 1, got {batch_size}")
    codes = np.asarray(catalog.codes)
    pre = Prefixes(codes)
    sizes = tuple(sid_vocab.codebook_sizes)
    if len(sizes) != pre.num_levels:
        raise ValueError(f"model_level_logprobs: the model has {len(sizes)} SID levels, the catalogue {pre.num_levels}")
    t = _check_targets([s.target for s in samples], len(codes))
    style = model_prompt_style(model) if prompt_style is None else check_prompt_style(prompt_style)
    # allowed[l][parent prefix] -> [K_l] children mask
    allowed = []
    for level, k in enumerate(sizes):
        top = int(pre.code[level].max())
        if top >= k:
            raise ValueError(f"model_level_logprobs: level {level} of the catalogue has code {top}, "
                             f"the model's SID vocabulary {k} codes there")
        m = torch.zeros(int(pre.parent[level].max()) + 1, k, dtype=torch.bool)
        m[torch.from_numpy(pre.parent[level]), torch.from_numpy(pre.code[level])] = True
        allowed.append(m)
    device = next(model.parameters()).device
    logps = np.zeros((len(t), pre.num_levels))
    ranks = np.zeros((len(t), pre.num_levels), np.int64)
    with eval_mode(model):
        for start in range(0, len(t), batch_size):
            batch = list(range(start, min(start + batch_size, len(t))))
            ids, mask = encode_prompts(tokenizer, [rec_prompt(samples[i].history, catalog, style) for i in batch],
                                       max_length=max_prompt_length)
            response = sid_vocab.token_ids(torch.from_numpy(codes[t[batch]]))
            x, am, pos = join_prompt_response(ids, mask, response)
            logits = model(input_ids=x.to(device), attention_mask=am.to(device), position_ids=pos.to(device),
                           use_cache=False, logits_to_keep=pre.num_levels + 1).logits[:, :pre.num_levels].float().cpu()
            for level in range(pre.num_levels):
                lo, hi = sid_vocab.level_range(level)
                parent = np.zeros(len(batch), np.int64) if level == 0 else pre.ids[level - 1][t[batch]]
                z = logits[:, level, lo:hi].masked_fill(~allowed[level][torch.from_numpy(parent)], float("-inf"))
                z = torch.log_softmax(z, dim=1)
                mine = z.gather(1, torch.from_numpy(codes[t[batch], level])[:, None])
                logps[batch, level] = mine[:, 0].double().numpy()
                ranks[batch, level] = (z > mine).sum(dim=1).numpy()
    return logps, ranks


def _summary(logps: np.ndarray, ranks: np.ndarray) -> dict:
    out = {"mean_logp": [round(float(x), 6) for x in logps.mean(axis=0)],
           "item_logp": round(float(logps.sum(axis=1).mean()), 6)}
    for k in TOP_RANKS:
        out[f"top{k}"] = [round(float(x), 6) for x in (ranks < k).mean(axis=0)]
    return out


def level_report(model, tokenizer, sid_vocab, data, split: str, samples: Optional[Sequence] = None,
                 sasrec=True, batch_size: int = 32, prompt_style: Optional[str] = None,
                 max_prompt_length: Optional[int] = None) -> dict:
    """The level-by-level view of ``samples`` (default: all) of ``split``: {"num_samples", "children" (mean children
    of the target's prefix per level), "methods": {"model", "sasrec" (unless ``sasrec`` is False; the same fit as
    the evaluation's SASRec row), "popularity"}: {"mean_logp", "item_logp", "top1", "top3"}}."""
    samples = list(getattr(data, split)) if samples is None else list(samples)
    if not samples:
        raise ValueError(f"level_report: no samples in {split!r}")
    codes = np.asarray(data.catalog.codes)
    pre = Prefixes(codes)
    targets = _check_targets([s.target for s in samples], len(codes))
    methods: Dict[str, dict] = {"model": _summary(*model_level_logprobs(
        model, tokenizer, sid_vocab, data.catalog, samples, batch_size, prompt_style, max_prompt_length))}
    if sasrec is not False and sasrec is not None:
        fitted = fitted_for_split(data, split, None if sasrec is True else sasrec)
        parts = [item_level_logprobs(torch.log_softmax(torch.from_numpy(fitted.logits(samples[s:s + 512])).double(), 1),
                                     pre, targets[s:s + 512]) for s in range(0, len(samples), 512)]
        methods["sasrec"] = _summary(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    counts = item_counts(fit_samples(data, split), len(codes)).astype(np.float64) + 1.0
    methods["popularity"] = _summary(*item_level_logprobs(torch.from_numpy(np.log(counts))[None], pre, targets))
    return {"num_samples": len(samples), "children": [round(float(x), 3) for x in pre.num_children(targets).mean(0)],
            "methods": methods}


def level_table(report: dict) -> str:
    """The report as a text table: one row per SID level (and the item's sum), per method mean log p / top-1 /
    top-3."""
    names = list(report["methods"])
    head = ["level (children)"] + [f"{n}: log p / top1 / top3" for n in names]
    rows = []
    for level, kids in enumerate(report["children"]):
        cells = [f"{level + 1} ({kids:.1f})"]
        for n in names:
            m = report["methods"][n]
            cells.append(f"{m['mean_logp'][level]:.3f} / {m['top1'][level]:.3f} / {m['top3'][level]:.3f}")
        rows.append(cells)
    rows.append(["item (sum)"] + [f"{report['methods'][n]['item_logp']:.3f}" for n in names])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    return f"per SID level ({report['num_samples']} samples):\n" + "\n".join(lines)
