"""Post-training losses: DPO, softmax-DPO (S-DPO), k3 KL, the clipped policy loss and GRPO's loss.

DPO / S-DPO take sequence log-probabilities (the response log-prob summed over the SID tokens, see
:mod:`genrec_fast.train.logprobs`); k3 KL and the clipped policy loss work element-wise (per sequence or
per token). Each returns one loss value per row (``grpo_loss``: the mean), so the caller chooses the
reduction.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO's sigmoid loss, per row: −logsigmoid(β·((π_ch − ref_ch) − (π_rej − ref_rej)))."""
    _check_same_shape("policy_chosen_logps", policy_chosen_logps, "ref_chosen_logps", ref_chosen_logps)
    _check_same_shape("policy_rejected_logps", policy_rejected_logps, "ref_rejected_logps", ref_rejected_logps)
    _check_same_shape("policy_chosen_logps", policy_chosen_logps, "policy_rejected_logps", policy_rejected_logps)
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin)


def sdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    rejected_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Softmax-DPO loss over N negatives, per row.

    loss[b] = −logsigmoid(−logsumexp_j β·((π_rej[b,j] − ref_rej[b,j]) − (π_ch[b] − ref_ch[b])))

    Shapes: chosen [B], rejected [B, N]. ``rejected_mask`` [B, N] bool (optional) marks the
    real negatives when rows have different numbers of them; masked entries drop out of the
    log-sum-exp. Every row needs at least one real negative. With N = 1 this is DPO's loss.
    """
    if policy_rejected_logps.dim() != 2:
        raise ValueError(f"policy_rejected_logps must be [B, N], got shape {tuple(policy_rejected_logps.shape)}")
    _check_same_shape("policy_rejected_logps", policy_rejected_logps, "ref_rejected_logps", ref_rejected_logps)
    _check_same_shape("policy_chosen_logps", policy_chosen_logps, "ref_chosen_logps", ref_chosen_logps)
    if policy_chosen_logps.shape != policy_rejected_logps.shape[:1]:
        raise ValueError(
            f"policy_chosen_logps has shape {tuple(policy_chosen_logps.shape)}, expected "
            f"({policy_rejected_logps.shape[0]},) to match policy_rejected_logps"
        )
    chosen_ratio = (policy_chosen_logps - ref_chosen_logps).unsqueeze(1)  # [B, 1]
    z = beta * ((policy_rejected_logps - ref_rejected_logps) - chosen_ratio)  # [B, N]
    if rejected_mask is not None:
        _check_same_shape("rejected_mask", rejected_mask, "policy_rejected_logps", policy_rejected_logps)
        empty = ~rejected_mask.any(dim=1)
        if bool(empty.any()):
            rows = torch.nonzero(empty).flatten().tolist()
            raise ValueError(f"sdpo_loss: rows {rows} have no negative (rejected_mask all False)")
        z = z.masked_fill(~rejected_mask, float("-inf"))
    return -F.logsigmoid(-torch.logsumexp(z, dim=1))


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π‖ref) from samples of π: exp(d) − d − 1, d = ref − π (≥ 0)."""
    _check_same_shape("logps", logps, "ref_logps", ref_logps)
    d = ref_logps - logps
    return torch.exp(d) - d - 1.0


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, per row: −min(r·A, clip(r, 1−ε, 1+ε)·A), r = exp(logp − old_logp).

    Returns (loss [R], clipped [R] bool: rows where the clipped term was the smaller one).
    With ``old_logps = logps.detach()`` (a fresh rollout) r = 1 and the gradient is the
    plain policy gradient A·∇logp.
    """
    _check_same_shape("logps", logps, "old_logps", old_logps)
    _check_same_shape("logps", logps, "advantages", advantages)
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


GRPO_LOSS_LEVELS = ("token", "sequence")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    clip_eps: float = 0.2,
    level: str = "token",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's loss: the clipped policy loss plus β·k3 KL to the reference, averaged.

    level "token" (TRL's GRPOTrainer, MiniOneRec): log-probs [R, L] per response token; ratio, clipping
    and k3 KL per token, averaged over the L tokens, then over the R rows (SID responses all have L
    tokens). level "sequence": log-probs [R] summed over the response; ratio and k3 KL of the sums.
    advantages: [R], one per response. Returns (loss, kl [R, L] or [R], clipped [R, L] or [R] bool).
    """
    if level not in GRPO_LOSS_LEVELS:
        raise ValueError(f"grpo_loss: level must be one of {GRPO_LOSS_LEVELS}, got {level!r}")
    want = 2 if level == "token" else 1
    if logps.dim() != want:
        raise ValueError(f"grpo_loss: level {level!r} takes {want}-D log-probs, got shape {tuple(logps.shape)}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"grpo_loss: advantages has shape {tuple(advantages.shape)}, expected ({logps.shape[0]},)")
    adv = advantages[:, None].expand_as(logps) if level == "token" else advantages
    pg, clipped = clipped_policy_loss(logps, old_logps, adv, clip_eps)
    kl = k3_kl(logps, ref_logps)
    per_row = pg + beta * kl
    if level == "token":
        per_row = per_row.mean(dim=1)
    return per_row.mean(), kl, clipped
