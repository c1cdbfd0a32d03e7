"""Full-vocabulary LM-head log-sum-exp (``genrec_fast.ops.lse``): the fused Triton kernel (interpreter on CPU) and
the chunked torch reference against float64 ``logsumexp(hidden @ weight.T + bias)``."""
import pytest
import torch

from genrec_fast.ops import lm_head_lse, lm_head_lse_ref

from sm90_aot import compile_sm90
from test_decode_graphs import _CaptureChecker

# vs float64 on the same (rounded) inputs. The kernel: fp32 logits (products of the inputs exact in fp32, fp32
# accumulation), so only the summation order differs in every dtype. The reference: fp32 the same; fp16/bf16 it
# rounds each logit to the dtype first (half an ulp of the logit: 2^-11 / 2^-8 relative), so its bound is wider.
KERNEL_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
REF_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def _dtypes(device):
    # the interpreter has no bf16
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def _exact(h, w, b):
    logits = h.double() @ w.double().T
    return torch.logsumexp(logits if b is None else logits + b.double(), dim=1)


def _inputs(R, H, V, dtype, device, seed, bias=True, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(R, H, generator=gen).to(device, dtype)
    w = (torch.randn(V, H, generator=gen) * scale).to(device, dtype)
    b = torch.randn(V, generator=gen).to(device, dtype) if bias else None
    return h, w, b


@pytest.mark.parametrize("R,H,V,bias", [(1, 16, 17, True), (5, 40, 1000, True), (33, 64, 3001, False),
                                        (130, 24, 2500, True), (16, 100, 1024, False)])
def test_kernel_and_reference_match_float64(R, H, V, bias, device):
    for dtype in _dtypes(device):
        h, w, b = _inputs(R, H, V, dtype, device, seed=R * V + H)
        exact = _exact(h, w, b)
        got = lm_head_lse(h, w, b, backend="triton")
        assert got.dtype == torch.float32 and got.shape == (R,)
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=KERNEL_TOL[dtype], msg=str(dtype))
        ref = lm_head_lse(h, w, b, backend="torch")
        torch.testing.assert_close(ref.double(), exact, rtol=0, atol=REF_TOL[dtype], msg=str(dtype))


def test_strided_inputs_masked_vocabulary_and_large_logits(device):
    """A transposed view of hidden, a row slice of a larger head, a bias of -inf over most of the vocabulary (a
    split with nothing finite adds nothing), logits in the hundreds (no overflow: running max)."""
    h, w, b = _inputs(7, 48, 3000, torch.float32, device, seed=3)
    h_t = h.t().contiguous().t()  # stride(1) != 1
    w_slice = torch.cat([w, w])[1000:4000]
    b = b.clone()
    b[100:2900] = float("-inf")
    for hh, ww, bb in ((h_t, w_slice, b), (h * 40, w, None)):
        exact = _exact(hh, ww, bb)
        torch.testing.assert_close(lm_head_lse(hh, ww, bb, backend="triton").double(), exact, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(lm_head_lse_ref(hh, ww, bb).double(), exact, rtol=1e-6, atol=1e-5)
    b[:100] = float("-inf")  # the first 1024 logits all -inf: the kernel is exact, the reference gives NaN (its doc)
    exact = _exact(h, w, b)
    torch.testing.assert_close(lm_head_lse(h, w, b, backend="triton").double(), exact, rtol=1e-6, atol=1e-5)
    assert torch.isnan(lm_head_lse_ref(h, w, b)).all()
    b[:] = float("-inf")  # every logit -inf: -inf, as logsumexp
    assert torch.isneginf(lm_head_lse(h, w, b, backend="triton")).all()
    assert lm_head_lse(h[:0], w, None, backend="triton").shape == (0,)


def test_reference_chunks_equal_one_pass():
    h, w, b = _inputs(6, 32, 5000, torch.float32, "cpu", seed=5)
    one = lm_head_lse_ref(h, w, b)
    for chunk in (1, 6 * 1024, 6 * 2048 + 5):
        torch.testing.assert_close(lm_head_lse_ref(h, w, b, chunk_elems=chunk), one)


def test_nan_logit_gives_nan_row(device):
    h, w, b = _inputs(4, 32, 700, torch.float32, device, seed=6)
    h[2, 5] = float("nan")
    for backend in ("triton", "torch"):
        got = lm_head_lse(h, w, b, backend=backend)
        assert torch.isnan(got[2]) and torch.isfinite(got[[0, 1, 3]]).all(), backend


def test_kernel_launch_is_capturable(device):
    """The Triton path's torch ops (buffers, the merge of the splits) record no host sync and no tensor made
    from Python data: a CUDA graph can capture it (``beam_search(graph_scope="search")``)."""
    h, w, b = _inputs(9, 32, 2000, torch.float32, device, seed=7)
    with _CaptureChecker() as checker:
        lm_head_lse(h, w, b, backend="triton")
        lm_head_lse(h, w, b, backend="torch")
    assert checker.bad == []


def test_input_errors():
    h, w, b = _inputs(3, 8, 50, torch.float32, "cpu", seed=8)
    with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor"):
        lm_head_lse(h[0], w)
    with pytest.raises(ValueError, match=r"weight must be \[V, H=8\]"):
        lm_head_lse(h, w[:, :4])
    with pytest.raises(ValueError, match="weight dtype torch.float64 differs"):
        lm_head_lse(h, w.double())
    with pytest.raises(ValueError, match=r"bias must be None or \[V=50\]"):
        lm_head_lse(h, w, b[:10])
    with pytest.raises(ValueError, match="hidden must be float32, float16 or bfloat16"):
        lm_head_lse(h.double(), w.double())
    with pytest.raises(ValueError, match="backend must be one of"):
        lm_head_lse(h, w, b, backend="cuda")


def test_kernel_compiles_for_sm90_without_spills(device):
    """The kernel compiled ahead of time for an H100 (sm_90), with a launch's specialisation (aligned pointers, H
    and the strides multiples of 16): the bf16 tiles of the search's shapes (Qwen2.5-0.5B head, H 896: level 0 of
    8 prompts, the 1,000 beam rows of 64 x 16 or 8 x 50 ... ) must lower to tensor-core dots (wgmma for the
    128-row tile) with no register spills; fp32 (the tests' dtype) must compile."""
    from genrec_fast.kernels import lse

    configs, tiles = [], []
    for dtype, rows in (("bfloat16", 1024), ("bfloat16", 8), ("float32", 33)):
        bm, bn, bk, warps = lse.tile_config(rows, 896, getattr(torch, dtype))
        ty = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
        configs.append({"const": {"HAS_BIAS": False, "IEEE": dtype == "float32", "BLOCK_M": bm, "BLOCK_N": bn,
                                  "BLOCK_K": bk},
                        "types": {"h_ptr": "*" + ty, "w_ptr": "*" + ty, "b_ptr": "*" + ty, "max_ptr": "*fp32",
                                  "sum_ptr": "*fp32"},
                        "options": {"num_warps": warps, "num_stages": 3},
                        "aligned": ["h_ptr", "w_ptr", "b_ptr", "max_ptr", "sum_ptr", "H", "stride_h", "stride_w"]})
        tiles.append([bm, bn, bk, warps])
    got = compile_sm90("genrec_fast.kernels.lse", "_lm_head_lse_kernel", configs, device)
    assert tiles[0] == [128, 128, 64, 8] and tiles[1][0] == 16
    for g, tile in zip(got[:2], tiles):
        assert g["mma"] and g["stack"] == 0, (tile, g)
    assert got[0]["wgmma"], got[0]
    assert len(got) == 3
