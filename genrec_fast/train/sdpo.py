"""S-DPO: softmax-DPO preference training with N negatives per prompt (`genrec-fast sdpo`).

For each training sample the chosen response is the target item's SID; the N rejected
responses are other SIDs, either drawn at random from the catalogue (never the target's
SID, an item of the history, or twice the same SID) or mined as the top wrong beams of a
constrained beam search of the current policy. Response log-probs are summed over the SID
tokens for the policy and for the frozen reference (the SFT model, or the adapter-disabled
policy under LoRA), and the loss is :func:`genrec_fast.train.losses.sdpo_loss`, optionally plus
``sft_weight`` times the chosen response's NLL per SID token (as in RPO: DPO-style losses can
lower the chosen likelihood along with the rejected ones; the NLL term keeps it up).
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from genrec_fast.train.logprobs import grouped_sequence_logprobs
from genrec_fast.train.losses import sdpo_loss
from genrec_fast.train.post_training import PostTrainConfig, PostTrainer, Session, add_config_arguments, run_cli
from genrec_fast.train.runtime import check_finite, is_main_process, opt, run_lock

NEGATIVE_SOURCES = ("random", "mined")


@dataclass
class SDPOConfig(PostTrainConfig):
    num_negatives: int = opt(3, "rejected SIDs per prompt")
    negatives: str = opt("random", "'random' (from the catalogue) or 'mined' (top wrong beams of the policy)")
    beta: float = opt(1.0, "S-DPO temperature: the implicit rewards are beta x (policy - reference) log-probs")
    sft_weight: float = opt(0.0, "+ this weight x the chosen response's NLL per SID token (keeps its likelihood up)")

    def __post_init__(self):
        super().__post_init__()
        if self.negatives not in NEGATIVE_SOURCES:
            raise ValueError(f"negatives must be one of {NEGATIVE_SOURCES}, got {self.negatives!r}")
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")


def random_negatives(rng: np.random.Generator, item_leaf: np.ndarray, samples: List, n: int) -> np.ndarray:
    """[len(samples), n] item indices: uniform over items whose SID differs from the target's, is
    not the SID of a history item, and differs from the other negatives' SIDs."""
    num_items = len(item_leaf)
    out = np.empty((len(samples), n), dtype=np.int64)
    for row, s in enumerate(samples):
        banned = {int(item_leaf[s.target])} | {int(item_leaf[h]) for h in s.history}
        chosen: List[int] = []
        tries = 0
        while len(chosen) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct negative SIDs for sample of user {s.user_id}")
            item = int(rng.integers(num_items))
            leaf = int(item_leaf[item])
            if leaf not in banned:
                banned.add(leaf)
                chosen.append(item)
        out[row] = chosen
    return out


def mined_negative_codes(session: Session, ids: torch.Tensor, mask: torch.Tensor, samples: List,
                         n: int) -> torch.Tensor:
    """[G, n, L] codes of the top n beams that are not the target's SID (beam search with n+1 beams)."""
    res = session.beam_search(ids, mask, n + 1)
    leaves = res.leaf_ids.cpu().numpy()
    codes = res.codes.cpu()
    out = []
    for g, s in enumerate(samples):
        keep = [b for b in range(n + 1) if int(leaves[g, b]) != int(session.item_leaf[s.target])][:n]
        out.append(codes[g, keep])
    return torch.stack(out)


def sdpo_step(session: Session, samples: List) -> Dict[str, float]:
    cfg: SDPOConfig = session.cfg
    n = cfg.num_negatives
    catalog_codes = session.item_codes
    ids, mask = session.prompts(samples)
    chosen = catalog_codes[[s.target for s in samples]]  # [G, L]
    if cfg.negatives == "random":
        rejected = catalog_codes[torch.as_tensor(random_negatives(session.rng, session.item_leaf, samples, n))]
    else:
        rejected = mined_negative_codes(session, ids, mask, samples, n)
    codes = torch.cat([chosen.unsqueeze(1), rejected], dim=1)  # [G, 1+n, L]
    responses = session.response_tokens(codes).view(*codes.shape)
    # each prompt runs once for its 1 + n responses (its K/V repeated for them): [G, 1+n]
    logps = grouped_sequence_logprobs(session.model, ids, mask, responses)
    ref = session.reference_logprobs(ids, mask, responses)
    loss = sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], cfg.beta).mean()
    if cfg.sft_weight:
        loss = loss - cfg.sft_weight * logps[:, 0].mean() / chosen.shape[1]
    check_finite("S-DPO loss", loss)
    grad_norm = session.backward_and_step(loss)
    with torch.no_grad():
        reward = cfg.beta * (logps.detach() - ref)  # implicit rewards
        margin = reward[:, :1] - reward[:, 1:]
    return {
        "loss": float(loss.detach()),
        "accuracy": float((margin > 0).all(dim=1).float().mean()),  # chosen beats every negative
        "margin": float(margin.mean()),
        "chosen_logp": float(logps[:, 0].detach().mean()),
        "grad_norm": grad_norm,
    }


class SDPOTrainer(PostTrainer):
    """S-DPO: :func:`sdpo_step` on each batch."""

    def __init__(self, cfg: SDPOConfig):
        super().__init__(cfg, "sdpo", lambda session: functools.partial(sdpo_step, session))


def train_sdpo(cfg: SDPOConfig) -> Dict[str, Any]:
    """S-DPO from an SFT checkpoint (resuming the newest checkpoint in cfg.output_dir); returns the metrics dict
    (also written to cfg.output_dir/metrics.json)."""
    with run_lock(Path(cfg.output_dir), enabled=is_main_process()):
        return SDPOTrainer(cfg).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SDPOConfig)


def run(args: argparse.Namespace) -> int:
    return run_cli(SDPOConfig, train_sdpo, args)
