"""Response log-probs (shared by S-DPO and GRPO) and the frozen reference."""
import pytest
import torch
import transformers

from genrec_fast.model import join_prompt_response
from genrec_fast.train.logprobs import (
    ReferenceModel,
    grouped_sequence_logprobs,
    grouped_token_logprobs,
    sequence_logprobs,
    token_logprobs,
)

from test_decode import left_padded_prompts, tiny_model


def _tiny(seed=0, vocab=40):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
    )
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _left_pad(rows, pad=0):
    p = max(len(r) for r in rows)
    ids = torch.full((len(rows), p), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), p), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, p - len(r):] = torch.tensor(r)
        mask[i, p - len(r):] = 1
    return ids, mask


def test_sequence_logprobs_matches_unpadded_forward():
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (5, 2, 7)]
    resp = torch.randint(1, 40, (3, 3), generator=g)
    ids, mask = _left_pad(prompts)
    got = sequence_logprobs(model, ids, mask, resp)
    per_token = token_logprobs(model, ids, mask, resp)
    assert per_token.shape == (3, 3) and per_token.requires_grad
    for i, p in enumerate(prompts):
        full = torch.tensor([p + resp[i].tolist()])
        with torch.no_grad():
            logp = model(full).logits[0].float().log_softmax(-1)
        want = [logp[len(p) - 1 + j, resp[i, j]].item() for j in range(3)]
        assert per_token[i].tolist() == pytest.approx(want, abs=1e-4)
        assert got[i].item() == pytest.approx(sum(want), abs=1e-4)
    assert got.requires_grad


def test_join_rejects_right_padding_and_bad_shapes():
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        join_prompt_response(ids, mask, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 prompts but 3 responses"):
        join_prompt_response(ids, torch.ones_like(ids), torch.ones(3, 3, dtype=torch.long))
    _, _, pos = join_prompt_response(ids, torch.tensor([[0, 1, 1], [1, 1, 1]]), torch.ones(2, 2, dtype=torch.long))
    assert pos.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_reference_is_a_frozen_copy():
    model = _tiny()
    ref = ReferenceModel(model)
    ids, mask = _left_pad([[3, 4, 5], [6, 7]])
    resp = torch.tensor([[1, 2, 3], [4, 5, 6]])
    before = ref.logprobs(ids, mask, resp)
    torch.testing.assert_close(before, sequence_logprobs(model, ids, mask, resp).detach())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    (-sequence_logprobs(model, ids, mask, resp).sum()).backward()
    opt.step()
    after_policy = sequence_logprobs(model, ids, mask, resp).detach()
    assert (after_policy > before + 1e-3).all()  # the policy moved ...
    torch.testing.assert_close(ref.logprobs(ids, mask, resp), before)  # ... the reference did not
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_reference_under_lora_is_the_adapter_disabled_policy():
    peft = pytest.importorskip("peft")
    base = _tiny()
    ids, mask = _left_pad([[3, 4, 5], [6, 7]])
    resp = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        base_lp = sequence_logprobs(base, ids, mask, resp)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = peft.get_peft_model(base, cfg)
    ref = ReferenceModel(policy)
    assert ref.model is None
    with torch.no_grad():
        pol_lp = sequence_logprobs(policy, ids, mask, resp)
    assert (pol_lp - base_lp).abs().max() > 1e-4  # the (random) adapter changes the policy
    torch.testing.assert_close(ref.logprobs(ids, mask, resp), base_lp)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("L", [1, 3])
def test_grouped_logprobs_equal_the_repeated_prompts_values_and_gradients(family, L):
    """grouped_token_logprobs (each prompt once, its K/V repeated for its C responses) gives token_logprobs of the
    prompts repeated C times, per token and summed, and the same gradients (left-padded prompts of several lengths;
    one-token and three-token responses)."""
    model = tiny_model(family, 3).eval()  # eval: GPT-2's dropout off; gradients still flow
    ids, mask = left_padded_prompts(3, 9, 5)
    resp = torch.randint(4, 50, (3, 4, L), generator=torch.Generator().manual_seed(2))
    weights = torch.randn(3, 4, L, generator=torch.Generator().manual_seed(3))
    got = grouped_token_logprobs(model, ids, mask, resp)
    assert got.shape == (3, 4, L) and got.dtype == torch.float32 and got.requires_grad
    (got * weights).sum().backward()
    got_grads = _grads(model)
    model.zero_grad()
    want = token_logprobs(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), resp.reshape(12, L))
    (want.view(3, 4, L) * weights).sum().backward()
    torch.testing.assert_close(got, want.view(3, 4, L), rtol=0, atol=2e-5)
    for a, b in zip(got_grads, _grads(model)):  # float sums in another order: 1e-4 of each tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(grouped_sequence_logprobs(model, ids, mask, resp), got.sum(2), rtol=0, atol=2e-5)
        ref = ReferenceModel(model)
        torch.testing.assert_close(ref.logprobs(ids, mask, resp), got.sum(2), rtol=0, atol=2e-5)
        torch.testing.assert_close(ref.logprobs(ids, mask, resp, per_token=True), got, rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match=r"response_ids must be \[P=3, C, L\] with C, L >= 1, got \(2, 4, 3\)"):
        grouped_token_logprobs(model, ids, mask, torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompts must be LEFT padded"):
        grouped_token_logprobs(model, ids.flip(1), mask.flip(1), resp)


def test_grouped_logprobs_through_a_lora_adapter_and_its_reference():
    """A LoRA policy: the grouped log-probs and the adapter's gradients equal the repeated prompts' ones; the
    adapter-disabled reference (grouped) equals the base model's."""
    peft = pytest.importorskip("peft")
    base = _tiny()
    g = torch.Generator().manual_seed(4)
    ids, mask = _left_pad([torch.randint(1, 40, (n,), generator=g).tolist() for n in (5, 2, 7)])
    resp = torch.randint(1, 40, (3, 5, 3), generator=g)
    with torch.no_grad():
        base_lp = grouped_sequence_logprobs(base, ids, mask, resp)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    ref = ReferenceModel(model)
    got = grouped_sequence_logprobs(model, ids, mask, resp)
    got.sum().backward()
    lora = [p for p in model.parameters() if p.requires_grad]
    got_grads = [p.grad.clone() for p in lora]
    model.zero_grad()
    sequence_logprobs(model, ids.repeat_interleave(5, 0), mask.repeat_interleave(5, 0), resp.reshape(15, 3)).sum() \
        .backward()
    for a, p in zip(got_grads, lora):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))
    torch.testing.assert_close(ref.logprobs(ids, mask, resp), base_lp, rtol=0, atol=1e-5)
    assert (got.detach() - base_lp).abs().max() > 1e-3  # the adapter changes the policy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_logprobs_on_gpu(dtype):
    """On a GPU (the trainers' bf16 autocast included): the grouped log-probs and gradients equal the repeated
    prompts' (fp32 as on CPU; bf16 autocast within its rounding)."""
    model = tiny_model("qwen2", 3).cuda()
    ids, mask = left_padded_prompts(3, 9, 5)
    ids, mask = ids.cuda(), mask.cuda()
    resp = torch.randint(4, 50, (3, 4, 3), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = grouped_token_logprobs(model, ids, mask, resp)
        got.sum().backward()
        got_grads = _grads(model)
        model.zero_grad()
        want = token_logprobs(model, ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), resp.reshape(12, 3))
        want.sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(got, want.view(3, 4, 3), rtol=0, atol=tol)
    for a, b in zip(got_grads, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-3 if dtype == torch.float32 else 0.1,
                                   atol=(1e-4 if dtype == torch.float32 else 0.05) * float(b.abs().max()))
