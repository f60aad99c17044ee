"""What each denoising step and block does: the cosine ratio schedule, the SSM/IDM phases and protection.

Everything here is host-side arithmetic on Python numbers, computed once per step, so the hot path never syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .config import SWITCH_STEP_REFERENCE_STEPS, SDTMConfig, TokenCacheConfig, ToMeConfig
from .grid import window_counts


TOKEN_ALIGNMENT = 8  # budgets remove multiples of this many tokens (and of whole windows): aligned GEMM lengths


class Phase(str, Enum):
    STRUCTURE = "structure"  # SSM: whole windows merged, attention and MLP
    DETAIL = "detail"  # IDM: bipartite merging, MLP only
    TOME = "tome"  # fixed-ratio bipartite merging
    CACHED = "cached"  # token caching: a share of the tokens recomputed, the others served from the token cache
    FULL = "full"  # nothing merged (protected step or zero ratio)


@dataclass(frozen=True)
class StepPlan:
    """The decisions for one denoising step (one transformer forward, both CFG halves included)."""

    step: int
    num_steps: int
    phase: Phase
    ratio: float
    merge_attn: bool
    merge_mlp: bool
    protected: bool = False
    merge_cross: bool = False

    @property
    def merges(self) -> bool:
        return self.phase is not Phase.FULL

    def merges_sublayer(self, role: str) -> bool:
        """Whether a sub-layer of `role` ("attn", "cross", "mlp") runs on fewer rows than tokens in this step."""
        return {"attn": self.merge_attn, "cross": self.merge_cross, "mlp": self.merge_mlp}[role]


def cosine_ratio(ratio: float, deviation: float, step: int, num_steps: int) -> float:
    """Merge ratio at `step`: ``ratio + deviation`` at the first step down to ``ratio - deviation`` at the last.

    ``p = step / (num_steps - 1)``, ``ratio_t = (ratio - deviation) + 2 * deviation * cos(p * pi / 2)``.
    """
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    return (ratio - deviation) + 2.0 * deviation * math.cos(min(progress, 1.0) * math.pi / 2)


def in_structure_phase(switch_step: int, step: int, num_steps: int) -> bool:
    """`switch_step` is on the 50-step grid: step ``i`` of ``S`` is structural iff ``i * 50 <= switch_step * S``."""
    return step * SWITCH_STEP_REFERENCE_STEPS <= switch_step * num_steps


def step_plan(config: SDTMConfig | ToMeConfig, step: int, num_steps: int) -> StepPlan:
    """The plan of `step` of a `num_steps` generation for either method."""
    if isinstance(config, ToMeConfig):
        phase = Phase.TOME if config.ratio > 0 else Phase.FULL
        return StepPlan(step, num_steps, phase, config.ratio, config.merge_attn, config.merge_mlp)

    protected = config.protect_steps_frequency >= 1 and step % config.protect_steps_frequency == 0
    ratio = cosine_ratio(config.ratio, config.effective_deviation, step, num_steps)
    if protected or ratio <= 0:
        return StepPlan(step, num_steps, Phase.FULL, 0.0, False, False, protected=protected)
    if in_structure_phase(config.switch_step, step, num_steps):
        return StepPlan(step, num_steps, Phase.STRUCTURE, ratio, config.merge_attn, config.merge_mlp)
    merge_attn = config.merge_attn and config.detail_merge_attn  # the paper merges the MLP only here
    if not (config.merge_mlp or merge_attn):
        return StepPlan(step, num_steps, Phase.FULL, 0.0, False, False)
    return StepPlan(step, num_steps, Phase.DETAIL, ratio, merge_attn, config.merge_mlp)


def is_dense_step(config: TokenCacheConfig, step: int, num_steps: int) -> bool:
    """Token caching computes every token at the first `warmup_steps` steps, at the last `final_dense_steps` and, in
    between, at every `dense_every`-th step after the warm-up."""
    if step < config.warmup_steps or step >= num_steps - config.final_dense_steps:
        return True
    return config.dense_every >= 2 and (step - config.warmup_steps + 1) % config.dense_every == 0


def token_cache_plan(config: TokenCacheConfig, step: int, num_steps: int) -> StepPlan:
    """A dense step (`Phase.FULL`, every token computed and cached) or a cached one (`Phase.CACHED`)."""
    if config.ratio <= 0 or is_dense_step(config, step, num_steps):
        return StepPlan(step, num_steps, Phase.FULL, 0.0, False, False)
    return StepPlan(step, num_steps, Phase.CACHED, config.ratio, config.cache_attn, config.cache_mlp,
                    merge_cross=config.cache_cross)


def cached_tokens(ratio: float, num_tokens: int) -> int:
    """Tokens a cached step serves from the cache: ``ratio * N`` rounded down so that the recomputed tokens are a
    multiple of `TOKEN_ALIGNMENT` (one static length per grid, GEMM-aligned), at least that many recomputed."""
    computed = math.ceil((num_tokens - ratio * num_tokens) / TOKEN_ALIGNMENT) * TOKEN_ALIGNMENT
    return max(num_tokens - max(computed, TOKEN_ALIGNMENT), 0)


def layer_is_protected(config: SDTMConfig | ToMeConfig, layer: int, num_layers: int) -> bool:
    """SDTM's layer protection: ``layer % k == 0`` and the last block (k = -1: none), and the first / last blocks
    `protect_first_layers` / `protect_last_layers`, run unmerged."""
    freq = getattr(config, "protect_layers_frequency", -1)
    if freq >= 1 and (layer % freq == 0 or layer == num_layers - 1):
        return True
    first, last = getattr(config, "protect_first_layers", 0), getattr(config, "protect_last_layers", 0)
    return layer < first or layer >= num_layers - last


def tokens_removed(phase: Phase, ratio: float, grid: tuple[int, ...], window: tuple[int, int, int]) -> int:
    """How many tokens a merge removes, before the N tokens of an ``(h, w)`` or ``(frames, h, w)`` grid reach
    attention or the MLP.

    SSM merges whole windows: ``floor(ratio * N / (K - 1))`` windows of K = st * sy * sx tokens (`window`), capped at
    the number of full windows. IDM and ToMe merge ``floor(ratio * N)`` sources, capped at the number of sources.
    No rounding to multiples of 16 (the reference code's choice): the merged length is the GEMM's M dimension,
    which tensor cores do not need aligned, and rounding would silently change the schedule on small grids.
    """
    num_tokens = math.prod(grid)
    windows = math.prod(window_counts(grid, window))
    k = math.prod(window)
    if phase is Phase.STRUCTURE:
        return min(int(ratio * num_tokens / (k - 1)), windows) * (k - 1)
    if phase in (Phase.DETAIL, Phase.TOME):
        return min(int(ratio * num_tokens), num_tokens - windows)
    return 0


def removal_schedule(config: SDTMConfig, num_steps: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    """Tokens a merge removes at each step of a `num_steps` generation on an ``(h, w)`` or ``(frames, h, w)``
    token grid.

    With ``config.token_budgets = None``, each step's exact count (`tokens_removed`, the paper's). Otherwise the
    merged steps, sorted by their exact count, are cut into `token_budgets` groups of (nearly) equal size; each group
    removes its mean count rounded to a multiple of ``lcm(st * sy * sx - 1, TOKEN_ALIGNMENT)`` (whole windows, aligned
    lengths), at least one such granule and at most the grid's cap. The generation's mean ratio is kept to within
    half a granule per budget, and every sub-layer sees at most `token_budgets` distinct merged lengths.
    """
    n = math.prod(grid)
    plans = [step_plan(config, step, num_steps) for step in range(num_steps)]
    exact = [tokens_removed(p.phase, p.ratio, grid, config.window) for p in plans]
    if config.token_budgets is None:
        return tuple(exact)
    k = config.window_size
    granule = math.lcm(k - 1, TOKEN_ALIGNMENT)
    windows = math.prod(window_counts(grid, config.window))
    cap = min(windows * (k - 1), n - windows) // granule * granule  # SSM's whole windows, IDM's sources
    merged = sorted((count, step) for step, count in enumerate(exact) if count > 0)
    if cap < granule or not merged:  # a grid too small for one granule: nothing merges at all in budget mode
        return tuple(0 for _ in exact)
    budgets = list(exact)
    groups = min(config.token_budgets, len(merged))
    for g in range(groups):
        members = merged[g * len(merged) // groups:(g + 1) * len(merged) // groups]
        mean = sum(count for count, _ in members) / len(members)
        level = min(max(round(mean / granule), 1) * granule, cap)
        for _, step in members:
            budgets[step] = level
    return tuple(budgets)
