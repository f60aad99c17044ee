import itertools

import pytest
import torch
import torch.nn.functional as F

from sdtm_plugin.merge import MergePlan, WindowLayout, bipartite_merge_plan, staleness_priority, window_merge_plan


def test_window_layout_odd_grid_has_loose_tokens():
    layout = WindowLayout.build((5, 7), sx=2, sy=2, device=torch.device("cpu"))
    assert layout.num_windows == 2 * 3
    covered = set(layout.window_tokens.flatten().tolist())
    assert len(covered) == 24 and covered.isdisjoint(layout.loose_tokens.tolist())
    assert sorted(covered | set(layout.loose_tokens.tolist())) == list(range(35))
    # first window is rows 0-1, columns 0-1 of the row-major grid
    assert layout.window_tokens[0].tolist() == [0, 1, 7, 8]


def test_window_layout_rejects_grid_smaller_than_window():
    with pytest.raises(ValueError, match="smaller than one"):
        WindowLayout.build((1, 8), sx=2, sy=2, device=torch.device("cpu"))


def test_merge_plan_means_and_exact_passthrough():
    x = torch.randn(2, 6, 4)
    target = torch.tensor([[0, 0, 2, 3, 3, 3], [0, 2, 2, 4, 4, 4]])
    plan = MergePlan(target, num_rows=3)
    merged = plan.merge(x)
    assert merged.shape == (2, 3, 4)
    torch.testing.assert_close(merged[0, 0], x[0, :2].mean(0))
    assert torch.equal(merged[0, 1], x[0, 2])  # alone: bit-exact
    torch.testing.assert_close(merged[0, 2], x[0, 3:].mean(0))
    torch.testing.assert_close(merged[1, 1], x[1, 1:3].mean(0))  # batch 1 keeps 0, 2, 4 in order
    out = plan.unmerge(merged)
    assert out.shape == x.shape
    assert torch.equal(out[0, 1], merged[0, 0]) and torch.equal(out[0, 5], merged[0, 2])
    assert plan.merged[0, :, 0].tolist() == [True, True, False, True, True, True]


def test_unmerge_blends_only_merged_tokens_with_cache():
    x = torch.randn(1, 4, 3)
    plan = MergePlan(torch.tensor([[0, 0, 2, 3]]), num_rows=3)
    y = plan.merge(x)
    cache = torch.randn(1, 4, 3)
    out = plan.unmerge(y, cache, cache_weight=0.1)
    torch.testing.assert_close(out[0, :2], 0.1 * y[0, 0] + 0.9 * cache[0, :2])
    assert torch.equal(out[0, 2:], x[0, 2:])
    assert torch.equal(plan.unmerge(y, cache, cache_weight=1.0), plan.unmerge(y))


def test_merge_rejects_wrong_token_count():
    plan = MergePlan(torch.tensor([[0, 0, 2, 3]]), num_rows=3)
    with pytest.raises(ValueError, match="expected 4 tokens"):
        plan.merge(torch.randn(1, 5, 3))


def _grid_metric(batch=2, grid=(4, 4), channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid[0] * grid[1], channels, generator=g)


def test_window_similarity_matches_bruteforce_pairwise_mean():
    metric = _grid_metric()
    layout = WindowLayout.build((4, 4), 2, 2, torch.device("cpu"))
    unit = F.normalize(metric, dim=-1)[:, layout.window_tokens]  # (B, W, K, C)
    brute = torch.stack(
        [(unit[:, :, i] * unit[:, :, j]).sum(-1) for i, j in itertools.permutations(range(4), 2)], -1
    ).mean(-1)
    best = brute.argmax(1)
    plan = window_merge_plan(metric, layout, num_windows=1)
    for b in range(2):
        members = layout.window_tokens[best[b]]
        assert plan.merged[b, members, 0].all() and plan.merged[b, :, 0].sum() == 4


def test_window_merge_picks_most_similar_windows_and_priority_can_override():
    metric = _grid_metric(batch=1)
    layout = WindowLayout.build((4, 4), 2, 2, torch.device("cpu"))
    w3 = layout.window_tokens[3]
    metric[0, w3] = metric[0, w3[0]].clone()  # window 3: four identical tokens, P_sim = 1
    plan = window_merge_plan(metric, layout, num_windows=1)
    assert plan.num_rows == 13 and plan.merged[0, w3, 0].all()
    torch.testing.assert_close(plan.unmerge(plan.merge(metric))[0, w3], metric[0, w3])
    # a strong staleness prior on window 0 wins over similarity
    priority = torch.zeros(1, 16)
    priority[0, layout.window_tokens[0]] = 10.0
    plan = window_merge_plan(metric, layout, num_windows=1, priority=priority, priority_weight=1.0)
    assert plan.merged[0, layout.window_tokens[0], 0].all() and not plan.merged[0, w3, 0].any()


def test_bipartite_merges_most_similar_sources_into_their_destination():
    metric = _grid_metric(batch=1)
    layout = WindowLayout.build((4, 4), 2, 2, torch.device("cpu"))
    metric[0, 5] = metric[0, 10].clone()  # token 5 (window 0, pos 3) duplicates token 10 (window 3, pos 0 = destination)
    plan = bipartite_merge_plan(metric, layout, num_merged=1)
    assert plan.num_rows == 15
    assert plan.merged[0, :, 0].nonzero().flatten().tolist() == [5, 10]
    merged = plan.merge(metric)
    torch.testing.assert_close(plan.unmerge(merged)[0, 5], metric[0, 10])


def test_bipartite_destination_score_and_priority():
    metric = _grid_metric(batch=1)
    layout = WindowLayout.build((4, 4), 2, 2, torch.device("cpu"))
    dst_score = torch.zeros(1, 4, 4)
    dst_score[..., 2] = 1.0  # destinations at in-window position 2
    plan = bipartite_merge_plan(metric, layout, num_merged=12, destination_score=dst_score)
    # every source merged: only the 4 destination rows remain, one per window
    assert plan.num_rows == 4
    assert set(plan.row_of_token[0, layout.window_tokens[:, 2]].tolist()) == {0, 1, 2, 3}
    base = bipartite_merge_plan(metric, layout, num_merged=2)
    priority = torch.zeros(1, 16)
    untouched = [i for i in range(16) if not base.merged[0, i, 0] and i not in layout.window_tokens[:, 0].tolist()][0]
    priority[0, untouched] = 100.0
    boosted = bipartite_merge_plan(metric, layout, num_merged=2, priority=priority, priority_weight=1.0)
    assert boosted.merged[0, untouched, 0] and not base.merged[0, untouched, 0]


def test_staleness_priority_normalises_by_mean():
    t = torch.tensor([[0, 2, 4, 2], [0, 0, 0, 0]], dtype=torch.int32)
    p = staleness_priority(t)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 1.0, 2.0, 1.0]))
    assert torch.equal(p[1], torch.zeros(4))


def test_merge_ops_are_differentiable():
    metric = _grid_metric(batch=1).requires_grad_()
    layout = WindowLayout.build((4, 4), 2, 2, torch.device("cpu"))
    plan = window_merge_plan(metric.detach(), layout, num_windows=2)
    plan.unmerge(plan.merge(metric) * 2).sum().backward()
    torch.testing.assert_close(metric.grad, torch.full_like(metric, 2.0))  # mean then copy-back conserves mass
