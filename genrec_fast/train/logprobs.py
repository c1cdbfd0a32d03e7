"""Response log-probabilities of SID responses, and the frozen reference model.

A response is the L SID tokens that follow a (left-padded) prompt; its log-prob is the sum
over those L tokens of log softmax over the whole vocabulary — the same quantity a
``score="full_vocab"`` beam search ranks by, so a beam's score equals the log-prob this
module recomputes for it. Shared by S-DPO and GRPO. ``sequence_logprobs`` / ``token_logprobs`` live in
``genrec_fast.model`` (evaluation scores with them too) and are re-exported here, with their grouped forms
(``grouped_sequence_logprobs`` / ``grouped_token_logprobs``: C responses per prompt [P, C, L], each prompt run once
and its K/V repeated for its responses), which both stages train with.
"""
from __future__ import annotations

import copy

import torch

from genrec_fast.model import grouped_sequence_logprobs, grouped_token_logprobs, sequence_logprobs, token_logprobs

__all__ = ["ReferenceModel", "grouped_sequence_logprobs", "grouped_token_logprobs", "sequence_logprobs",
           "token_logprobs"]


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


class ReferenceModel:
    """The frozen reference π_ref of DPO/KL terms.

    A full model gets a frozen eval-mode copy taken now (normally right after SFT); a peft
    (LoRA) model is its own reference with the adapter disabled, so no second copy is held.
    Pass the *unwrapped* policy (not the DDP/DeepSpeed wrapper).
    """

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy
        self.uses_adapter = _is_peft(policy)
        self.model = None
        if not self.uses_adapter:
            self.model = copy.deepcopy(policy).eval()
            self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                 per_token: bool = False) -> torch.Tensor:
        """Reference log-probs of the responses: [R, L] responses of the R prompts -> [R] summed, or [R, L] per token;
        [P, C, L] responses (C per prompt, each prompt run once: ``grouped_*``) -> [P, C], or [P, C, L]."""
        if response_ids.dim() == 3:
            fn = grouped_token_logprobs if per_token else grouped_sequence_logprobs
        else:
            fn = token_logprobs if per_token else sequence_logprobs
        if self.uses_adapter:
            with self.policy.disable_adapter():
                return fn(self.policy, prompt_ids, prompt_mask, response_ids)
        return fn(self.model, prompt_ids, prompt_mask, response_ids)
