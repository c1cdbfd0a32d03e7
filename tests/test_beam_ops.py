"""Beam ops: Triton kernels (interpreter on CPU) vs the torch references, and the references vs
their definitions (full-vocabulary log-softmax; brute-force sorted candidate lists)."""
import pytest
import torch

from genrec_fast.ops.beam import MAX_TOPK_CANDIDATES, grouped_topk, trie_log_softmax, trie_log_softmax_ref

from sm90_aot import compile_sm90

NEG_INF = float("-inf")
TOL = 1e-5  # kernel and reference both upcast the same inputs and compute in fp32, whatever the input dtype


def _dtypes(device):
    # the interpreter has no bf16
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def _random_rows(R, K, gen, device, dtype=torch.float32):
    logits = (torch.randn(R, K, generator=gen) * 3).to(device=device, dtype=dtype)
    allowed = (torch.rand(R, K, generator=gen) < 0.4).to(device)
    parent = (torch.randn(R, generator=gen) * 5).to(device)
    if R > 2:
        allowed[1] = False  # a row with nothing allowed
        parent[2] = NEG_INF  # a padding beam
    allowed[0, K - 1] = True
    return logits, allowed, parent


@pytest.mark.parametrize("R,K", [(1, 1), (7, 13), (33, 130), (5, 257)])
@pytest.mark.parametrize("with_lse", [True, False])
def test_trie_log_softmax_triton_matches_ref(R, K, with_lse, device):
    gen = torch.Generator().manual_seed(R * 1000 + K)
    for dtype in _dtypes(device):
        logits, allowed, parent = _random_rows(R, K, gen, device, dtype)
        lse = (torch.randn(R, generator=gen).to(device) + 4) if with_lse else None
        ref = trie_log_softmax(logits, allowed, parent, lse, backend="torch")
        tri = trie_log_softmax(logits, allowed, parent, lse, backend="triton")
        assert tri.dtype == ref.dtype == torch.float32 and tri.shape == (R, K)
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(tri))
        assert torch.equal(ref[~finite], tri[~finite])  # all -inf, never NaN
        if finite.any():
            torch.testing.assert_close(tri[finite], ref[finite], rtol=TOL, atol=TOL)


def test_trie_log_softmax_full_vocab_equals_masked_log_softmax(device):
    gen = torch.Generator().manual_seed(1)
    R, V, lo, K = 6, 50, 17, 11
    full = (torch.randn(R, V, generator=gen) * 4).to(device)
    allowed = (torch.rand(R, K, generator=gen) < 0.5).to(device)
    allowed[:, 3] = True
    parent = torch.randn(R, generator=gen).to(device)
    out = trie_log_softmax_ref(full[:, lo:lo + K], allowed, parent, torch.logsumexp(full, 1))
    expect = torch.log_softmax(full, 1)[:, lo:lo + K] + parent[:, None]
    torch.testing.assert_close(out[allowed], expect[allowed])
    assert torch.isneginf(out[~allowed]).all()


def test_trie_log_softmax_sid_normalises_over_allowed(device):
    gen = torch.Generator().manual_seed(2)
    logits, allowed, parent = _random_rows(9, 20, gen, device)
    for backend in ("torch", "triton"):
        out = trie_log_softmax(logits, allowed, parent, None, backend=backend)
        live = allowed.any(1) & torch.isfinite(parent)
        mass = torch.exp(out - parent[:, None]).sum(1)
        torch.testing.assert_close(mass[live], torch.ones_like(mass[live]))
        assert torch.isneginf(out[~live]).all()


def _brute_topk(scores, child, k):
    """Python sort of every candidate by (-score, code, parent); -inf ones dropped, then padded."""
    P, NB, K = scores.shape
    rows = []
    for p in range(P):
        cands = [(-scores[p, b, c].item(), c, b) for b in range(NB) for c in range(K) if scores[p, b, c] > NEG_INF]
        cands.sort()
        picked = [(b, c, -s, int(child[p, b, c])) for s, c, b in cands[:k]]
        picked += [(-1, -1, NEG_INF, -1)] * (k - len(picked))
        rows.append(picked)
    return rows


@pytest.mark.parametrize("P,NB,K,k", [(1, 1, 1, 1), (3, 1, 9, 5), (4, 5, 7, 5), (2, 3, 4, 20), (5, 6, 33, 6)])
def test_grouped_topk_triton_matches_ref_and_brute_force(P, NB, K, k, device):
    gen = torch.Generator().manual_seed(P * 97 + NB * 13 + K)
    # integer-valued scores: many exact ties exercise the (code, parent) tie order
    scores = torch.randint(-3, 4, (P, NB, K), generator=gen).float()
    scores[torch.rand(P, NB, K, generator=gen) < 0.3] = NEG_INF
    if P > 1:
        scores[1] = NEG_INF
        scores[1, 0, K - 1] = 0.5  # a prompt with one valid candidate
    child = torch.randint(0, 1000, (P, NB, K), generator=gen, dtype=torch.int32)
    scores, child = scores.to(device), child.to(device)
    ref = grouped_topk(scores, child, k, backend="torch")
    tri = grouped_topk(scores, child, k, backend="triton")
    for name, a, b in zip(("parent", "code", "score", "node"), ref, tri):
        assert a.shape == (P, k) and a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    brute = _brute_topk(scores.cpu(), child.cpu(), k)
    got = [list(zip(*(t[p].cpu().tolist() for t in ref))) for p in range(P)]
    assert got == [[tuple(x) for x in row] for row in brute]


def test_grouped_topk_random_float_scores(device):
    gen = torch.Generator().manual_seed(5)
    P, NB, K, k = 6, 10, 41, 10
    scores = (torch.randn(P, NB, K, generator=gen) * 10).to(device)
    scores[torch.rand(P, NB, K, generator=gen).to(device) < 0.7] = NEG_INF
    child = torch.arange(P * NB * K, dtype=torch.int32).view(P, NB, K).to(device)
    ref = grouped_topk(scores, child, k, backend="torch")
    tri = grouped_topk(scores, child, k, backend="triton")
    for a, b in zip(ref, tri):
        assert torch.equal(a, b)
    parent, code, best, node = ref
    assert (best[:, :-1] >= best[:, 1:]).all()  # best first
    flat_idx = (torch.arange(P, device=device)[:, None] * NB + parent) * K + code
    assert torch.equal(node.long(), flat_idx)  # node is the candidate's own child entry
    torch.testing.assert_close(best, scores.view(P, -1).gather(1, parent * K + code))


def test_op_input_errors():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="allowed must be a bool tensor"):
        trie_log_softmax(x, torch.ones(3, 4, dtype=torch.int32), torch.zeros(3))
    with pytest.raises(ValueError, match="parent_scores must have shape"):
        trie_log_softmax(x, torch.ones(3, 4, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="scores must be a 3-D tensor"):
        grouped_topk(x, x.int(), 2)
    with pytest.raises(ValueError, match="child must be a signed integer tensor"):
        grouped_topk(x[None], x[None], 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        grouped_topk(x[None], x[None].int(), 0)
    with pytest.raises(ValueError, match="child must be a signed integer tensor"):
        grouped_topk(x[None], x[None].to(torch.uint8), 2)


def test_backend_choice(monkeypatch):
    from genrec_fast.ops.backend import resolve_backend

    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' on a cpu tensor needs TRITON_INTERPRET=1"):
        trie_log_softmax(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool), torch.zeros(3), backend="triton")


def test_degenerate_rows_agree_across_backends(device):
    """score='sid' with every allowed logit -inf gives -inf (not NaN) on both backends; NaN candidates are
    never picked by either top-k (beam_search reports NaN itself)."""
    logits = torch.tensor([[NEG_INF, NEG_INF, 1.0], [0.5, 2.0, 1.0]], device=device)
    allowed = torch.tensor([[True, True, False], [True, True, True]], device=device)
    parent = torch.zeros(2, device=device)
    ref = trie_log_softmax(logits, allowed, parent, backend="torch")
    tri = trie_log_softmax(logits, allowed, parent, backend="triton")
    assert torch.isneginf(ref[0]).all() and torch.isneginf(tri[0]).all()
    torch.testing.assert_close(ref[1], tri[1])
    # an allowed +inf logit: NaN at that entry only (the norm is +inf), -inf where not allowed, both backends
    inf = float("inf")
    logits = torch.tensor([[inf, 1.0, 2.0, 0.0]], device=device)
    allowed = torch.tensor([[True, True, True, False]], device=device)
    for lse in (None, torch.tensor([3.0], device=device)):
        ref = trie_log_softmax(logits, allowed, torch.zeros(1, device=device), lse, backend="torch")
        tri = trie_log_softmax(logits, allowed, torch.zeros(1, device=device), lse, backend="triton")
        assert torch.equal(torch.isnan(ref), torch.isnan(tri)) and torch.equal(torch.isneginf(ref), torch.isneginf(tri))
        ok = ~torch.isnan(ref)
        assert torch.equal(ref[ok], tri[ok])
        if lse is None:  # the norm is +inf: inf - inf = NaN at the +inf entry, finite - inf = -inf elsewhere
            assert torch.isnan(ref[0, 0]) and torch.isneginf(ref[0, 1:]).all()
    nan = float("nan")
    scores = torch.tensor([[[nan, 1.0, 1.0]], [[nan, nan, nan]], [[0.5, nan, 2.0]]], device=device)
    child = torch.arange(9, device=device, dtype=torch.int32).view(3, 1, 3)
    a = grouped_topk(scores, child, 2, backend="torch")
    b = grouped_topk(scores, child, 2, backend="triton")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[1].tolist() == [[1, 2], [-1, -1], [2, 0]]


def test_grouped_topk_production_sizes_with_ties(device):
    """50 beams x 256 codes (a 16384-wide block, many warps on a GPU): integer scores tie a lot, so the
    (code, parent) order decides most picks."""
    gen = torch.Generator().manual_seed(11)
    P, NB, K, k = 2, 50, 256, 50
    scores = torch.randint(-2, 3, (P, NB, K), generator=gen).float()
    scores[torch.rand(P, NB, K, generator=gen) < 0.5] = NEG_INF
    child = torch.randint(0, 10**6, (P, NB, K), generator=gen, dtype=torch.int32)
    scores, child = scores.to(device), child.to(device)
    ref = grouped_topk(scores, child, k, backend="torch")
    tri = grouped_topk(scores, child, k, backend="triton")
    for name, a, b in zip(("parent", "code", "score", "node"), ref, tri):
        assert torch.equal(a, b), name
    brute = _brute_topk(scores.cpu(), child.cpu(), k)
    assert [list(zip(*(t[p].cpu().tolist() for t in ref))) for p in range(P)] == [[tuple(x) for x in r] for r in brute]


def test_grouped_topk_over_the_kernel_limit(device, monkeypatch):
    """More than MAX_TOPK_CANDIDATES per prompt: the kernel refuses, backend='auto' takes the reference."""
    import genrec_fast.ops.beam as ops_beam

    gen = torch.Generator().manual_seed(12)
    NB, K = 257, 256  # 65792 > 65536
    scores = torch.randn(1, NB, K, generator=gen).to(device)
    child = torch.zeros(1, NB, K, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="exceeds the kernel's 65536"):
        grouped_topk(scores, child, 4, backend="triton")
    # auto -> triton, as on a GPU
    monkeypatch.setattr(ops_beam, "resolve_backend", lambda backend, dev: "torch" if backend == "torch" else "triton")
    got = grouped_topk(scores, child, 4, backend="auto")
    for a, b in zip(got, grouped_topk(scores, child, 4, backend="torch")):
        assert torch.equal(a, b)


def test_kernels_compile_for_sm90(device):
    """Both beam kernels compiled ahead of time for an H100 (sm_90) at their launches' configs: trie_log_softmax
    for fp32 and bf16 logits, with and without the full-vocabulary log-sum-exp, over 256 codes (the benches'
    codebooks) and 4,096; grouped_topk for 16 x 256 and 50 x 256 candidates per prompt, which must keep them in
    registers (no spill), and the largest block the op sends to the kernel (MAX_TOPK_CANDIDATES), which must
    compile."""
    from genrec_fast.kernels import beam

    configs = []
    for ty, has_lse, codes in (("fp32", False, 256), ("bf16", True, 256), ("bf16", False, 4096)):
        block, warps = beam.log_softmax_launch(codes)
        configs.append({"const": {"HAS_LSE": has_lse, "BLOCK_K": block},
                        "types": {"logits_ptr": "*" + ty, "allowed_ptr": "*u8", "parent_ptr": "*fp32",
                                  "lse_ptr": "*fp32", "out_ptr": "*fp32"},
                        "options": {"num_warps": warps, "num_stages": 3},
                        "aligned": ["logits_ptr", "allowed_ptr", "parent_ptr", "lse_ptr", "out_ptr"]})
    got = compile_sm90("genrec_fast.kernels.beam", "_trie_log_softmax_kernel", configs, device)
    assert len(got) == 3 and all(g["stack"] == 0 for g in got), got

    configs = []
    for candidates in (16 * 256, 50 * 256, MAX_TOPK_CANDIDATES):
        block, warps = beam.topk_launch(candidates)
        configs.append({"const": {"BLOCK": block},
                        "types": {"scores_ptr": "*fp32", "child_ptr": "*i32", "parent_out": "*i64",
                                  "code_out": "*i64", "score_out": "*fp32", "node_out": "*i32"},
                        "options": {"num_warps": warps, "num_stages": 3}, "aligned": ["scores_ptr", "child_ptr"]})
    got = compile_sm90("genrec_fast.kernels.beam", "_grouped_topk_kernel", configs, device)
    assert [c["const"]["BLOCK"] for c in configs] == [4096, 16384, 65536]
    assert len(got) == 3 and got[0]["stack"] == 0 and got[1]["stack"] == 0, got
