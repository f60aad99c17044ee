"""`MergeState`: everything one patched transformer remembers across blocks and steps, reset per generation."""

from __future__ import annotations

import logging

import torch

from .config import SDTMConfig, ToMeConfig
from .merge import MergePlan, WindowLayout, bipartite_merge_plan, staleness_priority, window_merge_plan
from .schedule import Phase, StepPlan, in_structure_phase, layer_is_protected, step_plan, tokens_removed

logger = logging.getLogger(__name__)

ROLES = ("attn", "mlp")


class MergeState:
    """Step counter, per-block grids and merge plans, staleness counters T and the output cache of one model.

    One model forward is one denoising step (pipelines batch the CFG halves). A generation starts when the
    pipeline's scheduler sets its timesteps (`begin_generation`), or, for a bare model, after
    `num_inference_steps` forwards.

    Staleness ``T[l][b, n]`` counts the steps since token n's outputs in block l were last computed on their own
    (not merged); it is kept per block because the cache that merged tokens fall back on is per block. The cache
    holds each block's un-gated sub-layer outputs at full length (B, N, C); it is refreshed on protected steps,
    and at every step with `cache_each_step`.
    """

    def __init__(self, config: SDTMConfig | ToMeConfig, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self.num_steps: int | None = config.num_inference_steps
        self._layouts: dict[tuple, WindowLayout] = {}
        self._staleness: list[torch.Tensor | None] = [None] * num_layers  # (B, N_l) int32, reused across calls
        self.reset()

    # -- generation / step bookkeeping -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the current generation (step, plans, cache); buffers of the same shape are reused."""
        self.step = -1
        self.plan: StepPlan | None = None
        self.grid: tuple[int, int] | None = None
        self.batch_size: int | None = None
        self.layer_grids: list[tuple[int, int] | None] = [None] * self.num_layers
        self.layer_plans: list[MergePlan | None] = [None] * self.num_layers
        self.cache: list[dict[str, torch.Tensor]] = [{} for _ in range(self.num_layers)]
        self._generators: dict[torch.device, torch.Generator] = {}
        self.token_counts: list[dict[str, list[int | None]]] = []  # per step: tokens entering each role per block

    def begin_generation(self, num_steps: int) -> None:
        self.reset()
        self.num_steps = int(num_steps)

    def begin_step(self, grid: tuple[int, int], batch_size: int) -> StepPlan:
        """Start a model forward on latents whose token grid is `grid` (every block's, unless a grid source says)."""
        if self.num_steps is None:
            raise RuntimeError(
                "the step count is unknown: apply SDTM/ToMe to the pipeline (its scheduler gives the step count) or "
                "pass num_inference_steps=... when applying it to a bare model"
            )
        if self.step + 1 >= self.num_steps:  # past the last step: the next generation begins
            self.begin_generation(self.num_steps)
        if self.step >= 0 and (grid != self.grid or batch_size != self.batch_size):
            # another resolution or batch mid-generation belongs to a new generation
            self.begin_generation(self.num_steps)
        self.step += 1
        self.grid, self.batch_size = grid, batch_size
        self.plan = step_plan(self.config, self.step, self.num_steps)
        self.layer_grids = [grid] * self.num_layers
        self.layer_plans = [None] * self.num_layers
        self.token_counts.append({role: [None] * self.num_layers for role in ROLES})
        if self.step == 0 or not self.plan.merges:  # a full step computes every token on its own
            for counter in self._staleness:
                if counter is not None:
                    counter.zero_()
        return self.plan

    def set_layer_grid(self, layers: list[int], grid: tuple[int, int]) -> None:
        for layer in layers:
            self.layer_grids[layer] = grid

    def _downsample_allowed(self, layer: int) -> bool:
        (h, w), (gh, gw) = self.grid, self.layer_grids[layer]
        return h * w <= gh * gw * self.config.max_downsample**2

    def _layout(self, grid: tuple[int, int], device: torch.device) -> WindowLayout:
        key = (grid, device)
        if key not in self._layouts:
            self._layouts[key] = WindowLayout.build(grid, self.config.sx, self.config.sy, device)
        return self._layouts[key]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":  # shape-only runs (MAC counting) draw nothing
            return None
        if device not in self._generators:
            seed = self.config.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self._generators[device] = torch.Generator(device).manual_seed(seed)
        return self._generators[device]

    def _staleness_of(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        counter = self._staleness[layer]
        if counter is None or counter.shape != x.shape[:2] or counter.device != x.device:
            counter = self._staleness[layer] = torch.zeros(x.shape[:2], dtype=torch.int32, device=x.device)
        return counter

    # -- per sub-layer -----------------------------------------------------------------------------------------
    def merge_plan(self, layer: int, role: str, x: torch.Tensor) -> MergePlan | None:
        """The plan for a sub-layer of `role` ("attn" / "mlp") in block `layer`, built once per block and step.

        Built from the input of the block's first merged sub-layer (the attention input in the structure phase,
        the MLP input in the detail phase) and shared by the others. None when this sub-layer runs on all tokens.
        """
        plan = self.plan
        if plan is None:
            raise RuntimeError("a merged block ran outside a model forward; was the step hook removed?")
        grid = self.layer_grids[layer]
        num_tokens = grid[0] * grid[1]
        if x.dim() != 3 or x.shape[1] != num_tokens:
            raise ValueError(
                f"block {layer} {role}: expected hidden states (B, {num_tokens}, C) for the {grid[0]}x{grid[1]} "
                f"token grid, got {tuple(x.shape)} (chunked feed-forward cannot be combined with merging)"
            )
        counts = self.token_counts[-1][role]
        counts[layer] = num_tokens
        if (
            not plan.merges_sublayer(role)
            or layer_is_protected(self.config, layer, self.num_layers)
            or not self._downsample_allowed(layer)
        ):
            return None
        merge = self.layer_plans[layer]
        if merge is None:
            merge = self._build_plan(layer, x)
            self.layer_plans[layer] = merge
        if merge is not None:
            counts[layer] = merge.num_rows
        return merge

    def _build_plan(self, layer: int, x: torch.Tensor) -> MergePlan | None:
        cfg, plan, grid = self.config, self.plan, self.layer_grids[layer]
        removed = tokens_removed(plan.phase, plan.ratio, x.shape[1], grid, cfg.sx, cfg.sy)
        if removed == 0:
            return None
        layout = self._layout(grid, x.device)
        if plan.phase is Phase.TOME:
            dst_score = None
            if cfg.use_rand:  # one random destination per window, shared by the batch as in tomesd
                dst_score = torch.rand(
                    layout.window_tokens.shape, generator=self._generator(x.device), device=x.device
                ).expand(x.shape[0], -1, -1)
            return bipartite_merge_plan(x, layout, removed, dst_score)

        staleness = self._staleness_of(layer, x)
        priority = staleness_priority(staleness)
        if plan.phase is Phase.STRUCTURE:
            merge = window_merge_plan(x, layout, removed // (cfg.window_size - 1), priority, cfg.a_s)
        else:
            # destination: the stalest token of the window, ties broken at random with use_rand
            dst_score = layout.windows(staleness).float()
            if cfg.use_rand:
                dst_score = dst_score + torch.rand(
                    dst_score.shape, generator=self._generator(x.device), device=x.device
                )
            merge = bipartite_merge_plan(x, layout, removed, dst_score, priority, cfg.a_d)
        staleness.add_(1).masked_fill_(~merge.merged.squeeze(-1), 0)
        return merge

    def finish(self, layer: int, name: str, role: str, merge: MergePlan | None, output: torch.Tensor) -> torch.Tensor:
        """Unmerge a sub-layer output (B, N', C) -> (B, N, C), blend merged tokens with the cache, refresh it."""
        cfg = self.config
        if merge is not None:
            cache = self.cache[layer].get(name) if isinstance(cfg, SDTMConfig) else None
            if cache is not None and cache.shape != (output.shape[0], merge.num_tokens, output.shape[-1]):
                cache = None
            output = merge.unmerge(output, cache, getattr(cfg, "mcw", 1.0))
        if self._stores_cache(layer, role):
            self.cache[layer][name] = output.detach()
        return output

    def _stores_cache(self, layer: int, role: str) -> bool:
        cfg, plan = self.config, self.plan
        if not isinstance(cfg, SDTMConfig) or not cfg.uses_cache or layer_is_protected(cfg, layer, self.num_layers):
            return False
        if not self._downsample_allowed(layer):
            return False
        if plan.protected:
            # attention is only merged again while the structure phase lasts
            return role == "mlp" or in_structure_phase(cfg.switch_step, plan.step + 1, plan.num_steps)
        return cfg.cache_each_step and plan.merges_sublayer(role)
