import itertools

import pytest
import torch
import torch.nn.functional as F

from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.merge import (bipartite_merge, choose_destinations, staleness_priority, window_medoid_scores,
                               window_merge, window_scores)

CPU = torch.device("cpu")


def test_window_grid_odd_grid_has_loose_tokens():
    grid = WindowGrid.build((5, 7), sx=2, sy=2, device=CPU)
    assert grid.num_windows == 2 * 3
    covered = set(grid.window_tokens.flatten().tolist())
    assert len(covered) == 24 and covered.isdisjoint(grid.loose_tokens.tolist())
    assert sorted(covered | set(grid.loose_tokens.tolist())) == list(range(35))
    # first window is rows 0-1, columns 0-1 of the row-major grid
    assert grid.window_tokens[0].tolist() == [0, 1, 7, 8]


def test_window_grid_rejects_grid_smaller_than_window():
    with pytest.raises(ValueError, match="smaller than one"):
        WindowGrid.build((1, 8), sx=2, sy=2, device=CPU)


def test_video_windows_span_frames():
    """(frames, h, w) = (3, 4, 5) with 2 x 2 x 2 windows: one window frame (frames 0-1), 2 x 2 windows per frame;
    frame 2 and column 4 are loose."""
    grid = WindowGrid.build((3, 4, 5), sx=2, sy=2, device=CPU, st=2)
    assert grid.num_windows == 4 and grid.window_size == 8 and grid.num_tokens == 60
    assert grid.window_tokens[0].tolist() == [0, 1, 5, 6, 20, 21, 25, 26]  # frame-, then row-major inside a window
    assert grid.window_tokens[1].tolist() == [2, 3, 7, 8, 22, 23, 27, 28]
    covered = set(grid.window_tokens.flatten().tolist())
    assert len(covered) == 32 and covered.isdisjoint(grid.loose_tokens.tolist())
    assert sorted(covered | set(grid.loose_tokens.tolist())) == list(range(60))
    assert set(range(40, 60)) <= set(grid.loose_tokens.tolist())


def test_window_depth_needs_frames():
    with pytest.raises(ValueError, match=r"st=2 spans frames.*st must be 1 for image models"):
        WindowGrid.build((4, 4), sx=2, sy=2, device=CPU, st=2)
    with pytest.raises(ValueError, match="smaller than one 2x2x2"):
        WindowGrid.build((1, 4, 4), sx=2, sy=2, device=CPU, st=2)


@pytest.mark.parametrize("grid_hw, sx, sy, st", [((4, 4), 2, 2, 1), ((5, 7), 2, 2, 1), ((6, 9), 3, 2, 1),
                                                 ((4, 4, 4), 2, 2, 2), ((5, 5, 7), 2, 2, 2), ((4, 6, 9), 3, 2, 3),
                                                 ((3, 4, 4), 2, 2, 1)])
def test_window_views_equal_gathers(grid_hw, sx, sy, st):
    grid = WindowGrid.build(grid_hw, sx, sy, CPU, st)
    x = torch.randn(2, grid.num_tokens, 3)
    gathered = x[:, grid.window_tokens]  # (B, W, K, C)
    torch.testing.assert_close(grid.window_reduce(x), gathered.sum(2))
    torch.testing.assert_close(grid.window_reduce(x, mean=True), gathered.mean(2))
    # SSM's pooling matmul per band of token rows (loose rows and columns excluded) = the unit vectors' window sums
    torch.testing.assert_close(grid.window_unit_sums(x), F.normalize(x, dim=-1)[:, grid.window_tokens].sum(2))
    ids = torch.arange(x.shape[1]).expand(2, -1)
    assert torch.equal(grid.per_window(ids), grid.window_tokens.expand(2, -1, -1))
    unit = F.normalize(x, dim=-1)[:, grid.window_tokens]  # (B, W, K, C)
    torch.testing.assert_close(window_medoid_scores(x, grid), (unit * unit.sum(2, keepdim=True)).sum(-1))


@pytest.mark.parametrize("grid_hw, st", [((6, 8), 1), ((5, 6, 8), 2), ((3, 4, 4), 1)])
def test_neighbour_windows_are_those_within_the_radius(grid_hw, st):
    """Local matching's candidates: every window within one window along frames (video), rows and columns, clamped at
    the border; loose tokens take their nearest window's."""
    grid = WindowGrid.build(grid_hw, 2, 2, CPU, st)
    gf, gh, gw = grid.counts
    windows, loose = grid.neighbour_windows(1)
    assert windows.shape == (gf * gh * gw, (3 if gf > 1 else 1) * 9)
    for index, candidates in enumerate(windows.tolist()):
        f, y, x = index // (gh * gw), index // gw % gh, index % gw
        expected = {(ff * gh + yy) * gw + xx for ff in range(gf) for yy in range(gh) for xx in range(gw)
                    if abs(ff - f) <= 1 and abs(yy - y) <= 1 and abs(xx - x) <= 1}
        assert set(candidates) == expected
    frames, h, w = grid.dims
    for token, candidates in zip(grid.loose_tokens.tolist(), loose.tolist()):
        f, y, x = token // (h * w), token // w % h, token % w
        nearest = (min(f // st, gf - 1) * gh + min(y // 2, gh - 1)) * gw + min(x // 2, gw - 1)
        assert candidates == windows[nearest].tolist()


def _duplicated_pairs():
    """4x4 grid, one batch element: source 5 duplicates destination 10, source 3 duplicates destination 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, generator=g)
    x[0, 5], x[0, 3] = x[0, 10], x[0, 0]
    return x, WindowGrid.build((4, 4), 2, 2, CPU)


def test_merge_means_and_exact_passthrough():
    x, grid = _duplicated_pairs()
    x[0, 5] = x[0, 10] + 0.01  # near duplicate: its group row is the mean of tokens 5 and 10
    merge = bipartite_merge(x, grid, num_merged=2)
    assert merge.num_rows == 14 and merge.merged[0].nonzero().flatten().tolist() == [0, 3, 5, 10]
    merged = merge.merge(x)
    out = merge.unmerge(merged)
    assert out.shape == x.shape
    torch.testing.assert_close(out[0, 5], (x[0, 5] + x[0, 10]) / 2)
    torch.testing.assert_close(out[0, 10], out[0, 5])
    torch.testing.assert_close(out[0, 3], x[0, 0])
    for t in set(range(16)) - {0, 3, 5, 10}:  # computed on their own: bit-exact
        assert torch.equal(out[0, t], x[0, t])


def test_unmerge_blends_only_merged_tokens_with_cache():
    x, grid = _duplicated_pairs()
    merge = bipartite_merge(x, grid, num_merged=2)
    y = merge.merge(x)
    cache = torch.randn(1, 16, 4)
    out = merge.unmerge(y, cache, cache_weight=0.1)
    plain = merge.unmerge(y)
    for t in range(16):
        if merge.merged[0, t]:
            torch.testing.assert_close(out[0, t], 0.1 * plain[0, t] + 0.9 * cache[0, t])
        else:
            assert torch.equal(out[0, t], x[0, t])
    assert torch.equal(merge.unmerge(y, cache, cache_weight=1.0), plain)


def test_merge_and_unmerge_reject_wrong_lengths():
    x, grid = _duplicated_pairs()
    merge = bipartite_merge(x, grid, num_merged=2)
    with pytest.raises(ValueError, match="expected 16 tokens"):
        merge.merge(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match="expected 14 rows"):
        merge.unmerge(torch.randn(1, 16, 4))


def _grid_metric(batch=2, grid=(4, 4), channels=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, grid[0] * grid[1], channels, generator=g)


def test_window_similarity_matches_bruteforce_pairwise_mean():
    metric = _grid_metric()
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    unit = F.normalize(metric, dim=-1)[:, grid.window_tokens]  # (B, W, K, C)
    brute = torch.stack(
        [(unit[:, :, i] * unit[:, :, j]).sum(-1) for i, j in itertools.permutations(range(4), 2)], -1
    ).mean(-1)
    torch.testing.assert_close(window_scores(metric, grid), brute)
    best = brute.argmax(1)
    merge = window_merge(metric, grid, num_windows=1)
    for b in range(2):
        members = grid.window_tokens[best[b]]
        assert merge.merged[b, members].all() and merge.merged[b].sum() == 4


def test_window_merge_picks_most_similar_windows_and_priority_can_override():
    metric = _grid_metric(batch=1)
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    w3 = grid.window_tokens[3]
    metric[0, w3] = metric[0, w3[0]].clone()  # window 3: four identical tokens, P_sim = 1
    merge = window_merge(metric, grid, num_windows=1)
    assert merge.num_rows == 13 and merge.merged[0, w3].all()
    torch.testing.assert_close(merge.unmerge(merge.merge(metric))[0, w3], metric[0, w3])
    # a strong staleness prior on window 0 wins over similarity
    priority = torch.zeros(1, 16)
    priority[0, grid.window_tokens[0]] = 10.0
    window_priority = grid.window_reduce(priority, mean=True)
    merge = window_merge(metric, grid, num_windows=1, window_priority=window_priority, priority_weight=1.0)
    assert merge.merged[0, grid.window_tokens[0]].all() and not merge.merged[0, w3].any()


def test_bipartite_merges_most_similar_sources_into_their_destination():
    metric = _grid_metric(batch=1)
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    metric[0, 5] = metric[0, 10].clone()  # token 5 (window 0, pos 3) duplicates token 10 (window 3, pos 0 = destination)
    merge = bipartite_merge(metric, grid, num_merged=1)
    assert merge.num_rows == 15
    assert merge.merged[0].nonzero().flatten().tolist() == [5, 10]
    torch.testing.assert_close(merge.unmerge(merge.merge(metric))[0, 5], metric[0, 10])


def test_bipartite_destination_score_and_priority():
    metric = _grid_metric(batch=1)
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    dst_score = torch.zeros(1, 4, 4)
    dst_score[..., 2] = 1.0  # destinations at in-window position 2
    merge = bipartite_merge(metric, grid, num_merged=12, destinations=choose_destinations(grid, 1, dst_score))
    # every source merged: only the 4 destination rows remain, one per window
    assert merge.num_rows == 4
    assert set(merge.row_of_token[0, grid.window_tokens[:, 2]].tolist()) == {0, 1, 2, 3}
    base = bipartite_merge(metric, grid, num_merged=2)
    priority = torch.zeros(1, 16)
    untouched = [i for i in range(16) if not base.merged[0, i] and i not in grid.window_tokens[:, 0].tolist()][0]
    priority[0, untouched] = 100.0
    boosted = bipartite_merge(metric, grid, num_merged=2,
                              destinations=choose_destinations(grid, 1, priority=priority, priority_weight=1.0))
    assert boosted.merged[0, untouched] and not base.merged[0, untouched]


def test_staleness_priority_normalises_by_mean():
    t = torch.tensor([[0, 2, 4, 2], [0, 0, 0, 0]], dtype=torch.int32)
    p = staleness_priority(t)
    torch.testing.assert_close(p[0], torch.tensor([0.0, 1.0, 2.0, 1.0]))
    assert torch.equal(p[1], torch.zeros(4))


def test_merge_ops_are_differentiable():
    metric = _grid_metric(batch=1).requires_grad_()
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    for merge in (window_merge(metric.detach(), grid, num_windows=2), bipartite_merge(metric.detach(), grid, 5)):
        metric.grad = None
        merge.unmerge(merge.merge(metric) * 2).sum().backward()
        torch.testing.assert_close(metric.grad, torch.full_like(metric, 2.0))  # mean then copy-back conserves mass


# -- the fast paths against plain loops over windows ----------------------------------------------------------------
def _tokens_of_windows(hw, sx, sy):
    h, w = hw
    windows = [[(r * sy + i) * w + c * sx + j for i in range(sy) for j in range(sx)]
               for r in range(h // sy) for c in range(w // sx)]
    covered = {t for win in windows for t in win}
    return windows, [t for t in range(h * w) if t not in covered]


def _cos(a, b):
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _rank(scores):
    """Indices by decreasing score; ties keep their order (what a stable sort does)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def reference_ssm(x, hw, sx, sy, num_windows, priority=None, a=0.0):
    """Per batch element: the merged groups (token lists) and the unmerged output of an identity sub-layer."""
    windows, _ = _tokens_of_windows(hw, sx, sy)
    out, groups = x.clone(), []
    for b in range(x.shape[0]):
        scores = []
        for win in windows:
            sims = [_cos(x[b, i], x[b, j]) for i, j in itertools.permutations(win, 2)]
            prior = sum(float(priority[b, t]) for t in win) / len(win) if priority is not None else 0.0
            scores.append(sum(sims) / len(sims) + a * prior)
        chosen = _rank(scores)[:num_windows]
        groups.append(sorted(sorted(windows[i]) for i in chosen))
        for i in chosen:
            out[b, windows[i]] = x[b, windows[i]].mean(0)
    return groups, out


def reference_idm(x, hw, sx, sy, num_merged, dst_pos, priority=None, a=0.0):
    windows, loose = _tokens_of_windows(hw, sx, sy)
    out, groups = x.clone(), []
    for b in range(x.shape[0]):
        dsts = [win[dst_pos[b][w]] for w, win in enumerate(windows)]
        sources = sorted([t for w, win in enumerate(windows) for t in win if t != dsts[w]] + loose)  # ties: lower index
        best, target = [], []
        for s in sources:
            sims = [_cos(x[b, s], x[b, d]) for d in dsts]
            k = max(range(len(dsts)), key=lambda i: sims[i])
            best.append(sims[k] + (a * float(priority[b, s]) if priority is not None else 0.0))
            target.append(dsts[k])
        members = {d: [d] for d in dsts}
        for i in _rank(best)[:num_merged]:
            members[target[i]].append(sources[i])
        groups.append(sorted(sorted(m) for m in members.values() if len(m) > 1))
        for m in members.values():
            out[b, m] = x[b, m].mean(0)
    return groups, out


def _groups(merge, b):
    rows = {}
    for t, r in enumerate(merge.row_of_token[b].tolist()):
        rows.setdefault(r, []).append(t)
    return sorted(sorted(m) for m in rows.values() if len(m) > 1)


def _inputs_with_ties(hw, seed, batch=2, channels=8):
    """Tokens with four +-1 entries (norm 2): every cosine is a multiple of 1/4, exact in any summation order, so
    the many exact ties test the tie-breaking itself rather than rounding."""
    g = torch.Generator().manual_seed(seed)
    n = hw[0] * hw[1]
    support = torch.rand(batch, n, channels, generator=g).argsort(-1)[..., :4]
    signs = torch.randint(0, 2, (batch, n, 4), generator=g).float() * 2 - 1
    x = torch.zeros(batch, n, channels).scatter_(2, support, signs)
    windows, _ = _tokens_of_windows(hw, 2, 2)
    x[:, windows[1]] = x[:, windows[0]]  # two identical windows
    x[:, windows[-1][1]] = x[:, windows[-1][0]]  # a source equal to its window's first token
    return x


def _dyadic_priority(shape):
    """A prior in quarters (what `staleness_priority` gives when mean(T) is a power of two): window sums are exact
    in any order, so equal sums are exact ties for the tie-break to settle, not rounding."""
    return torch.randint(0, 9, shape, generator=torch.Generator().manual_seed(1)).float() / 4


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (6, 6)])
@pytest.mark.parametrize("use_prior", [False, True])
def test_window_merge_equals_loop_reference(hw, use_prior):
    x = _inputs_with_ties(hw, seed=hw[1])
    grid = WindowGrid.build(hw, 2, 2, CPU)
    priority = _dyadic_priority(x.shape[:2]) if use_prior else None
    for w in (1, 3, grid.num_windows):
        window_priority = grid.window_reduce(priority, mean=True) if use_prior else None
        merge = window_merge(x, grid, w, window_priority, 0.3)
        groups, expected = reference_ssm(x, hw, 2, 2, w, priority, 0.3)
        for b in range(x.shape[0]):
            assert _groups(merge, b) == groups[b]
        torch.testing.assert_close(merge.unmerge(merge.merge(x)), expected)
        assert merge.num_rows == hw[0] * hw[1] - 3 * w


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (6, 6)])
@pytest.mark.parametrize("use_prior", [False, True])
def test_bipartite_merge_equals_loop_reference(hw, use_prior):
    x = _inputs_with_ties(hw, seed=2 * hw[1])
    grid = WindowGrid.build(hw, 2, 2, CPU)
    dst_score = torch.rand(x.shape[0], grid.num_windows, 4, generator=torch.Generator().manual_seed(1))
    dst_pos = dst_score.argmax(-1).tolist()
    priority = _dyadic_priority(x.shape[:2]) if use_prior else None
    n_sources = hw[0] * hw[1] - grid.num_windows
    for r in (1, n_sources // 2, n_sources):
        merge = bipartite_merge(x, grid, r, choose_destinations(grid, x.shape[0], dst_score, priority, 0.3))
        groups, expected = reference_idm(x, hw, 2, 2, r, dst_pos, priority, 0.3)
        for b in range(x.shape[0]):
            assert _groups(merge, b) == groups[b]
        torch.testing.assert_close(merge.unmerge(merge.merge(x)), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_chooses_the_same_windows_and_sources(dtype):
    """Well-separated inputs (a few clearly redundant windows / sources among random ones) give fp32's choices."""
    g = torch.Generator().manual_seed(3)
    grid = WindowGrid.build((8, 8), 2, 2, CPU)
    x = torch.randn(2, 64, 32, generator=g)
    redundant = grid.window_tokens[[2, 5, 9, 12]]
    x[:, redundant] = x[:, redundant[:, :1]] + 0.05 * torch.randn(2, 4, 4, 32, generator=g)
    full = window_merge(x, grid, 4)
    low = window_merge(x.to(dtype), grid, 4)
    assert all(_groups(full, b) == _groups(low, b) for b in range(2))  # the row order of equal scores may differ
    roundtrip = low.unmerge(low.merge(x.to(dtype)))
    assert roundtrip.dtype == dtype
    torch.testing.assert_close(roundtrip.float(), full.unmerge(full.merge(x)), atol=2e-2, rtol=2e-2)
    # sources that nearly duplicate a destination
    x = torch.randn(2, 64, 32, generator=g)
    x[:, grid.window_tokens[:6, 1]] = x[:, grid.window_tokens[:6, 0]] + 0.01 * torch.randn(2, 6, 32, generator=g)
    full, low = bipartite_merge(x, grid, 6), bipartite_merge(x.to(dtype), grid, 6)
    assert all(_groups(full, b) == _groups(low, b) for b in range(2))


def test_bad_merge_inputs_name_the_parameter_and_its_range():
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    x = torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match=r"x must be \(B, 16, C\)"):
        window_merge(torch.randn(2, 15, 8), grid, 1)
    with pytest.raises(ValueError, match=r"x must be \(B, 16, C\)"):
        bipartite_merge(torch.randn(16, 8), grid, 1)
    with pytest.raises(ValueError, match=r"num_windows must be an int in \[0, 4\]"):
        window_merge(x, grid, 5)
    with pytest.raises(ValueError, match=r"num_merged must be an int in \[0, 12\]"):
        bipartite_merge(x, grid, 13)
    with pytest.raises(ValueError, match=r"num_merged must be an int in \[0, 12\]"):
        bipartite_merge(x, grid, -1)
    with pytest.raises(ValueError, match=r"window_priority must end in \(2, 4\)"):
        window_merge(x, grid, 1, torch.zeros(2, 16), 1.0)  # a per-token prior where a per-window one is due
    with pytest.raises(ValueError, match=r"choice must end in \(2, 4, 4\)"):
        choose_destinations(grid, 2, torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match=r"priority must end in \(2, 16\)"):
        choose_destinations(grid, 2, priority=torch.zeros(2, 4), priority_weight=1.0)
    with pytest.raises(ValueError, match="same leading dimensions"):
        choose_destinations(grid, 2, torch.rand(3, 2, 4, 4), torch.zeros(2, 2, 16), 1.0)
    several = choose_destinations(grid, 2, torch.rand(3, 2, 4, 4))
    with pytest.raises(ValueError, match="destinations must be one block's"):
        bipartite_merge(x, grid, 2, several)  # all blocks' destinations instead of one block's
    assert bipartite_merge(x, grid, 2, several[1]).num_rows == 14


@pytest.mark.parametrize("grid_hw, sx, sy", [((8, 8), 2, 2), ((7, 9), 2, 2), ((9, 6), 3, 3), ((5, 8), 4, 1)])
def test_local_matching_with_a_covering_radius_equals_global_matching(grid_hw, sx, sy):
    """Every window within reach: the local candidates are all destinations, so the merge is the global one."""
    from sdtm_plugin.grid import WindowGrid
    from sdtm_plugin.merge import bipartite_merge, choose_destinations

    torch.manual_seed(0)
    grid = WindowGrid.build(grid_hw, sx, sy, torch.device("cpu"))
    x = torch.randn(3, grid.num_tokens, 16)
    dests = choose_destinations(grid, 3, torch.rand(3, grid.num_windows, grid.window_size))
    removed = grid.num_tokens // 3
    glob = bipartite_merge(x, grid, removed, dests)
    local = bipartite_merge(x, grid, removed, dests, radius=max(grid_hw))
    assert torch.equal(glob.row_of_token, local.row_of_token) and torch.equal(glob.merge(x), local.merge(x))


def test_local_matching_merges_only_into_nearby_windows():
    from sdtm_plugin.grid import WindowGrid
    from sdtm_plugin.merge import bipartite_merge

    torch.manual_seed(1)
    grid = WindowGrid.build((16, 16), 2, 2, torch.device("cpu"))
    x = torch.randn(2, 256, 8)
    merge = bipartite_merge(x, grid, 100, radius=1)
    rows = merge.row_of_token  # (B, N): a merged token's row is its group's window (rows < W)
    token = torch.arange(256)
    own = (token // 16 // 2) * 8 + (token % 16 // 2)
    merged = rows < grid.num_windows
    dy = (rows // 8 - own // 8).abs()
    dx = (rows % 8 - own % 8).abs()
    assert merged.sum() > 100 and ((dy <= 1) & (dx <= 1))[merged].all()
    far = bipartite_merge(x, grid, 100)  # global matching reaches further
    frows = far.row_of_token
    fmerged = frows < grid.num_windows
    assert (((frows // 8 - own // 8).abs() > 1) | ((frows % 8 - own % 8).abs() > 1))[fmerged].any()


def test_channel_sketch_keeps_inner_products_and_costs_no_matmul():
    """A signed count sketch: linear, the identity when it has every channel, inner products kept in expectation
    (near-parallel tokens' cosines within a few hundredths at 64 channels), any C (zero-padded)."""
    from sdtm_plugin.merge import channel_sketch, unit_vectors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 96, generator=g)
    assert channel_sketch(x, 96) is x and channel_sketch(x, 128) is x
    a, b = channel_sketch(x, 16), channel_sketch(2 * x + 1, 16)
    assert a.shape == (2, 300, 16)
    assert torch.allclose(b, 2 * a + channel_sketch(torch.ones_like(x), 16), atol=1e-5)
    assert channel_sketch(torch.randn(1, 4, 100, generator=g), 32).shape == (1, 4, 32)  # 100 = 3 * 32 + 4, padded
    big = torch.randn(1, 2000, 1152, generator=g)
    near = 0.9 * big + (1 - 0.81) ** 0.5 * torch.randn(1, 2000, 1152, generator=g)
    cos = (unit_vectors(channel_sketch(big, 64)) * unit_vectors(channel_sketch(near, 64))).sum(-1)
    assert abs(cos.mean() - 0.9) < 0.01 and cos.std() < 0.04
    with torch.device("meta"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            channel_sketch(torch.empty(2, 4096, 1152), 64)
        assert counter.get_total_flops() == 0


def test_sketch_signs_are_a_hash_not_a_pattern():
    """The signs come from a mixing hash (`hash32`, reference values of lowbias32): balanced, channels a bucket apart
    agree half the time and a bucket's sum spreads like a sum of independent signs (the old multiplicative-hash bit
    gave opposite signs to channels i and i+128 85 % of the time and bucket sums within +-2)."""
    from sdtm_plugin.merge import _sketch_signs, hash32

    assert hash32(torch.tensor([0, 1, 2, 2**32 - 1])).tolist() == [0, 1753845952, 3507691905, 1734902346]
    signs = _sketch_signs(3072, torch.device("cpu"), torch.float32)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean()) < 0.06
    for dim in (64, 128):
        assert abs((signs[:-dim] == signs[dim:]).float().mean() - 0.5) < 0.04
        bucket_sums = signs.view(-1, dim).sum(0)  # the signs one sketch channel adds up
        assert 0.7 < bucket_sums.std() / (3072 / dim) ** 0.5 < 1.3


def test_sketched_matching_merges_like_exact_matching_when_it_holds_every_channel():
    grid = WindowGrid.build((12, 10), 2, 2, CPU)
    x = torch.randn(2, grid.num_tokens, 24, generator=torch.Generator().manual_seed(3))
    dests = choose_destinations(grid, 2, torch.rand(2, grid.num_windows, grid.window_size))
    exact = bipartite_merge(x, grid, 40, dests)
    full = bipartite_merge(x, grid, 40, dests, sketch_dim=24)
    assert torch.equal(exact.row_of_token, full.row_of_token) and torch.equal(exact.merge(x), full.merge(x))
    sketched = bipartite_merge(x, grid, 40, dests, sketch_dim=8)
    assert sketched.num_rows == exact.num_rows  # the same budget
    assert not torch.equal(sketched.row_of_token, exact.row_of_token)  # other pairs at 8 of 24 channels
    restored, merged = sketched.unmerge(sketched.merge(x)), sketched.merged
    assert torch.equal(restored[~merged], x[~merged])  # kept tokens pass through; groups hold their tokens' mean
    rows = sketched.row_of_token
    for i in range(2):
        for row in rows[i][merged[i]].unique()[:5]:
            assert torch.allclose(restored[i, rows[i] == row][0], x[i, rows[i] == row].mean(0), atol=1e-6)
