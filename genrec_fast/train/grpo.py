"""GRPO with ReRe's ranking reward on constrained beam rollouts (`genrec-fast rl`).

Each step: one beam search of the current policy per prompt with B = ``group_size`` beams
(beam order is the rank) -> rewards per beam (rule / ranking / semantic) -> advantages
(R − mean)/(std + 1e-4) per group -> ``num_updates`` optimizer steps on the same rollout,
each with the recomputed log-probs, PPO-style ratio clipping against the log-probs of the first
update, and β·k3 KL to the frozen reference; per SID token and averaged over the tokens (as TRL's
GRPOTrainer and MiniOneRec; ``loss_level="token"``) or on the summed sequence log-prob
(``loss_level="sequence"``); ``sft_weight`` adds that weight times the NLL per SID token of each prompt's
target SID. With ``inject_target`` a group
whose beams miss the target gets the target's SID in place of its last beam, so it has a
learning signal. The share of groups with no signal (all-equal rewards) is logged.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch

from genrec_fast.eval.baselines import TransitionTable
from genrec_fast.eval.hybrid import check_weight
from genrec_fast.sid import embed_items
from genrec_fast.train.logprobs import grouped_sequence_logprobs, grouped_token_logprobs, sequence_logprobs
from genrec_fast.train.losses import GRPO_LOSS_LEVELS, grpo_loss
from genrec_fast.train.post_training import PostTrainConfig, PostTrainer, Session, add_config_arguments, run_cli
from genrec_fast.train.rewards import group_advantages, group_rewards, hit_rank, make_reward, no_signal_share
from genrec_fast.train.runtime import check_finite, is_main_process, opt, run_lock


@dataclass
class GRPOConfig(PostTrainConfig):
    group_size: int = opt(16, "beams per prompt = rollouts per group (>= 2)")
    reward: str = opt("ranking", "'rule', 'ranking' (ReRe), 'semantic', or 'ranking+transition' (ReRe's + "
                                 "--transition-weight x log1p(count of last history item -> the beam's item) in the "
                                 "training samples)")
    transition_weight: float = opt(0.5, "'ranking+transition': the weight of the transition-count bonus")
    item_embeddings: Optional[str] = opt(None, ".npy [N, D] for the semantic reward (default: embed the catalogue "
                                               "texts)")
    num_updates: int = opt(1, "optimizer steps per rollout (> 1: PPO ratio clipping matters)")
    clip_eps: float = opt(0.2, "PPO ratio clipping")
    beta: float = opt(0.04, "GRPO: weight of the k3 KL to the reference")
    inject_target: bool = opt(False, "put the target's SID in place of the last beam of a group that missed it")
    loss_level: str = opt("token", "'token': ratio, clip and KL per SID token, averaged (TRL, MiniOneRec); "
                                   "'sequence': on the summed sequence log-prob")
    sft_weight: float = opt(0.0, "+ this weight x the NLL per SID token of each prompt's target SID (the SFT loss "
                                 "on the same prompts, beside the GRPO loss)")

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        if self.num_updates < 1:
            raise ValueError(f"num_updates must be >= 1, got {self.num_updates}")
        if self.loss_level not in GRPO_LOSS_LEVELS:
            raise ValueError(f"loss_level must be one of {GRPO_LOSS_LEVELS}, got {self.loss_level!r}")
        check_weight(self.transition_weight, "transition_weight")
        if not self.sft_weight >= 0.0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


class Rollouts(NamedTuple):
    """One batch of groups: codes [G, B, L], item ids per beam, hit rank per group (before injection)."""

    codes: torch.Tensor
    beam_items: List[List[np.ndarray]]
    hits: List[Optional[int]]


def rollout(session: Session, ids: torch.Tensor, mask: torch.Tensor, samples: List, inject: bool) -> Rollouts:
    """Beam-search groups for ``samples``; with ``inject`` the target replaces the last beam of a missing group."""
    res = session.beam_search(ids, mask, session.cfg.group_size)
    codes = res.codes.cpu().clone()
    beam_items = [list(group) for group in res.item_ids]
    hits = [hit_rank(group, s.target) for group, s in zip(beam_items, samples)]
    if inject:
        catalog_codes = session.data.catalog.codes
        for g, s in enumerate(samples):
            if hits[g] is None:
                codes[g, -1] = torch.as_tensor(catalog_codes[s.target], dtype=codes.dtype)
                beam_items[g][-1] = session.trie.leaf_items(int(session.item_leaf[s.target]))
    return Rollouts(codes, beam_items, hits)


def grpo_step(session: Session, reward_fn: Callable, samples: List) -> Dict[str, float]:
    cfg: GRPOConfig = session.cfg
    ids, mask = session.prompts(samples)
    ro = rollout(session, ids, mask, samples, cfg.inject_target)
    rewards = group_rewards(reward_fn, ro.beam_items, [s.target for s in samples],
                            [s.history for s in samples])  # [G, B]
    adv = group_advantages(rewards).flatten().to(session.device)
    responses = session.response_tokens(ro.codes).view(*ro.codes.shape)  # [G, B, L]
    per_token = cfg.loss_level == "token"
    # each prompt runs once for its group (its K/V repeated for the B beams): [G*B] or [G*B, L]
    grouped = grouped_token_logprobs if per_token else grouped_sequence_logprobs

    def logprobs(model, *args):
        return grouped(model, *args).flatten(0, 1)

    ref = session.reference_logprobs(ids, mask, responses, per_token=per_token).flatten(0, 1)
    targets = None
    if cfg.sft_weight:
        targets = session.response_tokens(session.item_codes[[s.target for s in samples]])  # [G, L]
    old = None
    stats: Dict[str, float] = {}
    for it in range(cfg.num_updates):
        logps = logprobs(session.model, ids, mask, responses)
        if old is None:
            old = logps.detach()  # the rollout's log-probs: ratio 1 on the first update
        loss, kl, clipped = grpo_loss(logps, old, ref, adv, cfg.beta, cfg.clip_eps, cfg.loss_level)
        nll = None
        if targets is not None:
            nll = -sequence_logprobs(session.model, ids, mask, targets).mean() / targets.shape[1]
            loss = loss + cfg.sft_weight * nll
        check_finite("GRPO loss", loss)
        grad_norm = session.backward_and_step(loss)
        if it == cfg.num_updates - 1:
            stats = {"loss": float(loss.detach()), "kl": float(kl.detach().mean()),
                     "clip_frac": float(clipped.float().mean()), "grad_norm": grad_norm}
            if nll is not None:
                stats["target_nll"] = float(nll.detach())
    stats.update({
        "reward": float(rewards.mean()),
        "hit_rate": float(np.mean([h is not None for h in ro.hits])),  # target among the beams (before injection)
        "no_signal": no_signal_share(rewards),
    })
    return stats


def _item_embeddings(session: Session) -> np.ndarray:
    path = session.cfg.item_embeddings
    if path:
        emb = np.load(path)
        n = len(session.data.catalog)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"{path}: item embeddings must be [{n}, D] (one row per catalogue item), got {emb.shape}")
        return emb
    return np.asarray(embed_items(session.data.catalog.texts))


class GRPOTrainer(PostTrainer):
    """GRPO: :func:`grpo_step` with the configured reward on each batch."""

    def __init__(self, cfg: GRPOConfig):
        super().__init__(cfg, "rl", self._make_step)

    @staticmethod
    def _make_step(session: Session):
        cfg = session.cfg
        emb = _item_embeddings(session) if cfg.reward == "semantic" else None
        table = None
        if cfg.reward == "ranking+transition":  # counted on the samples the model may learn from
            table = TransitionTable(session.learnable_samples(), len(session.data.catalog))
        return functools.partial(grpo_step, session, make_reward(cfg.reward, emb, table, cfg.transition_weight))


def train_grpo(cfg: GRPOConfig) -> Dict[str, Any]:
    """GRPO from an SFT checkpoint (resuming the newest checkpoint in cfg.output_dir); returns the metrics dict
    (also written to cfg.output_dir/metrics.json)."""
    with run_lock(Path(cfg.output_dir), enabled=is_main_process()):
        return GRPOTrainer(cfg).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, GRPOConfig)


def run(args: argparse.Namespace) -> int:
    return run_cli(GRPOConfig, train_grpo, args)
