"""Hand-computed checks of the post-training losses."""
import math

import pytest
import torch

from genrec_fast.train.losses import clipped_policy_loss, dpo_loss, grpo_loss, k3_kl, sdpo_loss


def _softplus(x):
    return math.log1p(math.exp(x))


def test_sdpo_hand_computed():
    # one row, chosen ratio 0.5 - 0.0 = 0.5; rejected ratios (-1 - 0) and (0.25 - 0.5)
    pc, rc = torch.tensor([0.5]), torch.tensor([0.0])
    pr, rr = torch.tensor([[-1.0, 0.25]]), torch.tensor([[0.0, 0.5]])
    beta = 2.0
    z = [beta * (-1.0 - 0.5), beta * (-0.25 - 0.5)]  # -3, -1.5
    lse = math.log(math.exp(z[0]) + math.exp(z[1]))
    expected = _softplus(lse)  # -logsigmoid(-lse) = log(1 + e^lse)
    got = sdpo_loss(pc, pr, rc, rr, beta)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sdpo_n1_equals_dpo():
    g = torch.Generator().manual_seed(0)
    pc, rc = torch.randn(7, generator=g), torch.randn(7, generator=g)
    pr, rr = torch.randn(7, 1, generator=g), torch.randn(7, 1, generator=g)
    for beta in (0.1, 1.0, 5.0):
        s = sdpo_loss(pc, pr, rc, rr, beta)
        d = dpo_loss(pc, pr[:, 0], rc, rr[:, 0], beta)
        torch.testing.assert_close(s, d, rtol=1e-6, atol=1e-7)


def test_dpo_hand_computed():
    loss = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    # margin = (1) - (-1) = 2; beta*margin = 1; -logsigmoid(1) = log(1 + e^-1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)


def test_sdpo_is_stable_for_huge_margins():
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    pr = torch.tensor([[-1e4, -2e4], [1e4, 3e4]])
    zeros1, zeros2 = torch.zeros(2), torch.zeros(2, 2)
    loss = sdpo_loss(pc, pr, zeros1, zeros2, 1.0)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)  # chosen far ahead: no loss
    assert loss[1].item() == pytest.approx(3e4, rel=1e-6)  # softplus(3e4) ~ 3e4
    loss.sum().backward()
    assert torch.isfinite(pc.grad).all()
    assert pc.grad[1].item() == pytest.approx(-1.0, rel=1e-5)  # d/dpc softplus(pr - pc) ~ -1


def test_sdpo_mask_drops_padding_negatives():
    pc, rc = torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.0])
    pr = torch.tensor([[-1.0, 0.7, 99.0], [-0.5, 0.2, 0.1]])
    rr = torch.tensor([[0.0, 0.1, 0.0], [0.0, 0.0, 0.3]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = sdpo_loss(pc, pr, rc, rr, 1.5, rejected_mask=mask)
    first = sdpo_loss(pc[:1], pr[:1, :2], rc[:1], rr[:1, :2], 1.5)
    second = sdpo_loss(pc[1:], pr[1:], rc[1:], rr[1:], 1.5)
    torch.testing.assert_close(got, torch.cat([first, second]))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sdpo_loss(pc, pr, rc, rr, 1.0, rejected_mask=torch.tensor([[True, False, False], [False] * 3]))


def test_sdpo_shape_errors():
    with pytest.raises(ValueError, match="must be \\[B, N\\]"):
        sdpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="expected"):
        sdpo_loss(torch.zeros(3), torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 4), 1.0)


def test_k3_kl_hand_computed():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    expected = [0.0, math.e - 1 - 1, math.exp(-1.0) + 1 - 1]
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor(expected))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_clipped_policy_loss_hand_computed():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, -2.0, 3.0])
    loss, clipped = clipped_policy_loss(logp, old, adv, clip_eps=0.2)
    # r=1.5, A=1: min(1.5, 1.2) -> 1.2 (clipped); r=1.5, A=-1: min(-1.5, -1.2) -> -1.5 (not clipped)
    # r=0.5, A=-2: min(-1.0, -1.6) -> -1.6 (clipped); r=1, A=3: 3
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, 1.6, -3.0]))
    assert clipped.tolist() == [True, False, True, False]


def test_clipped_policy_loss_gradient_on_fresh_rollout_is_policy_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([0.7, -0.3])
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv)


def test_grpo_loss_per_token_as_trl_and_per_sequence():
    """level 'token' is TRL's GRPOTrainer loss (all completion tokens real): per token
    -(min(r A, clip(r) A) - beta k3), averaged over tokens, then rows; 'sequence' does the same on sums."""
    g = torch.Generator().manual_seed(0)
    R, L, beta, eps = 5, 3, 0.04, 0.2
    logp = -torch.rand(R, L, generator=g) * 3
    old = logp + 0.3 * torch.randn(R, L, generator=g)
    ref = logp + 0.5 * torch.randn(R, L, generator=g)
    adv = torch.randn(R, generator=g)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_tok = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - eps, 1 + eps) * a)
    per_tok = per_tok + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    loss, kl, clipped = grpo_loss(logp, old, ref, adv, beta, eps, "token")
    torch.testing.assert_close(loss, per_tok.mean(1).mean())
    assert kl.shape == clipped.shape == (R, L)
    s_logp, s_old, s_ref = logp.sum(1), old.sum(1), ref.sum(1)
    r = torch.exp(s_logp - s_old)
    per_seq = -torch.minimum(r * adv, torch.clamp(r, 1 - eps, 1 + eps) * adv)
    per_seq = per_seq + beta * (torch.exp(s_ref - s_logp) - (s_ref - s_logp) - 1)
    loss_s, kl_s, _ = grpo_loss(s_logp, s_old, s_ref, adv, beta, eps, "sequence")
    torch.testing.assert_close(loss_s, per_seq.mean())
    assert kl_s.shape == (R,) and not torch.allclose(loss, loss_s)
    with pytest.raises(ValueError, match="level must be one of"):
        grpo_loss(logp, old, ref, adv, beta, eps, "batch")
    with pytest.raises(ValueError, match="level 'sequence' takes 1-D log-probs"):
        grpo_loss(logp, old, ref, adv, beta, eps, "sequence")
    with pytest.raises(ValueError, match=r"advantages has shape \(4,\)"):
        grpo_loss(logp, old, ref, adv[:4], beta, eps, "token")
