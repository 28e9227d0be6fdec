"""Tests for kdlm.losses.ranking: soft rank (Blondel et al. 2020), RLKD ranking loss, peak-alignment metrics."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from conftest import load_fixture_cases

from kdlm.losses.ranking import peak_alignment_metrics, ranking_loss, soft_rank, topk_overlap

@pytest.fixture(scope="module")
def fixture():
    tensors, meta = load_fixture_cases()
    return meta, tensors


# ------------------------------------------------------------------------------------------- golden fixture


def test_fixture_rank_k5_value_and_grad(fixture):
    meta, t = fixture
    params = meta["cases"]["rank_k5"]["params"]
    assert params["regularization"] == "l2"
    student = t["student_logits"].clone().requires_grad_(True)
    loss = ranking_loss(
        student, t["teacher_logits"], t["mask"], k=params["k"],
        regularization_strength=params["regularization_strength"],
    )
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.reshape(1), t["rank_k5.value"], rtol=1e-4, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(student.grad, t["rank_k5.grad"], rtol=1e-4, atol=1e-6)
    # masked positions get no gradient
    assert torch.all(student.grad[t["mask"] == 0] == 0)


def test_fixture_num_tokens_and_teacher_detached(fixture):
    _, t = fixture
    teacher = t["teacher_logits"].clone().requires_grad_(True)
    mask = t["mask"]
    n = int(mask.sum())
    mean = ranking_loss(t["student_logits"], teacher, mask, k=5)
    summed = ranking_loss(t["student_logits"], teacher, mask, k=5, num_tokens=3 * n)
    torch.testing.assert_close(summed * 3, mean, rtol=1e-6, atol=1e-7)
    assert not mean.requires_grad  # nothing to differentiate: student is a leaf without grad, teacher detached


# ------------------------------------------------------------------------------------------- soft rank


@functools.lru_cache(maxsize=None)
def _vertex_subsets(n: int):
    """For m = 1..n: every m-subset of the vertices of conv{permutations of (1..n)} and the pseudo-inverse of
    its edge matrix (the affine-hull parametrisation), independent of the point being projected."""
    verts = torch.tensor(list(itertools.permutations(range(1, n + 1))), dtype=torch.float64)
    out = []
    for m in range(1, n + 1):
        V = verts[torch.tensor(list(itertools.combinations(range(len(verts)), m)))]  # [N, m, n]
        D = (V[:, 1:] - V[:, :1]).transpose(1, 2)  # [N, n, m-1]
        out.append((V, D, torch.linalg.pinv(D) if m > 1 else None))
    return out


def _brute_force_projection(z: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of z [n] onto conv{permutations of (1..n)} by enumeration.

    The projection lies in the relative interior of the convex hull of some affinely independent set S of at
    most n vertices (Caratheodory), where it equals the projection onto aff(S). Enumerate every such S,
    project onto aff(S), keep the candidates with non-negative barycentric coordinates, return the closest.
    """
    best, best_d = None, float("inf")
    for V, D, Dp in _vertex_subsets(z.numel()):
        v0 = V[:, 0]
        if Dp is None:
            cand, lam_ok = v0, torch.ones(len(V), dtype=torch.bool)
        else:
            mu = Dp @ (z - v0).unsqueeze(-1)  # [N, m-1, 1]
            cand = v0 + (D @ mu).squeeze(-1)
            lam = torch.cat([1 - mu.sum(1), mu.squeeze(-1)], dim=1)
            lam_ok = (lam >= -1e-10).all(1)  # sum(lam * V) == cand by construction
        d = ((cand - z) ** 2).sum(1).masked_fill(~lam_ok, float("inf"))
        i = int(d.argmin())
        if d[i] < best_d:
            best, best_d = cand[i], float(d[i])
    return best


@pytest.mark.parametrize("n", [2, 3, 4])
def test_soft_rank_matches_brute_force_projection(n):
    g = torch.Generator().manual_seed(n)
    cases = [torch.randn(n, generator=g, dtype=torch.float64) * s for s in (0.3, 1.0, 3.0)]
    cases.append(torch.tensor([0.5] * (n - 1) + [2.0], dtype=torch.float64))  # ties
    for x in cases:
        for eps in (0.5, 1.0, 2.0):
            for direction, sign in (("ascending", 1.0), ("descending", -1.0)):
                expected = _brute_force_projection(sign * x / eps)
                got = soft_rank(x, eps, direction)
                torch.testing.assert_close(got, expected, rtol=0, atol=1e-8)


def test_soft_rank_n2_closed_form():
    # P{(1,2),(2,1)} is a segment: r_1 = clip((3 + z1 - z2) / 2, 1, 2)
    x = torch.tensor([[0.0, 0.3], [0.0, 5.0], [1.0, -0.4], [2.0, 2.0]], dtype=torch.float64)
    r = soft_rank(x, 1.0)
    r1 = ((3 + x[:, 0] - x[:, 1]) / 2).clamp(1, 2)
    torch.testing.assert_close(r, torch.stack([r1, 3 - r1], 1))


def test_soft_rank_kkt_certificate_n5():
    """Projection certificate: r in P (majorisation) and <z - r, v - r> <= 0 for every vertex v of P."""
    n = 5
    verts = torch.tensor(list(itertools.permutations(range(1, n + 1))), dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, n, generator=g, dtype=torch.float64) * torch.tensor([0.2, 1.0, 4.0, 0.5]).repeat(16)[:, None]
    x[0] = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    for eps in (0.3, 1.0):
        r = soft_rank(x, eps)
        z = x / eps
        rs = r.sort(dim=1, descending=True).values.cumsum(1)
        w = torch.arange(n, 0, -1, dtype=torch.float64).cumsum(0)
        assert torch.all(rs <= w + 1e-9) and torch.allclose(rs[:, -1], w[-1].expand(64))
        vi = ((z - r).unsqueeze(1) * (verts.unsqueeze(0) - r.unsqueeze(1))).sum(-1)
        assert vi.max() <= 1e-9


def test_soft_rank_hard_limit_and_ties():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g)
    hard = (x.argsort(dim=-1).argsort(dim=-1) + 1).float()
    torch.testing.assert_close(soft_rank(x, 1e-4), hard)
    torch.testing.assert_close(soft_rank(x, 1e-4, "descending"), 13 - hard)
    # the distance to the hard rank shrinks monotonically with the strength
    errs = [(soft_rank(x, eps) - hard).abs().max().item() for eps in (3.0, 1.0, 0.3, 0.1, 0.03, 0.01)]
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] > 0
    # ties: equal values share (the average of) their ranks
    t = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    torch.testing.assert_close(soft_rank(t, 1e-4), torch.tensor([4.0, 1.0, 4.0, 2.0, 4.0]))
    r = soft_rank(t, 1.0)
    assert r[0] == r[2] == r[4]
    # large strength: everything tends to the mean rank (n + 1) / 2
    torch.testing.assert_close(soft_rank(x, 1e6), torch.full_like(x, 6.5), atol=1e-4, rtol=0)


def test_soft_rank_properties():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, 9, generator=g, dtype=torch.float64) * 2
    r = soft_rank(x, 0.7)
    assert r.shape == x.shape
    torch.testing.assert_close(r.sum(-1), torch.full((4, 7), 45.0, dtype=torch.float64))
    torch.testing.assert_close(soft_rank(x, 0.7, "descending"), 10 - r)
    # shift invariance, permutation equivariance
    torch.testing.assert_close(soft_rank(x + 3.0, 0.7), r)
    perm = torch.randperm(9, generator=g)
    torch.testing.assert_close(soft_rank(x[..., perm], 0.7), r[..., perm])
    # monotone: larger value, larger ascending rank
    order = x.argsort(-1)
    assert torch.all(torch.diff(r.gather(-1, order), dim=-1) >= -1e-12)
    with pytest.raises(ValueError):
        soft_rank(x, 1.0, "up")
    assert soft_rank(torch.tensor([[4.0]]), 1.0).item() == 1.0


@pytest.mark.parametrize("direction", ["ascending", "descending"])
def test_soft_rank_gradcheck(direction):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 0.7, direction), (x,))
    y = (torch.randn(4, 10, generator=g, dtype=torch.float64) * 0.2).requires_grad_(True)  # heavy pooling
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 1.0, direction), (y,))


def test_ranking_loss_gradcheck():
    g = torch.Generator().manual_seed(4)
    s = (torch.randn(2, 3, 16, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = torch.randn(2, 3, 16, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: ranking_loss(v, t, mask, k=4), (s,))


# ------------------------------------------------------------------------------------------- ranking loss


def _pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return (a * b).sum() / (a.norm() * b.norm())


def _loop_reference(s, t, mask, k, eps):
    """Per-position loop with torch.unique for the union; no padding."""
    rhos = []
    for pos in mask.reshape(-1).nonzero().squeeze(-1).tolist():
        sp, tp = s.reshape(-1, s.shape[-1])[pos], t.reshape(-1, t.shape[-1])[pos]
        u = torch.unique(torch.cat([tp.topk(k).indices, sp.topk(k).indices]))
        rhos.append(_pearson(soft_rank(sp[u], eps), soft_rank(tp[u], eps)))
    return 1 - torch.stack(rhos).mean()


@pytest.mark.parametrize("k", [1, 3, 5, 15])
def test_ranking_loss_matches_loop_over_positions(k):
    g = torch.Generator().manual_seed(10 + k)
    B, L, V = 3, 7, 40
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2
    s = 0.5 * t + torch.randn(B, L, V, generator=g, dtype=torch.float64)  # partial overlap -> varied |U|
    t[0, 0, :3] = t[0, 0].max() + 1  # ties inside the teacher's top-k
    mask = (torch.rand(B, L, generator=g) < 0.7).long()
    mask[0, 0] = 1
    sizes = {
        len(torch.unique(torch.cat([t[b, i].topk(k).indices, s[b, i].topk(k).indices])))
        for b in range(B) for i in range(L)
    }
    if k > 1:
        assert len(sizes) > 1, "test data should produce unions of different sizes"
    for eps in (0.5, 1.0):
        if k == 1:  # unions of size 1 or 2; Pearson of 2 ranks is +-1, of 1 rank defined as 1
            continue
        got = ranking_loss(s, t, mask, k=k, regularization_strength=eps)
        torch.testing.assert_close(got, _loop_reference(s, t, mask, k, eps), rtol=1e-10, atol=1e-12)


def test_ranking_loss_zero_when_identical():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, 50, generator=g)
    x[0, 0, 10:14] = 7.0  # ties straddling the top-k boundary
    x[1, 2] = 0.0  # a fully tied row: union of k tied tokens, both soft ranks constant -> rho = 1
    s = x.clone().requires_grad_(True)
    loss = ranking_loss(s, x, torch.ones(2, 5), k=5)
    assert abs(loss.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() < 1e-5
    # reversed order of the teacher's peak -> rho = -1 -> loss 2
    t = torch.zeros(1, 1, 10)
    t[0, 0, :5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]) * 3
    st = torch.zeros(1, 1, 10)
    st[0, 0, :5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]) * 3
    torch.testing.assert_close(ranking_loss(st, t, None, k=5), torch.tensor(2.0))


def test_ranking_loss_all_masked_and_num_tokens():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 4, 30, generator=g).requires_grad_(True)
    t = torch.randn(2, 4, 30, generator=g)
    zero = torch.zeros(2, 4, dtype=torch.long)
    for kw in ({}, {"num_tokens": 7}, {"num_tokens": 0}, {"num_tokens": torch.tensor(0)}):
        loss = ranking_loss(s, t, zero, k=5, **kw)
        assert loss.item() == 0.0
        (g_,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(g_).all() and (g_ == 0).all()
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    mean = ranking_loss(s, t, mask, k=5)
    tot = ranking_loss(s, t, mask, k=5, num_tokens=torch.tensor(10.0))
    torch.testing.assert_close(tot * 10, mean * 5)
    # mask=None means every position; bool and float masks work like integer ones
    torch.testing.assert_close(ranking_loss(s, t, None, k=5), ranking_loss(s, t, torch.ones(2, 4), k=5))
    torch.testing.assert_close(ranking_loss(s, t, mask.bool(), k=5), mean)
    # invariant to a joint permutation of the vocabulary and to a per-position shift of the logits
    perm = torch.randperm(30, generator=g)
    torch.testing.assert_close(ranking_loss(s[..., perm], t[..., perm], mask, k=5), mean)
    torch.testing.assert_close(ranking_loss(s - 3.0, t.log_softmax(-1), mask, k=5), mean)


def test_ranking_loss_bfloat16_input():
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 32, generator=g).bfloat16().requires_grad_(True)
    t = torch.randn(2, 3, 32, generator=g).bfloat16()
    loss = ranking_loss(s, t, torch.ones(2, 3), k=5)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    torch.testing.assert_close(loss, ranking_loss(s.float(), t.float(), torch.ones(2, 3), k=5))


# ------------------------------------------------------------------------------------------- metrics


def test_peak_alignment_metrics_hand_built():
    V = 12
    base = torch.arange(V, dtype=torch.float32).flip(0)  # top-3 = tokens 0, 1, 2 in that order
    rev = base.clone()
    rev[:3] = torch.tensor([9.0, 10.0, 11.0])  # top-3 = tokens 2, 1, 0
    other = torch.arange(V, dtype=torch.float32)  # top-3 = tokens 11, 10, 9
    half = base.clone()
    half[2], half[5] = half[5], half[2]  # top-3 = tokens 0, 1, 5
    teacher = base.expand(4, V).reshape(1, 4, V)
    student = torch.stack([base, rev, other, half]).reshape(1, 4, V)
    ones = torch.ones(1, 4)
    assert peak_alignment_metrics(teacher, teacher, ones, 3) == {"cr@3": 1.0, "mor@3": 1.0}
    m = peak_alignment_metrics(student, teacher, torch.tensor([[0, 1, 0, 0]]), 3)
    assert m == {"cr@3": 0.0, "mor@3": 1.0}
    m = peak_alignment_metrics(student, teacher, ones, 3)
    assert m["cr@3"] == pytest.approx(0.25)
    assert m["mor@3"] == pytest.approx((1 + 1 + 0 + 2 / 3) / 4)
    m = peak_alignment_metrics(student, teacher, None, 3)
    assert m["cr@3"] == pytest.approx(0.25)
    torch.testing.assert_close(topk_overlap(student, teacher, 3), torch.tensor([[1.0, 1.0, 0.0, 2 / 3]]))
    none = peak_alignment_metrics(student, teacher, torch.zeros(1, 4), 3)
    assert all(v != v for v in none.values())  # NaN when nothing is masked in
