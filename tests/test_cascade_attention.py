"""Shared-prefix decode attention (``genrec_fast.ops.cascade``): the Triton kernel (interpreter on CPU) and
the torch reference against torch sdpa over the prompt K/V replicated to every beam row."""
import pytest
import torch

from genrec_fast.ops.cascade import cascade_attention, cascade_attention_ref

from sm90_aot import compile_sm90

# vs fp32 sdpa on the same (rounded) inputs. fp32: both compute in fp32, only the summation order differs.
# fp16/bf16: the output is rounded to the dtype (half an ulp: 2^-11 / 2^-8 relative) and the kernel rounds
# the probabilities to it before P @ V.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _dtypes(device):
    # the interpreter has no bf16
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def _inputs(P, B, H, Hkv, T, t, D, pads, dtype, device, seed, capacity=None):
    """Random q / prompt K/V / tails; prompt p left padded by pads[p]; the tails are views of the first t
    of ``capacity`` positions and q a transposed view, as in the search's buffers."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(P * B, 1, H, D, generator=gen).to(device, dtype).transpose(1, 2)[:, :, 0]  # [R, H, D] strided
    q = q.reshape(P, B, H, D)
    pk = torch.randn(P, Hkv, T, D, generator=gen).to(device, dtype)
    pv = torch.randn(P, Hkv, T, D, generator=gen).to(device, dtype)
    cap = max(t, 1) if capacity is None else capacity
    tk = torch.randn(P * B, Hkv, cap, D, generator=gen).to(device, dtype).view(P, B, Hkv, cap, D)[:, :, :, :t]
    tv = torch.randn(P * B, Hkv, cap, D, generator=gen).to(device, dtype).view(P, B, Hkv, cap, D)[:, :, :, :t]
    mask = torch.ones(P, T, dtype=torch.bool)
    for p, n in enumerate(pads):
        mask[p, :n] = False
    return q, pk, pv, mask.to(device), tk, tv


def _sdpa_replicated(q, pk, pv, mask, tk, tv, scale=None):
    """sdpa (fp32) over K/V copied per beam row and per query head: the attention of today's search."""
    P, B, H, D = q.shape
    Hkv, t = pk.shape[1], tk.shape[3]
    G = H // Hkv
    k = torch.cat([pk.float().repeat_interleave(B, 0), tk.float().reshape(P * B, Hkv, t, D)], 2)
    v = torch.cat([pv.float().repeat_interleave(B, 0), tv.float().reshape(P * B, Hkv, t, D)], 2)
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    keep = torch.cat([mask.repeat_interleave(B, 0), mask.new_ones(P * B, t)], 1)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q.float().reshape(P * B, H, 1, D), k, v, attn_mask=keep,
                                                           scale=scale)
    return out.reshape(P, B, H, D)


CASES = [  # P, B, H, Hkv, T, t, D, left pads per prompt
    (1, 1, 2, 2, 5, 0, 8, [0]),  # no GQA, no tail, head dim below tl.dot's 16
    (3, 5, 4, 2, 37, 1, 16, [0, 9, 36]),  # odd beams and prompt length; a prompt of one attended key
    (2, 7, 6, 2, 70, 2, 64, [3, 66]),  # G = 3, two key blocks, padding past the first block (skipped)
    (2, 3, 8, 1, 19, 3, 128, [1, 0]),  # MQA (one K/V head), D = 128, L - 1 = 3 tail positions
    (2, 20, 14, 2, 33, 2, 24, [5, 0]),  # Qwen2.5-0.5B's 7:1 grouping: 140 rows > one M block; D = 24 padded
]


@pytest.mark.parametrize("P,B,H,Hkv,T,t,D,pads", CASES)
def test_cascade_matches_sdpa_over_replicated_kv(P, B, H, Hkv, T, t, D, pads, device):
    for dtype in _dtypes(device):
        args = _inputs(P, B, H, Hkv, T, t, D, pads, dtype, device, seed=P * 100 + T, capacity=t + 2)
        want = _sdpa_replicated(*args)
        for backend in ("torch", "triton"):
            got = cascade_attention(*args, backend=backend)
            assert got.shape == (P, B, H, D) and got.dtype == dtype, backend
            torch.testing.assert_close(got.float(), want, rtol=TOL[dtype], atol=TOL[dtype],
                                       msg=lambda m, backend=backend, dtype=dtype: f"{backend} {dtype}: {m}")


@pytest.mark.parametrize("t", [0, 1, 2, 3])
def test_tail_lengths_and_scale(t, device):
    """Every tail length a 4-level search sees (0 .. L - 1), with a given scale; the two backends agree."""
    args = _inputs(2, 3, 4, 2, 21, t, 16, [4, 0], torch.float32, device, seed=7 + t)
    want = _sdpa_replicated(*args, scale=0.3)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(cascade_attention(*args, scale=0.3, backend=backend), want,
                                   rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_mask_holes_and_rows_with_nothing_attended(device):
    """The mask is honoured anywhere (not only as left padding); a prompt whose keys are all masked attends
    its tail only, and with no tail its rows are zeros (sdpa would give NaN), in both backends."""
    q, pk, pv, mask, tk, tv = _inputs(3, 2, 4, 2, 40, 1, 16, [0, 0, 0], torch.float32, device, seed=3)
    mask[0, 5:30] = False  # a hole
    mask[1] = False  # nothing in the prompt: the tail only
    want = _sdpa_replicated(q, pk, pv, mask, tk, tv)
    for backend in ("torch", "triton"):
        torch.testing.assert_close(cascade_attention(q, pk, pv, mask, tk, tv, backend=backend), want,
                                   rtol=TOL[torch.float32], atol=TOL[torch.float32])
        got = cascade_attention(q, pk, pv, mask, tk[:, :, :, :0], tv[:, :, :, :0], backend=backend)
        assert torch.equal(got[1], torch.zeros_like(got[1])), backend
        want0 = _sdpa_replicated(q, pk, pv, mask, tk[:, :, :, :0], tv[:, :, :, :0])
        torch.testing.assert_close(got[[0, 2]], want0[[0, 2]], rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_reference_is_not_sdpa_without_the_mask_or_tail(device):
    """The comparison can fail: dropping the left-padding mask or the tail changes the result."""
    q, pk, pv, mask, tk, tv = _inputs(2, 3, 4, 2, 12, 2, 16, [5, 0], torch.float32, device, seed=4)
    want = _sdpa_replicated(q, pk, pv, mask, tk, tv)
    assert not torch.allclose(cascade_attention_ref(q, pk, pv, torch.ones_like(mask), tk, tv)[0], want[0], atol=1e-3)
    assert not torch.allclose(cascade_attention_ref(q, pk, pv, mask, tk[:, :, :, :1], tv[:, :, :, :1]), want, atol=1e-3)


def test_cascade_input_errors():
    q, pk, pv, mask, tk, tv = _inputs(2, 3, 4, 2, 12, 1, 16, [0, 0], torch.float32, torch.device("cpu"), seed=5)
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor \[P, B, H, D\]"):
        cascade_attention(q[0], pk, pv, mask, tk, tv)
    with pytest.raises(ValueError, match="heads are not a multiple of prefix_k's 3 K/V heads"):
        cascade_attention(q, pk[:, :1].expand(2, 3, 12, 16), pv[:, :1].expand(2, 3, 12, 16), mask, tk, tv)
    with pytest.raises(ValueError, match=r"prefix_mask must be a bool tensor of shape \(2, 12\)"):
        cascade_attention(q, pk, pv, mask.long(), tk, tv)
    with pytest.raises(ValueError, match=r"tail_k must be \[P=2, B=3, Hkv=2, t, D=16\]"):
        cascade_attention(q, pk, pv, mask, tk[:, :2], tv[:, :2])
    with pytest.raises(ValueError, match="prefix_v dtype torch.float16 differs from q's torch.float32"):
        cascade_attention(q, pk, pv.half(), mask, tk, tv)
    with pytest.raises(ValueError, match="scale must be > 0"):
        cascade_attention(q, pk, pv, mask, tk, tv, scale=0.0)


def test_kernel_compiles_for_sm90_without_spills(device):
    """The kernel compiled ahead of time for an H100 (sm_90) on this machine, with the launch's pointer and stride
    specialisation: the interpreter runs none of Triton's GPU lowering, this does. The bf16 / fp16 tiles must lower
    to tensor-core dots (Hopper's wgmma for the 128-row production tile, mma.sync for a 32-row one) with no
    register spills; fp32 (the tiny-model tests) must compile. On a GPU the other tests compile and run it."""
    from genrec_fast.kernels import cascade

    # Qwen2.5-0.5B at 8 x 50 beams (350 rows of 7 heads per K/V head, D 64), D 128 in fp16, the tiny test model
    configs, tiles = [], []
    names = cascade._cascade_kernel.arg_names
    for dtype, rows, T, D in (("bfloat16", 350, 128, 64), ("float16", 24, 19, 128), ("float32", 16, 16, 8)):
        bd, bm, bn, warps = cascade.tile_config(rows, T, D, getattr(torch, dtype))
        ty = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
        types = {a: ("*u8" if a == "mask_ptr" else "*" + ty) for a in names if a.endswith("_ptr")}
        configs.append({"const": {"D": D, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IEEE": dtype == "float32"},
                        "types": {**types, "scale": "fp32"}, "options": {"num_warps": warps},
                        "aligned": [a for a in names if a.endswith("_ptr") or (a.startswith("s") and a != "scale")]})
        tiles.append([bm, bn, bd, warps])
    got = compile_sm90("genrec_fast.kernels.cascade", "_cascade_kernel", configs, device)
    for g, dtype, tile in zip(got, ("bfloat16", "float16", "float32"), tiles):
        g.update(dtype=dtype, tile=tile)
    assert len(got) == 3
    for g in got[:2]:
        assert g["mma"] and g["stack"] == 0, g
    assert got[0]["tile"] == [128, 64, 64, 8] and got[0]["wgmma"], got[0]
