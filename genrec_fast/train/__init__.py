"""Training: SFT (genrec_fast.train.sft), S-DPO (sdpo) and GRPO/ReRe (grpo), with their losses, rewards,
log-prob helpers and the shared stage runtime (runtime)."""
from __future__ import annotations

from .grpo import GRPOConfig, GRPOTrainer, train_grpo
from .logprobs import (
    ReferenceModel,
    grouped_sequence_logprobs,
    grouped_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)
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
from .runtime import NonFiniteLossError, OutputDirLocked, StageConfig, StageTrainer
from .sdpo import SDPOConfig, SDPOTrainer, train_sdpo
from .sft import SFTConfig, SFTTrainer, train_sft

__all__ = [
    "REWARDS",
    "ReferenceModel",
    "SemanticReward",
    "clipped_policy_loss",
    "dpo_loss",
    "group_advantages",
    "grpo_loss",
    "group_rewards",
    "grouped_sequence_logprobs",
    "grouped_token_logprobs",
    "hit_rank",
    "k3_kl",
    "make_reward",
    "no_signal_share",
    "ranking_reward",
    "rule_reward",
    "sdpo_loss",
    "sequence_logprobs",
    "token_logprobs",
    "train_sft",
    "SFTConfig",
    "SFTTrainer",
    "train_sdpo",
    "SDPOConfig",
    "SDPOTrainer",
    "train_grpo",
    "GRPOConfig",
    "GRPOTrainer",
    "StageConfig",
    "StageTrainer",
    "NonFiniteLossError",
    "OutputDirLocked",
]

