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
    assert tokens_removed(Phase.STRUCTURE, 0.5, 64, (8, 8), 2, 2) == 30  # floor(32 / 3) = 10 windows
    assert tokens_removed(Phase.STRUCTURE, 0.99, 64, (8, 8), 2, 2) == 48  # capped at the 16 windows
    assert tokens_removed(Phase.DETAIL, 0.5, 64, (8, 8), 2, 2) == 32
    assert tokens_removed(Phase.DETAIL, 0.9, 64, (8, 8), 2, 2) == 48  # capped at the 48 sources
    assert tokens_removed(Phase.TOME, 0.3, 64, (8, 8), 2, 2) == 19
    assert tokens_removed(Phase.FULL, 0.5, 64, (8, 8), 2, 2) == 0
    assert tokens_removed(Phase.STRUCTURE, 0.5, 64, (8, 8), 4, 1) == 30  # 4x1 windows: 10 windows of 3 removed


def test_tome_plan_is_constant():
    cfg = ToMeConfig(ratio=0.4)
    plans = {(p.phase, p.ratio, p.merge_attn, p.merge_mlp) for p in (step_plan(cfg, i, 20) for i in range(20))}
    assert plans == {(Phase.TOME, 0.4, True, False)}
