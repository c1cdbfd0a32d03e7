"""Verifiable rewards for beam rollouts, and GRPO's group advantages.

A *group* is the B beams of one constrained beam search for one prompt, best first, each
beam given as the array of item ids its SID maps to (``BeamSearchResult.item_ids[i]``).
Every reward function here has the form ``fn(beam_items, target) -> FloatTensor [B]``, so
new rewards plug in through :data:`REWARDS` (or by passing a callable to
:func:`group_rewards`); one with ``needs_history = True`` is called as ``fn(beam_items, target, history)``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

from genrec_fast.eval.baselines import TransitionTable
from genrec_fast.eval.hybrid import TransitionReranker, check_weight

RewardFn = Callable[[Sequence[np.ndarray], int], torch.Tensor]


def hit_rank(beam_items: Sequence[np.ndarray], target: int) -> Optional[int]:
    """Rank (from 0) of the first beam whose items contain ``target``; None when no beam does."""
    for rank, items in enumerate(beam_items):
        if int(target) in np.asarray(items).tolist():
            return rank
    return None


def rule_reward(beam_items: Sequence[np.ndarray], target: int) -> torch.Tensor:
    """1 for each beam whose item ids contain the target, 0 otherwise."""
    return torch.tensor([1.0 if int(target) in np.asarray(it).tolist() else 0.0 for it in beam_items])


def ranking_reward(hit_rank: Optional[int], num_beams: int) -> torch.Tensor:
    """ReRe's ranking reward for one group of ``num_beams`` beams.

    When the target is at rank ``hit_rank`` the hit gets 1 and each wrong beam at rank i
    gets −(1/log2(i+2)) / Σ_{j<B} 1/log2(j+2): wrong beams ranked high are penalised most.
    When the target is not among the beams (``hit_rank`` None) every beam gets 0.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if hit_rank is None:
        return torch.zeros(num_beams)
    if not 0 <= hit_rank < num_beams:
        raise ValueError(f"hit_rank {hit_rank} outside 0..{num_beams - 1}")
    weights = torch.tensor([1.0 / math.log2(i + 2) for i in range(num_beams)], dtype=torch.float64)
    rewards = -weights / weights.sum()
    rewards[hit_rank] = 1.0
    return rewards.float()


def ranking_group_reward(beam_items: Sequence[np.ndarray], target: int) -> torch.Tensor:
    """:func:`ranking_reward` in the common ``fn(beam_items, target)`` form."""
    return ranking_reward(hit_rank(beam_items, target), len(beam_items))


class SemanticReward:
    """Cosine similarity between each beam's item embedding and the target's.

    ``item_embeddings`` [N, D] is indexed by item id (e.g. the sentence embeddings of the
    catalogue texts used to build the SIDs). A beam whose SID maps to several items scores
    the best of them; the target's own beam scores 1.
    """

    def __init__(self, item_embeddings: Union[np.ndarray, torch.Tensor]):
        emb = torch.as_tensor(np.asarray(item_embeddings), dtype=torch.float32)
        if emb.dim() != 2 or emb.shape[0] == 0:
            raise ValueError(f"item_embeddings must be a non-empty [N, D] array, got shape {tuple(emb.shape)}")
        norms = emb.norm(dim=1, keepdim=True)
        zero = torch.nonzero(norms.squeeze(1) == 0).flatten().tolist()
        if zero:
            raise ValueError(f"item_embeddings rows {zero[:10]} are all zeros (cosine undefined)")
        self.unit = emb / norms

    def __call__(self, beam_items: Sequence[np.ndarray], target: int) -> torch.Tensor:
        n = self.unit.shape[0]
        if not 0 <= int(target) < n:
            raise ValueError(f"target item {target} outside the {n} embedded items")
        t = self.unit[int(target)]
        out = []
        for items in beam_items:
            idx = torch.as_tensor(np.asarray(items, dtype=np.int64))
            if idx.numel() == 0:
                raise ValueError("a beam maps to no item ids (padding beam?)")
            out.append((self.unit[idx] @ t).max())
        return torch.stack(out)


class TransitionBonusReward:
    """ReRe's ranking reward + ``weight`` * log1p(count(last history item -> the beam's item)).

    The counts come from a :class:`~genrec_fast.eval.baselines.TransitionTable` of the training samples. A beam whose
    SID maps to several items takes the largest count. Unlike the ranking reward alone, a group whose beams miss the
    target still carries signal when the user's last item has seen successors among them: the policy is pushed toward
    the successors the hybrid row re-ranks by (``genrec_fast.eval.hybrid``), and at inference it decodes alone.
    """

    needs_history = True

    def __init__(self, table: TransitionTable, weight: float):
        self.counts = TransitionReranker(table).counts
        self.weight = check_weight(weight, "transition reward weight")

    def __call__(self, beam_items: Sequence[np.ndarray], target: int, history: Sequence[int]) -> torch.Tensor:
        last = int(history[-1]) if len(history) else -1
        sizes = [len(items) for items in beam_items]
        flat = self.counts(last, np.concatenate([np.asarray(it, dtype=np.int64) for it in beam_items]).tolist())
        ends = np.cumsum(sizes)  # one lookup per group, then the largest count of each beam's items
        counts = [flat[e - n:e].max(initial=0.0) for n, e in zip(sizes, ends)]
        return ranking_group_reward(beam_items, target) + self.weight * torch.log1p(torch.tensor(counts)).float()


REWARDS: Dict[str, RewardFn] = {"rule": rule_reward, "ranking": ranking_group_reward}
"""Rewards by name; "semantic" needs item embeddings, see :func:`make_reward`."""


def make_reward(name: str, item_embeddings: Optional[np.ndarray] = None,
                transitions: Optional[TransitionTable] = None, transition_weight: float = 0.5) -> RewardFn:
    """Reward function by name: "rule", "ranking", "semantic" (needs ``item_embeddings``) or "ranking+transition"
    (needs ``transitions``: :class:`TransitionBonusReward` with ``transition_weight``)."""
    if name == "ranking+transition":
        if transitions is None:
            raise ValueError("reward 'ranking+transition' needs a transition table of the training samples")
        return TransitionBonusReward(transitions, transition_weight)
    if name == "semantic":
        if item_embeddings is None:
            raise ValueError("reward 'semantic' needs item_embeddings [N, D]")
        return SemanticReward(item_embeddings)
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(REWARDS) + ['ranking+transition', 'semantic']}")
    return REWARDS[name]


def group_rewards(
    reward_fn: RewardFn, beam_item_ids: Sequence[Sequence[np.ndarray]], targets: Sequence[int],
    histories: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """Rewards [G, B] of G groups (one per prompt); ``histories`` (one per group) for a reward that needs them."""
    if len(beam_item_ids) != len(targets):
        raise ValueError(f"{len(beam_item_ids)} groups of beams but {len(targets)} targets")
    if getattr(reward_fn, "needs_history", False):
        if histories is None or len(histories) != len(targets):
            raise ValueError(f"this reward needs each group's history: got "
                             f"{'none' if histories is None else len(histories)} for {len(targets)} groups")
        return torch.stack([reward_fn(beams, int(t), h).float()
                            for beams, t, h in zip(beam_item_ids, targets, histories)])
    return torch.stack([reward_fn(beams, int(t)).float() for beams, t in zip(beam_item_ids, targets)])


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages per group: (R − mean) / (std + eps) over each row of ``rewards`` [G, B].

    std is the unbiased sample std (as in TRL's GRPO); a group of equal rewards gets 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [G, B] with B >= 2, got shape {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def no_signal_share(rewards: torch.Tensor) -> float:
    """Share of groups whose rewards are all equal (zero advantage, no learning signal)."""
    if rewards.numel() == 0:
        return 0.0
    flat = (rewards == rewards[:, :1]).all(dim=1)
    return float(flat.float().mean())
