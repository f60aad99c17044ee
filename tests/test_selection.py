import math

import pytest
import torch

from token_modules.selection import (
    TokenAggregation,
    TokenSparse,
    aggregated_count,
    fuse_scores,
    keep_count,
    minmax_normalize,
    straight_through_topk,
)

B, N, C = 3, 20, 16


def _inputs(seed=0, guides=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, C, generator=g)
    return x, torch.randn(B, N, generator=g), torch.randn(B, guides, N, generator=g)


def test_minmax_range_and_constant_rows():
    x = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    y = minmax_normalize(x)
    assert torch.allclose(y[0], torch.tensor([0.0, 1.0, 0.5]), atol=1e-6)
    assert torch.equal(y[1], torch.zeros(3))  # no NaN on a constant row


def test_fuse_scores_matches_hand_computation():
    p, im, c1, c2 = (torch.rand(2, 5, dtype=torch.float64) for _ in range(4))
    beta = 0.3
    expected = (1 - 2 * beta) * p + beta * (c1 + c2 + 2 * im)
    assert torch.allclose(fuse_scores(p, im, torch.stack([c1, c2], 1), beta), expected)


@pytest.mark.parametrize("n,ratio,k", [(128, 0.5, 64), (10, 0.7, 7), (10, 0.05, 1), (7, 1.0, 7), (5, 0.5, 3)])
def test_keep_count(n, ratio, k):
    assert keep_count(n, ratio) == k == max(1, math.ceil(round(n * ratio, 6)))


def test_aggregated_count_defaults_and_errors():
    assert aggregated_count(128, 0.5, 0.4) == 25
    with pytest.raises(ValueError, match=r"sparse_ratio must be in \(0, 1\]"):
        keep_count(10, 1.5)
    with pytest.raises(ValueError, match=r"aggr_ratio must be in \(0, 1\]"):
        aggregated_count(10, 0.5, 0.0)
    with pytest.raises(ValueError, match="N_c >= 1"):
        aggregated_count(4, 0.5, 0.2)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.73, 1.0])
def test_mask_count_and_indices_and_top_scores(ratio):
    torch.manual_seed(0)
    sparse = TokenSparse(C, sparse_ratio=ratio)
    x, s, gs = _inputs()
    out = sparse(x, s, gs)
    k = math.ceil(round(N * ratio, 6))
    assert out.tokens.shape == (B, k, C) and out.keep_idx.shape == (B, k)
    assert torch.equal(out.mask.sum(-1), torch.full((B,), float(k)))
    assert set(out.mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.mask.nonzero()[:, 1].view(B, k).sort(-1).values, out.keep_idx.sort(-1).values)
    # kept = the k highest fused scores, and the kept tokens are the patches at those indices
    thresh = out.score.topk(k, dim=-1).values[:, -1:]
    assert torch.all(out.keep_score >= thresh)
    assert torch.all(out.score[out.mask == 0].view(B, -1) <= thresh) if k < N else True
    assert torch.equal(out.tokens, x[torch.arange(B)[:, None], out.keep_idx])


def test_score_formula_uses_minmax_predictor_and_guides():
    torch.manual_seed(0)
    sparse = TokenSparse(C, beta=0.25)
    x, s, gs = _inputs()
    p = torch.sigmoid(sparse.predictor(x)).squeeze(-1)
    mm = minmax_normalize
    expected = 0.5 * p + 0.25 * (mm(gs[:, 0]) + mm(gs[:, 1]) + 2 * mm(s))
    assert torch.allclose(sparse(x, s, gs).score, expected, atol=1e-6)
    raw = TokenSparse(C, scoring="sum")
    assert raw.predictor is None
    assert torch.allclose(raw(x, s, gs).score, s + gs.sum(1))


def test_extra_token_is_softmax_convex_combination_of_discarded():
    torch.manual_seed(0)
    sparse = TokenSparse(C, sparse_ratio=0.4)
    x, s, gs = _inputs()
    out = sparse(x, s, gs)
    dropped = out.mask == 0
    for b in range(B):  # test-side reference only
        w = out.score[b][dropped[b]].softmax(-1)
        assert torch.allclose(out.extra[b, 0], w @ x[b][dropped[b]], atol=1e-6)
        lo, hi = x[b][dropped[b]].amin(0), x[b][dropped[b]].amax(0)
        assert torch.all(out.extra[b, 0] >= lo - 1e-6) and torch.all(out.extra[b, 0] <= hi + 1e-6)


def test_keep_all_gives_zero_extra_token():
    x, s, gs = _inputs()
    out = TokenSparse(C, sparse_ratio=1.0)(x, s, gs)
    assert torch.equal(out.extra, torch.zeros(B, 1, C)) and out.mask.sum() == B * N


def test_permuting_patches_permutes_mask():
    torch.manual_seed(0)
    sparse = TokenSparse(C)
    x, s, gs = _inputs()
    perm = torch.randperm(N)
    a, b = sparse(x, s, gs), sparse(x[:, perm], s[:, perm], gs[:, :, perm])
    assert torch.equal(b.mask, a.mask[:, perm])
    assert torch.allclose(b.extra, a.extra, atol=1e-6)


def test_aggregation_weights_rows_sum_to_one_and_output_is_bmm():
    torch.manual_seed(0)
    agg = TokenAggregation(C, num_out=4)
    x = torch.randn(B, 9, C)
    imp = torch.rand(B, 9).softmax(-1)
    w = agg.weights(x, imp)
    assert w.shape == (B, 4, 9)
    assert torch.allclose(w.sum(-1), torch.ones(B, 4), atol=1e-6) and torch.all(w >= 0)
    assert torch.allclose(agg(x, imp), torch.bmm(w, x), atol=1e-6)
    # log-importance adds the same row vector to every logit row (hand computation)
    logits = agg.weight_net(x).transpose(1, 2) * agg.scale + torch.log(imp + 1e-8)[:, None]
    assert torch.allclose(w, logits.softmax(-1), atol=1e-6)


def test_aggregation_is_permutation_invariant_and_validates():
    torch.manual_seed(0)
    agg = TokenAggregation(C, num_out=3)
    x = torch.randn(B, 8, C)
    assert torch.allclose(agg(x), agg(x[:, torch.randperm(8)]), atol=1e-5)
    with pytest.raises(ValueError, match="N_s >= N_c"):
        agg(torch.randn(B, 2, C))
    with pytest.raises(ValueError, match="num_out"):
        TokenAggregation(C, num_out=0)


def test_token_sparse_validates_inputs():
    x, s, gs = _inputs()
    sparse = TokenSparse(C)
    with pytest.raises(ValueError, match="self_score must be"):
        sparse(x, s[:, :-1], gs)
    with pytest.raises(ValueError, match="guide_scores must be"):
        sparse(x, s, gs[..., :-1])
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\]"):
        TokenSparse(C, beta=0.6)
    with pytest.raises(ValueError, match="scoring must be one of"):
        TokenSparse(C, scoring="other")
    with pytest.raises(ValueError, match="gumbel_tau must be > 0"):
        TokenSparse(C, gumbel_tau=0)


def test_straight_through_topk_value_is_hard_and_gradient_is_bounded():
    logits = torch.randn(B, N, requires_grad=True)
    mask, order = straight_through_topk(logits, 5, tau=0.5)
    assert torch.equal(mask.detach().sum(-1), torch.full((B,), 5.0))
    assert torch.equal(mask.detach().nonzero()[:, 1].view(B, 5).sort(-1).values, order[:, :5].sort(-1).values)
    mask.sum().backward()
    assert logits.grad.abs().max() <= 0.5 + 1e-6  # sigmoid slope 1/(4 tau)
    assert logits.grad.abs().sum() > 0


# --- regression tests for the reference code's defects (research/token_modules.md §0, §2.4) ---


def test_patches_and_predictor_get_gradient_without_gumbel():
    torch.manual_seed(0)
    sparse = TokenSparse(C)
    agg = TokenAggregation(C, 4)
    x, s, gs = _inputs()
    x.requires_grad_(True)
    out = sparse(x, s, gs)
    y = torch.cat([agg(out.tokens, out.keep_score.softmax(-1)), out.extra], 1)
    y.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for p in sparse.predictor.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_gradient_reaches_predictor_through_straight_through_gumbel():
    # Loss on the kept tokens only: without Gumbel the predictor's only link is the (piecewise constant) top-k, so
    # it gets no gradient; with the straight-through mask gating the tokens, it does.
    x, s, gs = _inputs()
    x.requires_grad_(True)
    grads = {}
    for gumbel in (False, True):
        torch.manual_seed(0)
        sparse = TokenSparse(C, use_gumbel=gumbel, gumbel_tau=0.5).train()
        sparse(x, s, gs, generator=torch.Generator().manual_seed(1)).tokens.pow(2).sum().backward()
        grads[gumbel] = [p.grad for p in sparse.predictor.parameters()]
    assert all(g is None or g.abs().sum() == 0 for g in grads[False])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[True])


def test_gumbel_changes_forward_and_keeps_gradients_bounded():
    x, s, gs = _inputs()
    x = x.requires_grad_(True)
    torch.manual_seed(0)
    plain = TokenSparse(C).train()
    torch.manual_seed(0)
    gumbel = TokenSparse(C, use_gumbel=True).train()
    a = plain(x, s, gs)
    b = gumbel(x, s, gs, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a.mask, b.mask)  # the noise is live: it changes the selection
    assert torch.equal(b.mask.detach().sum(-1), a.mask.sum(-1))  # still exactly K, a hard mask in value
    assert torch.equal(gumbel.eval()(x, s, gs).mask, a.mask)  # eval: no noise, same top-k
    (b.tokens.pow(2).mean() + b.extra.pow(2).mean()).backward()
    gnorm = torch.stack([p.grad.norm() for p in gumbel.predictor.parameters()]).norm()
    assert torch.isfinite(gnorm) and 0 < gnorm < 10  # the 1e10-mask bug gave norms ~1e7
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 10


def test_fuse_scores_guide_mask_averages_available_guides_only():
    p, im, c1, c2 = (torch.rand(3, 5, dtype=torch.float64) for _ in range(4))
    guides = torch.stack([c1, c2], 1)
    guides[1, 0] = float("nan")  # an unavailable guide is never read
    mask = torch.tensor([[True, True], [False, True], [False, False]])
    s = fuse_scores(p, im, guides, 0.25, mask)
    assert torch.allclose(s[0], 0.5 * p[0] + 0.25 * (c1[0] + c2[0] + 2 * im[0]))
    assert torch.allclose(s[1], 0.5 * p[1] + 0.5 * im[1] + 0.5 * c2[1])
    assert torch.allclose(s[2], 0.5 * p[2] + 1.0 * im[2])  # no guide: its weight goes to s^self


def test_token_sparse_guide_mask_sum_scoring_and_validation():
    x, s, gs = _inputs()
    mask = torch.tensor([[True, False], [False, False], [True, True]])
    raw = TokenSparse(C, scoring="sum")
    expected = s + torch.stack([gs[0, 0], torch.zeros(N), gs[2].sum(0)])
    assert torch.allclose(raw(x, s, gs, guide_mask=mask).score, expected)
    with pytest.raises(ValueError, match=r"guide_mask must be \(B, G\) = \(3, 2\)"):
        raw(x, s, gs, guide_mask=mask[:, :1])
    with pytest.raises(ValueError, match=r"guide_mask must be None \(no guide_scores\)"):
        raw(x, s, None, guide_mask=mask)
