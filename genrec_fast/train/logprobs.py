"""Response log-probabilities of SID responses, and the frozen reference model.

A response is the L SID tokens that follow a (left-padded) prompt; its log-prob is the sum
over those L tokens of log softmax over the whole vocabulary — the same quantity a
``score="full_vocab"`` beam search ranks by, so a beam's score equals the log-prob this
module recomputes for it. Shared by S-DPO and GRPO. ``sequence_logprobs`` / ``token_logprobs`` live in
``genrec_fast.model`` (evaluation scores with them too) and are re-exported here.
"""
from __future__ import annotations

import copy

import torch

from genrec_fast.model import sequence_logprobs, token_logprobs

__all__ = ["ReferenceModel", "sequence_logprobs", "token_logprobs"]


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
        """Reference log-probs of the responses: [R] summed, or [R, L] per token."""
        fn = token_logprobs if per_token else sequence_logprobs
        if self.uses_adapter:
            with self.policy.disable_adapter():
                return fn(self.policy, prompt_ids, prompt_mask, response_ids)
        return fn(self.model, prompt_ids, prompt_mask, response_ids)
