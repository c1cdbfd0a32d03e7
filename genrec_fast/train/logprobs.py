"""Response log-probabilities of SID responses, and the frozen reference model.

A response is the L SID tokens that follow a (left-padded) prompt; its log-prob is the sum
over those L tokens of log softmax over the whole vocabulary — the same quantity a
``score="full_vocab"`` beam search ranks by, so a beam's score equals the log-prob this
module recomputes for it. Shared by S-DPO and GRPO.
"""
from __future__ import annotations

import copy

import torch

from genrec_fast.model import join_prompt_response


def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """Sum over the response tokens of log p(token | prompt, previous tokens): [R] float32."""
    return token_logprobs(model, prompt_ids, prompt_mask, response_ids).sum(dim=1)


def token_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """log p(token | prompt, previous tokens) of each response token: [R, L] float32.

    Gradients flow to ``model`` unless called under ``torch.no_grad()``. Only the L+1 last
    positions' logits are computed (``logits_to_keep``), in float32 for the log-sum-exp.
    """
    input_ids, attention_mask, position_ids = join_prompt_response(prompt_ids, prompt_mask, response_ids)
    num_resp = response_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=num_resp + 1,
    )
    logits = out.logits[:, -(num_resp + 1) : -1].float()  # positions predicting the response tokens
    targets = response_ids.to(logits.device).long().unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


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
