"""Training: SFT (genrec_fast.train.sft), S-DPO (sdpo) and GRPO/ReRe (grpo).

The losses, rewards and log-prob helpers import eagerly (they only need torch); the
trainers load lazily on first attribute access, so importing this package never pulls
in the data/model/decode stacks (and creates no import cycles with them).
"""
from __future__ import annotations

import importlib

from .logprobs import ReferenceModel, sequence_logprobs, token_logprobs
from .losses import clipped_policy_loss, dpo_loss, grpo_loss, k3_kl, sdpo_loss
from .rewards import (
    REWARDS,
    SemanticReward,
    group_advantages,
    group_rewards,
    hit_rank,
    make_reward,
    no_signal_share,
    ranking_reward,
    rule_reward,
)

_LAZY = {
    "train_sft": "genrec_fast.train.sft",
    "SFTConfig": "genrec_fast.train.sft",
    "SFTTrainer": "genrec_fast.train.sft",
    "train_sdpo": "genrec_fast.train.sdpo",
    "SDPOConfig": "genrec_fast.train.sdpo",
    "SDPOTrainer": "genrec_fast.train.sdpo",
    "train_grpo": "genrec_fast.train.grpo",
    "GRPOConfig": "genrec_fast.train.grpo",
    "GRPOTrainer": "genrec_fast.train.grpo",
    "StageConfig": "genrec_fast.train.runtime",
    "StageTrainer": "genrec_fast.train.runtime",
    "NonFiniteLossError": "genrec_fast.train.runtime",
    "OutputDirLocked": "genrec_fast.train.runtime",
}

__all__ = [
    "REWARDS",
    "ReferenceModel",
    "SemanticReward",
    "clipped_policy_loss",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "group_rewards",
    "hit_rank",
    "k3_kl",
    "make_reward",
    "no_signal_share",
    "ranking_reward",
    "rule_reward",
    "sdpo_loss",
    "sequence_logprobs",
    "token_logprobs",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genrec_fast.train' has no attribute {name!r}")
