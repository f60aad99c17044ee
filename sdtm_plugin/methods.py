"""One object per merging algorithm, behind the small interface the hooks drive through `MergeState`.

A method decides each step's `StepPlan`, builds a block's `TokenMerge` from the sub-layer input, and finishes a
sub-layer output (unmerge, cache). Per-call buffers (SDTM's staleness counters and output cache) live in a
`StreamBuffers` that the state hands in: one per transformer call of a step, so an extra call (SD3 skip-layer
guidance, a split classifier-free-guidance batch) never overwrites the main call's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SDTMConfig, ToMeConfig
from .merge import TokenMerge, WindowGrid, bipartite_merge, staleness_priority, window_medoid_scores, window_merge
from .schedule import Phase, StepPlan, in_structure_phase, layer_is_protected, step_plan, tokens_removed


@dataclass
class StreamBuffers:
    """What one transformer call of a step carries to the same call of the next step.

    Attributes:
        staleness: per block, (B, N) float32 steps since each token's outputs were last computed on their own.
        cache: per block, sub-layer name -> (B, N, C) that sub-layer's last full-length output.
    """

    num_layers: int
    staleness: list[torch.Tensor | None] = field(default_factory=list)
    cache: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.staleness = [None] * self.num_layers
        self.cache = [{} for _ in range(self.num_layers)]

    def staleness_of(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        counter = self.staleness[layer]
        if counter is None or counter.shape != x.shape[:2] or counter.device != x.device:
            counter = self.staleness[layer] = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        return counter

    def reset_staleness(self) -> None:
        for counter in self.staleness:
            if counter is not None:
                counter.zero_()


class MergeMethod:
    """Interface of a merging algorithm.

    Attributes:
        needs_step_count: whether `plan` depends on the number of steps (a bare model must then be told it).
    """

    needs_step_count = True

    def __init__(self, config: SDTMConfig | ToMeConfig | None, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        """What the forward of `step` merges."""
        raise NotImplementedError

    def merges_layer(self, layer: int) -> bool:
        return True

    @property
    def plan_blocks(self) -> int:
        """Consecutive merged blocks that share one plan (`reuse` is called for all but the first)."""
        return 1

    def build(self, layer: int, x: torch.Tensor, grid: WindowGrid, plan: StepPlan, buffers: StreamBuffers,
              generator: torch.Generator | None) -> TokenMerge | None:
        """The block's merge for this step from its first merged sub-layer input `x` (B, N, C); None: none."""
        raise NotImplementedError

    def reuse(self, layer: int, merge: TokenMerge, buffers: StreamBuffers) -> None:
        """Block `layer` merges with the previous block's `merge`: update its per-block state."""

    def finish(self, layer: int, name: str, role: str, merge: TokenMerge | None, output: torch.Tensor,
               plan: StepPlan, buffers: StreamBuffers) -> torch.Tensor:
        """A sub-layer output (B, N', C) -> (B, N, C)."""
        return output if merge is None else merge.unmerge(output)


class NoMerge(MergeMethod):
    """Nothing merged: the method of a patch that only drives a step cache (`apply_step_cache`)."""

    needs_step_count = False

    def __init__(self, num_layers: int) -> None:
        super().__init__(None, num_layers)

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return StepPlan(step, num_steps or step + 1, Phase.FULL, 0.0, False, False)

    def build(self, layer, x, grid, plan, buffers, generator):
        return None


def _uniform(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=x.device)


class ToMe(MergeMethod):
    """Fixed-ratio bipartite merging on every step: a random (or top-left) destination per window.

    As in tomesd, destinations are drawn at random only for even batches (a classifier-free-guidance batch holds
    the conditional and unconditional halves of the same images, which then share their merge).
    """

    needs_step_count = False

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return step_plan(self.config, step, num_steps or step + 1)

    def build(self, layer, x, grid, plan, buffers, generator):
        removed = tokens_removed(plan.phase, plan.ratio, x.shape[1], grid.grid, grid.sx, grid.sy)
        if removed == 0:
            return None
        destination_score = None
        if self.config.use_rand and x.shape[0] % 2 == 0:  # one random destination per window, shared by the batch
            destination_score = _uniform(tuple(grid.window_tokens.shape), x, generator).expand(x.shape[0], -1, -1)
        return bipartite_merge(x, grid, removed, destination_score)


def _age(staleness: torch.Tensor, merge: TokenMerge) -> None:
    """T counts steps since a token was last computed on its own: +1 where merged, else back to 0 (in place, one
    kernel: ``(T + 1) * m = T * m + m`` for the 0/1 merged flags m)."""
    flags = merge.merged_flags()
    torch.addcmul(flags, staleness, flags, out=staleness)


class SDTM(MergeMethod):
    """Structure-then-detail merging: SSM whole-window merges, then IDM on the MLP, a merge cache, protection."""

    config: SDTMConfig

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return step_plan(self.config, step, num_steps)

    def merges_layer(self, layer: int) -> bool:
        return not layer_is_protected(self.config, layer, self.num_layers)

    @property
    def plan_blocks(self) -> int:
        return self.config.plan_blocks

    def build(self, layer, x, grid, plan, buffers, generator):
        cfg = self.config
        removed = tokens_removed(plan.phase, plan.ratio, x.shape[1], grid.grid, cfg.sx, cfg.sy)
        if removed == 0:
            return None
        staleness = buffers.staleness_of(layer, x)
        priority = staleness_priority(staleness, cfg.prior) if (cfg.a_s or cfg.a_d) else None
        if plan.phase is Phase.STRUCTURE and cfg.structure_merge == "window":
            merge = window_merge(x, grid, removed // (grid.window_size - 1), priority, cfg.a_s)
        else:
            weight = cfg.a_s if plan.phase is Phase.STRUCTURE else cfg.a_d
            merge = bipartite_merge(x, grid, removed, self._destinations(x, grid, staleness, generator), priority,
                                    weight)
        _age(staleness, merge)
        return merge

    def reuse(self, layer, merge, buffers):
        _age(buffers.staleness_of(layer, merge.merged_flags()), merge)

    def _destinations(self, x: torch.Tensor, grid: WindowGrid, staleness: torch.Tensor,
                      generator: torch.Generator | None) -> torch.Tensor:
        """(B, W, K) score whose argmax over each window is its destination (`SDTMConfig.idm_destination`)."""
        rule = self.config.idm_destination
        shape = (x.shape[0], grid.num_windows, grid.window_size)
        if rule == "random":
            return _uniform(shape, x, generator)
        if rule == "similar":
            return window_medoid_scores(x, grid)
        # the stalest token, ties broken at random with use_rand
        return grid.per_window(staleness, _uniform(shape, x, generator) if self.config.use_rand else None)

    def finish(self, layer, name, role, merge, output, plan, buffers):
        cfg = self.config
        if merge is not None:
            cache = buffers.cache[layer].get(name) if cfg.uses_cache else None
            if cache is not None and cache.shape != (output.shape[0], merge.num_tokens, output.shape[-1]):
                cache = None
            output = merge.unmerge(output, cache, cfg.mcw)
        if self._stores_cache(layer, role, plan):
            buffers.cache[layer][name] = output.detach()  # a reference, not a copy: outputs are never mutated
        return output

    def _stores_cache(self, layer: int, role: str, plan: StepPlan) -> bool:
        cfg = self.config
        if not cfg.uses_cache or not self.merges_layer(layer):
            return False
        if plan.protected:
            # attention is only merged again while the structure phase lasts (unless the detail phase merges it)
            return (role == "mlp" or cfg.detail_merge_attn
                    or in_structure_phase(cfg.switch_step, plan.step + 1, plan.num_steps))
        return cfg.cache_each_step and plan.merges_sublayer(role)


def make_method(config: SDTMConfig | ToMeConfig | None, num_layers: int) -> MergeMethod:
    if config is None:
        return NoMerge(num_layers)
    if isinstance(config, SDTMConfig):
        return SDTM(config, num_layers)
    if isinstance(config, ToMeConfig):
        return ToMe(config, num_layers)
    raise TypeError(f"config must be an SDTMConfig or a ToMeConfig, got {type(config).__name__}")
