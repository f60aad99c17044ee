import math

import pytest

from sdtm_plugin import Phase, SDTMConfig, ToMeConfig, cosine_ratio, step_plan
from sdtm_plugin.schedule import layer_is_protected, tokens_removed


def test_cosine_ratio_endpoints_and_midpoint():
    assert cosine_ratio(0.3, 0.2, 0, 50) == pytest.approx(0.5)
    assert cosine_ratio(0.3, 0.2, 49, 50) == pytest.approx(0.1)
    assert cosine_ratio(0.3, 0.2, 25, 51) == pytest.approx(0.1 + 0.4 * math.cos(math.pi / 4))
    assert cosine_ratio(0.3, 0.2, 0, 1) == pytest.approx(0.5)  # single step: progress 0


@pytest.mark.parametrize("steps, last_structure", [(50, 20), (20, 8), (25, 10), (100, 40)])
def test_switch_step_scales_with_step_count(steps, last_structure):
    cfg = SDTMConfig(protect_steps_frequency=-1, cache_each_step=True)
    phases = [step_plan(cfg, i, steps).phase for i in range(steps)]
    assert phases[: last_structure + 1] == [Phase.STRUCTURE] * (last_structure + 1)
    assert set(phases[last_structure + 1 :]) == {Phase.DETAIL}


def test_protected_steps_and_detail_phase_flags():
    cfg = SDTMConfig()
    plans = [step_plan(cfg, i, 50) for i in range(50)]
    assert [p.step for p in plans if p.protected] == list(range(0, 50, 3))
    assert all(p.phase is Phase.FULL and not p.merge_attn and not p.merge_mlp for p in plans if p.protected)
    detail = [p for p in plans if p.phase is Phase.DETAIL]
    assert detail and all(p.merge_mlp and not p.merge_attn for p in detail)
    structure = [p for p in plans if p.phase is Phase.STRUCTURE]
    assert all(p.merge_attn and p.merge_mlp for p in structure)


def test_layer_protection():
    cfg = SDTMConfig(protect_layers_frequency=3)
    assert [layer_is_protected(cfg, i, 8) for i in range(8)] == [True, False, False, True, False, False, True, True]
    assert not any(layer_is_protected(SDTMConfig(), i, 8) for i in range(8))


def test_tokens_removed_per_phase():
    # 8x8 grid, 2x2 windows: 16 windows; SSM removes 3 tokens per merged window
    assert tokens_removed(Phase.STRUCTURE, 0.5, (8, 8), (1, 2, 2)) == 30  # floor(32 / 3) = 10 windows
    assert tokens_removed(Phase.STRUCTURE, 0.99, (8, 8), (1, 2, 2)) == 48  # capped at the 16 windows
    assert tokens_removed(Phase.DETAIL, 0.5, (8, 8), (1, 2, 2)) == 32
    assert tokens_removed(Phase.DETAIL, 0.9, (8, 8), (1, 2, 2)) == 48  # capped at the 48 sources
    assert tokens_removed(Phase.TOME, 0.3, (8, 8), (1, 2, 2)) == 19
    assert tokens_removed(Phase.FULL, 0.5, (8, 8), (1, 2, 2)) == 0
    assert tokens_removed(Phase.STRUCTURE, 0.5, (8, 8), (1, 1, 4)) == 30  # 4x1 windows: 10 windows of 3 removed


def test_tome_plan_is_constant():
    cfg = ToMeConfig(ratio=0.4)
    plans = {(p.phase, p.ratio, p.merge_attn, p.merge_mlp) for p in (step_plan(cfg, i, 20) for i in range(20))}
    assert plans == {(Phase.TOME, 0.4, True, False)}


# -- static token budgets -------------------------------------------------------------------------------------------
BUDGET_CASES = [(SDTMConfig(), (16, 16)), (SDTMConfig(), (64, 64)), (SDTMConfig.fast(), (16, 16)),
                (SDTMConfig(ratio=0.5, deviation=0.3, protect_steps_frequency=-1, switch_step=35), (64, 64)),
                (SDTMConfig(sx=3, sy=3, detail_merge_attn=True), (36, 30)), (SDTMConfig(token_budgets=2), (32, 32))]


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("config, grid", BUDGET_CASES)
def test_budget_schedule_properties(config, grid, steps):
    """A few merged lengths per sub-layer, whole windows and aligned, the exact schedule's phases, order and mean."""
    import dataclasses
    import math

    from sdtm_plugin.schedule import TOKEN_ALIGNMENT, removal_schedule, step_plan

    exact = removal_schedule(dataclasses.replace(config, token_budgets=None), steps, grid)
    budget = removal_schedule(config, steps, grid)
    n, k = grid[0] * grid[1], config.sx * config.sy
    plans = [step_plan(config, s, steps) for s in range(steps)]
    assert list(exact) == [tokens_removed(p.phase, p.ratio, grid, config.window) for p in plans]
    granule = math.lcm(k - 1, TOKEN_ALIGNMENT)
    for role in ("attn", "mlp"):  # the lengths each sub-layer sees over the generation
        lengths = {n - budget[s] for s, p in enumerate(plans) if p.merges_sublayer(role) and budget[s]}
        assert len(lengths) <= config.token_budgets, (role, sorted(lengths))
    assert [b > 0 for b in budget] == [e > 0 for e in exact]  # the same steps merge (and stay protected)
    assert all(b % granule == 0 for b in budget)
    pairs = [(e, b) for e, b in zip(exact, budget) if e > 0]
    assert all(b1 <= b2 for (e1, b1) in pairs for (e2, b2) in pairs if e1 < e2)  # more merging never gets less
    assert abs(sum(budget) - sum(exact)) / len(pairs) <= granule / 2 + 1e-9  # the mean ratio is kept


def test_budgets_on_a_grid_too_small_for_one_granule_merge_nothing():
    from sdtm_plugin.schedule import removal_schedule

    assert set(removal_schedule(SDTMConfig(), 20, (4, 4))) == {0}  # 16 tokens: a granule of 24 cannot fit
    assert set(removal_schedule(SDTMConfig(token_budgets=None), 20, (4, 4))) != {0}


def test_a_generation_sees_at_most_four_lengths_per_sublayer_from_the_outside(tiny_pipe):
    """Forward hooks on the first Linear of each sub-layer of the tiny PixArt, 20 steps, default config."""
    from conftest import generate
    from test_sdtm_pipeline import record_counts

    from sdtm_plugin import apply_SDTM, get_merge_state

    apply_SDTM(tiny_pipe, ratio=0.4, deviation=0.2, protect_steps_frequency=-1)
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=20)
    for h in handles:
        h.remove()
    for role in ("attn", "mlp"):
        lengths = {tokens for r, _, tokens in seen if r == role and tokens < 64}
        assert 1 <= len(lengths) <= 4 and all((64 - t) % 24 == 0 for t in lengths), (role, lengths)
    budgets = get_merge_state(tiny_pipe).token_budgets()
    assert budgets[(8, 8)] == sorted({(64 - t, (64 - t) / 64) for _, _, t in seen if t < 64})
