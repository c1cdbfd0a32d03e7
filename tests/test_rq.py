"""residual_quantize: Triton kernel (interpreter on CPU) vs the torch reference, autograd, errors."""
import os
import subprocess
import sys

import pytest
import torch

from genrec_fast.ops.rq import codeword_norms, residual_quantize, residual_quantize_ref

TOL = {torch.float32: 1e-4, torch.float16: 2e-2}


def _dtypes(device):
    return [torch.float32, torch.float16, torch.bfloat16] if device.type == "cuda" else [torch.float32, torch.float16]


def _path_check(x, codebooks, codes, xhat, norms, tol):
    """The codes are a valid greedy path: at every level the chosen codeword is within ``tol``
    of the best one (fp64, following the codes' own residuals); x_hat and norms match that path."""
    xd, cb = x.double(), codebooks.double()
    r = xd.clone()
    for lvl in range(cb.shape[0]):
        d = torch.cdist(r, cb[lvl]).pow(2)
        chosen = d.gather(1, codes[:, lvl].long().unsqueeze(1)).squeeze(1)
        scale = 1.0 + r.pow(2).sum(1)
        assert (chosen - d.min(1).values <= tol * scale).all(), f"level {lvl}: a code is not the nearest codeword"
        r = r - cb[lvl][codes[:, lvl].long()]
        assert torch.allclose(norms[:, lvl].double(), r.pow(2).sum(1), rtol=tol, atol=tol * 10)
    assert torch.allclose(xhat.double(), xd - r, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("shape", [(97, 13, 3, 37), (33, 32, 2, 130), (1, 5, 1, 1), (70, 40, 3, 64)])
def test_triton_matches_reference(shape, device):
    n, d, levels, k = shape
    for dtype in _dtypes(device):
        g = torch.Generator().manual_seed(n * 7 + k)
        x = torch.randn(n, d, generator=g).to(device, dtype)
        scale = torch.tensor([1.0, 0.5, 0.25][:levels]).view(-1, 1, 1)
        cb = (torch.randn(levels, k, d, generator=g) * scale).to(device, dtype)
        c1, h1, n1 = residual_quantize(x, cb, backend="triton", return_norms=True)
        c2, h2, n2 = residual_quantize_ref(x, cb, return_norms=True)
        assert c1.dtype == torch.int32 and c1.shape == (n, levels) and h1.dtype == dtype and h1.shape == (n, d)
        tol = TOL.get(dtype, 5e-2)
        _path_check(x.float(), cb.float(), c1, h1.float(), n1, tol)
        # the reference computes in fp32; only its x_hat is rounded to the input dtype
        _path_check(x.float(), cb.float(), c2, h2.float(), n2, 1e-5 if dtype == torch.float32 else 2e-3)
        # same quality: the final squared error agrees on average, and near-ties are rare
        assert abs(n1[:, -1].mean() - n2[:, -1].mean()) <= tol * (1 + n2[:, -1].mean())
        assert (c1 == c2).all(1).float().mean() >= (0.99 if dtype == torch.float32 else 0.7)


def test_every_autotune_config_matches_the_reference(device):
    """The GPU autotuner picks any of kernels.rq.CONFIGS (the tests otherwise run one): each must give a
    valid greedy path, the reference's codes, and ties to the lowest index across its own tiles."""
    from genrec_fast.kernels import rq as rq_kernels

    g = torch.Generator().manual_seed(3)
    n, d, levels, k = 300, 20, 3, 300  # more rows and codes than the largest BLOCK_N / BLOCK_K
    x = torch.randn(n, d, generator=g)
    cb = torch.randn(levels, k, d, generator=g) * torch.tensor([1.0, 0.5, 0.25]).view(-1, 1, 1)
    cb[0, 290] = cb[0, 5]  # the same codeword twice, in different tiles for every BLOCK_K
    x[7] = cb[0, 5]
    x, cb = x.to(device), cb.to(device)
    c2 = residual_quantize_ref(x, cb)[0]
    for config in rq_kernels.CONFIGS:
        c1, h1, n1 = rq_kernels.rq_forward(x, cb, codeword_norms(cb), config=config)
        _path_check(x, cb, c1, h1, n1, 1e-4)
        assert int(c1[7, 0]) == 5, config
        assert (c1 == c2).all(1).float().mean() >= 0.99, config


def test_reference_chunks_agree_with_one_block(monkeypatch):
    """The torch reference (the CPU path) scores rows in chunks of _REF_CHUNK_ELEMS // K; small chunks,
    a ragged last one included, give the same result as one block."""
    import genrec_fast.ops.rq as ops_rq

    g = torch.Generator().manual_seed(4)
    x, cb = torch.randn(103, 9, generator=g), torch.randn(3, 17, 9, generator=g)
    whole = residual_quantize_ref(x, cb, return_norms=True)
    monkeypatch.setattr(ops_rq, "_REF_CHUNK_ELEMS", 17 * 10)  # 10 rows per chunk: 11 chunks, the last of 3
    chunked = residual_quantize_ref(x, cb, return_norms=True)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)
    d = torch.cdist(x.double(), cb[0].double())
    assert torch.equal(chunked[0][:, 0].long(), d.argmin(1))


def test_ties_go_to_lowest_index_across_tiles(device):
    torch.manual_seed(0)
    k, d = 150, 8
    cb = torch.randn(1, k, d) * 5
    cb[0, 100] = cb[0, 3]  # same codeword twice, in different BLOCK_K tiles
    cb[0, 140] = cb[0, 77]
    x = torch.cat([cb[0, [3, 77, 100, 140]], torch.zeros(1, d)]) + 0.0
    cb[0, 120] = 0.0
    cb[0, 130] = 0.0
    for impl in (residual_quantize_ref, lambda a, b: residual_quantize(a, b, backend="triton")):
        codes, xhat = impl(x.to(device), cb.to(device))
        assert codes[:, 0].tolist() == [3, 77, 3, 77, 120]
        assert torch.allclose(xhat.cpu(), x)


def test_identical_codewords_resolve_to_the_lowest_index_everywhere(device):
    """The tie contract (genrec_fast.ops.rq): among identical codewords the lowest index wins, in every
    tile of every config and in the reference, for rows at and near the codeword, at every level."""
    from genrec_fast.kernels import rq as rq_kernels

    g = torch.Generator().manual_seed(11)
    levels, k, d = 2, 300, 16
    cb = torch.randn(levels, k, d, generator=g) * torch.tensor([1.0, 0.3]).view(-1, 1, 1)
    firsts = torch.randperm(k // 2, generator=g)[:24]
    for j, i in enumerate(firsts.tolist()):
        for lvl in range(levels):
            cb[lvl, k - 1 - j] = cb[lvl, i]  # a copy in a later tile for every BLOCK_K in CONFIGS
            cb[lvl, i + 1 + (j % 3)] = cb[lvl, i] if j % 5 == 0 else cb[lvl, i + 1 + (j % 3)]  # and in the same tile
    rows = firsts.repeat_interleave(4)
    x = cb[0, rows] + 0.001 * torch.randn(len(rows), d, generator=g)
    x[::4] = cb[0, firsts]  # exactly on the codeword: a true tie between the copies
    norms = codeword_norms(cb)
    assert torch.isinf(norms).sum() == levels * (24 + 5)  # each later copy, never the first
    assert torch.isfinite(norms[:, firsts]).all()
    expect = rows.tolist()
    x, cb = x.to(device), cb.to(device)
    got = [residual_quantize_ref(x, cb)[0], residual_quantize(x, cb, backend="triton")[0]]
    got += [rq_kernels.rq_forward(x, cb, codeword_norms(cb), config=c)[0] for c in rq_kernels.CONFIGS]
    for codes in got:
        assert codes[:, 0].tolist() == expect
    # the second level's pick may be any code, but the same one in every implementation
    for codes in got[1:]:
        assert torch.equal(codes[:, 1].cpu(), got[0][:, 1].cpu())


def test_empty_input(device):
    cb = torch.randn(2, 5, 4, device=device)
    for backend in ("torch", "triton"):
        codes, xhat = residual_quantize(torch.empty(0, 4, device=device), cb, backend=backend)
        assert codes.shape == (0, 2) and xhat.shape == (0, 4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_straight_through_and_codeword_grads(backend, device):
    g = torch.Generator().manual_seed(1)
    n, d, levels, k = 41, 9, 3, 23
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    cb = (torch.randn(levels, k, d, generator=g) * 0.7).to(device).requires_grad_()
    w = torch.randn(n, d, generator=g).to(device)
    codes, xhat = residual_quantize(x, cb, backend=backend)
    assert not codes.requires_grad and xhat.requires_grad
    (xhat * w).sum().backward()
    # explicit: x_hat = sum_l C_l[k_l] with a straight-through path to x
    cb2 = cb.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    q = sum(cb2[lvl][codes[:, lvl].long()] for lvl in range(levels))
    ((q + x2 - x2.detach()) * w).sum().backward()
    assert torch.allclose(x.grad, w) and torch.allclose(x.grad, x2.grad)
    assert torch.allclose(cb.grad, cb2.grad, atol=1e-5)
    assert (cb.grad.abs().sum(-1) > 0).sum() == sum(codes[:, lvl].unique().numel() for lvl in range(levels))


def test_backends_give_same_gradients(device):
    # well separated codewords (no near-ties), so both backends pick the same codes
    g = torch.Generator().manual_seed(2)
    cb = torch.randn(2, 19, 11, generator=g) * torch.tensor([4.0, 1.0]).view(-1, 1, 1)
    idx = torch.randint(19, (57, 2), generator=g)
    x = cb[0][idx[:, 0]] + cb[1][idx[:, 1]] + 0.01 * torch.randn(57, 11, generator=g)
    grads = []
    for backend in ("torch", "triton"):
        xx = x.clone().to(device).requires_grad_()
        cc = cb.clone().to(device).requires_grad_()
        codes, xhat = residual_quantize(xx, cc, backend=backend)
        ((xhat - xx.detach()) ** 2).sum().backward()
        grads.append((codes.cpu(), xx.grad.cpu(), cc.grad.cpu()))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
    assert torch.allclose(grads[0][2], grads[1][2], atol=1e-4)


def test_bad_inputs_are_named():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="2-D"):
        residual_quantize(torch.randn(4), torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="D=3 but codebooks have D=5"):
        residual_quantize(x, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="dtype"):
        residual_quantize(x, torch.randn(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        residual_quantize(x.long(), torch.randn(2, 4, 3).long())
    with pytest.raises(ValueError, match="backend"):
        residual_quantize(x, torch.randn(2, 4, 3), backend="cuda")


def test_autotune_switch_is_checked():
    code = "import genrec_fast.kernels.rq"
    env = {**os.environ, "GENREC_FAST_AUTOTUNE": "yes", "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "GENREC_FAST_AUTOTUNE must be 0 or 1, got 'yes'" in r.stderr
    env["GENREC_FAST_AUTOTUNE"] = "0"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
