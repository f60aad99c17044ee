"""One object per merging algorithm, behind the small interface the hooks drive through `MergeState`.

A method decides each step's `StepPlan`, builds a block's `TokenMerge` from the sub-layer input, and finishes a
sub-layer output (unmerge, cache). Per-call buffers (SDTM's staleness counters and output cache) live in a
`StreamBuffers`: one per transformer call of a step, so an extra call (SD3 skip-layer guidance, a split
classifier-free-guidance batch) never overwrites the main call's cache. A block's hooks reach their share of it, and
everything else of the running forward they need, through the block's `BlockSlot` (`sdtm_plugin.state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .config import SDTMConfig, TokenCacheConfig, ToMeConfig
from .merge import (Destinations, TokenMerge, bipartite_merge, choose_destinations, staleness_priority, unit_vectors,
                    window_medoid_scores, window_merge)
from .grid import WindowGrid
from .schedule import (Phase, StepPlan, cached_tokens, in_structure_phase, layer_is_protected, removal_schedule,
                       step_plan, token_cache_plan, tokens_removed)
from .selection import (RowSelection, change_scores, choose_rows, guidance_energy, guidance_scores,
                        token_sketch)

if TYPE_CHECKING:
    from .state import BlockSlot


NEVER = -1e6  # `StreamBuffers.computed_at` of a token never computed: its output changes at no measurable rate


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class StreamBuffers:
    """What one transformer call of a step carries to the same call of the next step.

    A block may see fewer images than the call (FasterCache computes only the conditional half, the trailing rows of
    a classifier-free-guidance batch, on some steps): it then reads and updates the trailing rows of the buffers,
    so the conditional images keep one history whatever the step computed.

    With `offload`, the output caches and slopes (the bulk: one (B, N, C) tensor per cached sub-layer) live in host
    memory (pinned when the model is on a GPU): a store copies the output out, a read copies it back for the
    sub-layer that needs it, both on the current stream without a host sync; a method that updates what it read in
    place writes it back (`update_output`, `update_slope`).

    Counters are one tensor per kind for all blocks of a token grid; each block reaches its own row and caches through
    its `BlockBuffers` (`blocks`), which holds no block index a compiled hook would read.

    Attributes:
        num_layers: blocks of the model.
        batch: images of the call (B).
        offload: keep the output caches and slopes in host memory.
    """

    num_layers: int
    batch: int
    offload: bool = False
    blocks: list[BlockBuffers] = field(default_factory=list)
    _counters: dict[tuple, torch.Tensor] = field(default_factory=dict)
    _now: torch.Tensor | None = None
    filled: bool = False  # a step computed every token of this call (token caching may serve tokens from then on)
    guidance: torch.Tensor | None = None  # (B/2, 1, *S) the last output's guidance energy (IBTM), else None

    def __post_init__(self) -> None:
        self.blocks = [BlockBuffers(self) for _ in range(self.num_layers)]

    def rows(self, batch: int) -> slice:
        """The trailing `batch` rows of the call's images."""
        if batch > self.batch:
            raise ValueError(f"a block saw {batch} images in a forward of {self.batch}")
        return slice(self.batch - batch, self.batch)

    def _counter(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The (L, B, ...) tensor of `key`, made on first use; each block's `BlockBuffers` gets its row."""
        if key not in self._counters:
            self._counters[key] = stacked = make()
            for block, row in zip(self.blocks, stacked.unbind(0)):
                block.counters[key] = row
        return self._counters[key]

    def staleness(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(L, batch, N) float32: per block, steps since each token's outputs were last computed on their own (a view
        of the call's trailing `batch` rows)."""
        return self._counter(("staleness", num_tokens), lambda: torch.zeros(
            self.num_layers, self.batch, num_tokens, device=device))[:, self.rows(batch)]

    def computed_at(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(L, batch, N) float32: per block, the step at which each token was last computed (far in the past before
        its first computation)."""
        return self._counter(("computed_at", num_tokens), lambda: torch.full(
            (self.num_layers, self.batch, num_tokens), NEVER, device=device))[:, self.rows(batch)]

    def references(self, batch: int, num_tokens: int, dim: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """(L, batch, N, D): per block, the sketch of each token's input when it was last computed (token caching's
        change measure; a view of the call's trailing `batch` rows)."""
        return self._counter(("references", num_tokens, dim), lambda: torch.zeros(
            self.num_layers, self.batch, num_tokens, dim, device=device, dtype=dtype))[:, self.rows(batch)]

    def now(self, device: torch.device) -> torch.Tensor:
        """() float32: the current step, a tensor set before each forward (a compiled forward reads its value without
        a guard on it)."""
        if self._now is None:
            self._now = torch.zeros((), device=device)
        return self._now

    def cached_layers(self) -> set[int]:
        """The blocks with an output in the merge cache."""
        return {layer for layer, block in enumerate(self.blocks) if block.cache}

    @property
    def num_cached(self) -> int:
        """Sub-layer outputs held in the merge cache."""
        return sum(len(block.cache) for block in self.blocks)

    def held_bytes(self) -> int:
        """Bytes of the tensors these buffers hold on the model's device (output caches and slopes unless offloaded,
        counters, reference sketches)."""
        tensors = [] if self.offload else self._outputs()
        tensors += [*self._counters.values(), *(t for t in (self._now, self.guidance) if t is not None)]
        return _nbytes(tensors)

    def host_bytes(self) -> int:
        """Bytes of the offloaded output caches and slopes in host memory (0 without `offload`)."""
        return _nbytes(self._outputs()) if self.offload else 0

    def _outputs(self) -> list[torch.Tensor]:
        return [t for block in self.blocks for slots in (block.cache, block.slopes) for t in slots.values()]

    def reset_staleness(self) -> None:
        for key, counters in self._counters.items():
            if key[0] == "staleness":
                counters.zero_()


class BlockBuffers:
    """One block's share of a `StreamBuffers`: its rows of the counters and its output caches, reached by the block's
    hooks without a block index (a compiled hook that read one would compile a graph per block).

    Attributes:
        cache: sub-layer name -> its last full-length output (B, N, C).
        slopes: sub-layer name -> that output's change per step (token caching's extrapolation).
        counters: (kind, ...) -> this block's row of the stream's counter of that kind.
    """

    def __init__(self, stream: StreamBuffers) -> None:
        self.stream = stream
        self.cache: dict[str, torch.Tensor] = {}
        self.slopes: dict[str, torch.Tensor] = {}
        self.counters: dict[tuple, torch.Tensor] = {}

    def _row(self, key: tuple, batch: int, allocate: Callable[[], Any]) -> torch.Tensor:
        if key not in self.counters:
            allocate()
        return self.counters[key][self.stream.rows(batch)]

    def staleness(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(batch, N) float32: `StreamBuffers.staleness` of this block."""
        return self._row(("staleness", num_tokens), batch,
                         lambda: self.stream.staleness(batch, num_tokens, device))

    def computed_at(self, batch: int, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(batch, N) float32: `StreamBuffers.computed_at` of this block."""
        return self._row(("computed_at", num_tokens), batch,
                         lambda: self.stream.computed_at(batch, num_tokens, device))

    def references(self, batch: int, num_tokens: int, dim: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        """(batch, N, D): `StreamBuffers.references` of this block."""
        return self._row(("references", num_tokens, dim), batch,
                         lambda: self.stream.references(batch, num_tokens, dim, device, dtype))

    def now(self, device: torch.device) -> torch.Tensor:
        return self.stream.now(device)

    def cached_output(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The last full-length output (batch, N, C) of a sub-layer (its trailing rows) on `device`, if one of that
        shape."""
        return self._read(self.cache, name, shape, device)

    def store_output(self, name: str, output: torch.Tensor) -> None:
        """Keep a sub-layer's full-length output (on the device a reference: outputs are never mutated); a partial
        batch replaces the trailing rows only."""
        self._write(self.cache, name, output)

    def update_output(self, name: str, output: torch.Tensor) -> None:
        """Write back a cached output read with `cached_output` and changed in place (offloaded: a copy was read)."""
        if self.stream.offload:
            self._write(self.cache, name, output)

    def cached_slope(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The change per step (batch, N, C) of a sub-layer's output between each token's last two computations."""
        return self._read(self.slopes, name, shape, device)

    def store_slope(self, name: str, slope: torch.Tensor) -> None:
        self._write(self.slopes, name, slope)

    def update_slope(self, name: str, slope: torch.Tensor) -> None:
        if self.stream.offload:
            self._write(self.slopes, name, slope)

    def _read(self, slots: dict[str, torch.Tensor], name: str, shape: torch.Size,
              device: torch.device) -> torch.Tensor | None:
        cache = slots.get(name)
        if cache is None or cache.shape[1:] != shape[1:]:
            return None
        cache = cache[self.stream.rows(shape[0])]
        return cache.to(device, non_blocking=True, copy=True) if self.stream.offload else cache

    def _write(self, slots: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
        value = value.detach()
        cache = slots.get(name)
        fits = cache is not None and cache.shape[1:] == value.shape[1:] and cache.dtype == value.dtype
        batch = self.stream.batch
        if self.stream.offload:
            if not fits:  # allocated once per slot and generation, rewritten at every store
                host = "meta" if value.device.type == "meta" else "cpu"  # shape-only runs allocate nothing
                cache = torch.zeros((batch, *value.shape[1:]), dtype=value.dtype, device=host,
                                    pin_memory=value.device.type == "cuda")
                slots[name] = cache
            cache[self.stream.rows(value.shape[0])].copy_(value, non_blocking=True)
            return
        if value.shape[0] < batch and fits:
            value = torch.cat([cache[: batch - value.shape[0]], value])
        slots[name] = value


class MergeMethod:
    """Interface of a merging algorithm.

    Before each forward (eagerly, outside any compiled region) the state asks for the step's `plan`, the tokens a
    merge removes on the model's grid (`tokens_removed`), the random draws (`noise_shape`) and which outputs the
    merge cache keeps (`cache_roles`), and hands each block its share in its `BlockSlot`; inside the forward,
    `observe`, `build`, `reuse` and `finish` read only the slot and the plan's phase and sub-layer flags (a bounded
    set: one compiled graph each), never the step or the block's index.

    Attributes:
        needs_step_count: whether `plan` depends on the number of steps (a bare model must then be told it).
        tracks_staleness: whether its merges age the buffers' staleness counters.
        roles: the sub-layer roles it may reduce ("attn", "cross", "mlp"); sub-layers of other roles are not hooked.
        attention_rows: None: a self-attention's whole input is merged (its queries, keys and values alike); "query":
            only its query rows are reduced (token caching: every token's key and value is kept); "key": only its key
            and value rows are merged (every token keeps its query). With one side reduced, rotary positions are
            applied per row by the patch (`rotary.RowRotary`) and merges are made per image.
    """

    needs_step_count = True
    tracks_staleness = False
    roles: tuple[str, ...] = ("attn", "mlp")
    attention_rows: str | None = None

    def __init__(self, config: SDTMConfig | ToMeConfig | None, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        """What the forward of `step` merges."""
        raise NotImplementedError

    def merges_layer(self, layer: int) -> bool:
        return True

    def removal_schedule(self, num_steps: int, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Tokens a merge removes at each step of a `num_steps` generation on an ``(h, w)`` or ``(frames, h, w)``
        token grid."""
        return tuple(tokens_removed(p.phase, p.ratio, grid, self.config.window)
                     for p in (self.plan(step, num_steps) for step in range(num_steps)))

    def tokens_removed(self, plan: StepPlan, grid: tuple[int, ...]) -> int:
        """Tokens a merge of `plan`'s step removes on an ``(h, w)`` or ``(frames, h, w)`` grid."""
        return tokens_removed(plan.phase, plan.ratio, grid, self.config.window)

    def noise_shape(self, grid: WindowGrid, batch: int, plan: StepPlan) -> tuple[int, ...] | None:
        """Shape of the uniform draws a merging forward of `plan` needs for `grid` and `batch` images (None: none)."""
        return None

    def stream_plan(self, plan: StepPlan, buffers: StreamBuffers) -> StepPlan:
        """The plan a call runs given what its buffers hold (eagerly, before the forward); by default `plan`."""
        return plan

    def prepare(self, buffers: StreamBuffers, plan: StepPlan, num_tokens: int, batch: int,
                device: torch.device) -> None:
        """Allocate the buffers the forward will update, eagerly (so that a compiled forward creates no state)."""
        if self.tracks_staleness and plan.merges:
            buffers.staleness(batch, num_tokens, device)

    def derive(self, grid: WindowGrid, plan: StepPlan, buffers: StreamBuffers, batch: int,
               noise: torch.Tensor | None) -> list[Any] | None:
        """Per block, what its merge needs that can be decided from the buffers and the draws `noise` (L, ...) before
        the forward, for all blocks of `grid` at once (a few kernels per forward instead of several per block); None:
        nothing. Each block's entry reaches its `build` as `slot.derived`."""
        return None

    @property
    def observes_output(self) -> bool:
        """Whether the method reads each forward's output (`observe_output`)."""
        return False

    def observe_output(self, buffers: StreamBuffers, output: torch.Tensor, grid: tuple[int, ...]) -> None:
        """A forward's denoiser output (its first element), for the next step's choices."""

    def observe(self, slot: BlockSlot, x: torch.Tensor) -> None:
        """A block computes every token in this step: `x` (B, N, C) is the input its first reduced sub-layer would
        have built its merge from."""

    def cache_roles(self, plan: StepPlan) -> tuple[str, ...]:
        """The sub-layer roles whose full-length outputs the merge cache keeps in this step (merged blocks only)."""
        return ()

    @property
    def reduces_attention_alone(self) -> bool:
        """Whether some step reduces the self-attention but not the MLP (else a block whose branches sit side by side,
        FLUX's single-stream block, never reads a cache at the attention branch's output)."""
        return True

    def kept_outputs(self) -> dict[str, int]:
        """Per sub-layer role, the full-length outputs (B, N, C) a merged block may keep between forwards in some
        step (a cache, its slope): what sizes the buffers of a call (`MergeState.cache_estimate`)."""
        return {}

    @property
    def plan_blocks(self) -> int:
        """Consecutive merged blocks that share one plan (`reuse` is called for all but the first)."""
        return 1

    def build(self, slot: BlockSlot, x: torch.Tensor, plan: StepPlan) -> TokenMerge | None:
        """The block's merge removing `slot.removed` tokens on `slot.window_grid`, from its first merged sub-layer
        input `x` (B, N, C); None: none."""
        raise NotImplementedError

    def reuse(self, slot: BlockSlot, merge: TokenMerge) -> None:
        """The block merges with the previous block's `merge`: update its per-block state."""

    def finish(self, slot: BlockSlot, name: str, merge: TokenMerge | None, output: torch.Tensor,
               store: bool) -> torch.Tensor:
        """A sub-layer output (B, N', C) -> (B, N, C); `store`: keep it in the merge cache."""
        return output if merge is None else merge.unmerge(output)


class NoMerge(MergeMethod):
    """Nothing merged: the method of a patch that only drives a step cache (`apply_step_cache`)."""

    needs_step_count = False

    def __init__(self, num_layers: int) -> None:
        super().__init__(None, num_layers)

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return StepPlan(step, num_steps or step + 1, Phase.FULL, 0.0, False, False)

    def tokens_removed(self, plan, grid):
        return 0

    def build(self, slot, x, plan):
        return None


class ToMe(MergeMethod):
    """Fixed-ratio bipartite merging on every step: a random (or top-left) destination per window.

    As in tomesd, destinations are drawn at random only for even batches (a classifier-free-guidance batch holds
    the conditional and unconditional halves of the same images, which then share their merge); one draw per
    forward for all blocks.
    """

    needs_step_count = False

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return step_plan(self.config, step, num_steps or step + 1)

    def noise_shape(self, grid, batch, plan):
        # one draw for every image, whatever the batch size (tomesd draws for even batches only, so an image
        # depended on how many others it was batched with)
        return (self.num_layers, 1, grid.num_windows, grid.window_size) if self.config.use_rand else None

    def derive(self, grid, plan, buffers, batch, noise):
        if noise is None:
            return None
        destinations = choose_destinations(grid, batch, noise.expand(-1, batch, -1, -1))
        return [destinations[layer] for layer in range(self.num_layers)]

    def build(self, slot, x, plan):
        removed, grid, b = slot.removed, slot.window_grid, x.shape[0]
        if removed == 0:
            return None
        destinations = None
        if self.config.use_rand:  # derived before the forward, unless the block sees part of its batch
            destinations = (slot.derived if slot.derived_batch == b else
                            choose_destinations(grid, b, slot.noise.expand(b, -1, -1)))
        return bipartite_merge(x, grid, removed, destinations, radius=self.config.match_radius,
                               sketch_dim=self.config.match_dim)


def _age(staleness: torch.Tensor, merge: TokenMerge) -> None:
    """T counts steps since a token was last computed on its own: +1 where merged, else back to 0 (in place, one
    kernel: ``(T + 1) * m = T * m + m`` for the 0/1 merged flags m)."""
    flags = merge.merged_flags()
    torch.addcmul(flags, staleness, flags, out=staleness)


@dataclass(frozen=True)
class _StalenessTerms:
    """What SDTM's merge of a block derives from its staleness counters and the forward's draws: for every block at
    once before the forward (`SDTM.derive`), each block then taking its own (`[layer]`). A block's counters change
    only at its own merge, so these are the values it would derive from its own counters at its merge.

    Attributes:
        window_priority: (..., B, W) each window's mean P_fre (SSM with a prior), else None.
        priority: (..., B, N) P_fre (bipartite merges with a prior), else None.
        destinations: each window's destination and the ranking bias (bipartite merges), None when each block
            chooses from its own input (`idm_destination="similar"`).
    """

    window_priority: torch.Tensor | None = None
    priority: torch.Tensor | None = None
    destinations: Destinations | None = None

    def __getitem__(self, index) -> "_StalenessTerms":
        return _StalenessTerms(*(None if t is None else t[index] for t in (self.window_priority, self.priority,
                                                                            self.destinations)))


class SDTM(MergeMethod):
    """Structure-then-detail merging: SSM whole-window merges, then IDM on the MLP, a merge cache, protection."""

    config: SDTMConfig
    tracks_staleness = True

    def __init__(self, config: SDTMConfig, num_layers: int) -> None:
        super().__init__(config, num_layers)
        self._schedules: dict[tuple, tuple[int, ...]] = {}

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return step_plan(self.config, step, num_steps)

    @property
    def attention_rows(self) -> str | None:
        return None if self.config.merge_queries else "key"

    def merges_layer(self, layer: int) -> bool:
        return not layer_is_protected(self.config, layer, self.num_layers)

    def removal_schedule(self, num_steps: int, grid: tuple[int, ...]) -> tuple[int, ...]:
        """Tokens removed per step on `grid` with the config's token budgets (`schedule.removal_schedule`), computed
        once per step count and grid."""
        key = (num_steps, grid)
        if key not in self._schedules:
            self._schedules[key] = removal_schedule(self.config, num_steps, grid)
        return self._schedules[key]

    def tokens_removed(self, plan, grid):
        return self.removal_schedule(plan.num_steps, grid)[plan.step]

    def noise_shape(self, grid, batch, plan):
        cfg = self.config
        if plan.phase is Phase.STRUCTURE and cfg.structure_merge == "window":
            return None
        if cfg.idm_destination == "random" or (cfg.idm_destination == "stalest" and cfg.use_rand):
            return (self.num_layers, batch, grid.num_windows, grid.window_size)
        return None

    def cache_roles(self, plan):
        cfg = self.config
        if not cfg.uses_cache:
            return ()
        if plan.protected:
            # attention is only merged again while the structure phase lasts (unless the detail phase merges it)
            attn = cfg.detail_merge_attn or in_structure_phase(cfg.switch_step, plan.step + 1, plan.num_steps)
            roles = ("attn", "mlp") if attn else ("mlp",)
        elif not cfg.cache_each_step:
            return ()
        else:
            roles = tuple(role for role in ("attn", "mlp") if plan.merges_sublayer(role))
        # an attention that keeps every query has whole outputs: nothing to blend
        return roles if cfg.merge_queries else tuple(role for role in roles if role != "attn")

    @property
    def reduces_attention_alone(self) -> bool:
        return not self.config.merge_mlp

    def kept_outputs(self):
        if not self.config.uses_cache:
            return {}
        return {"attn": 1, "mlp": 1} if self.config.merge_queries else {"mlp": 1}

    @property
    def plan_blocks(self) -> int:
        return self.config.plan_blocks

    @property
    def observes_output(self) -> bool:
        return self.config.idm_destination == "guidance" and self.config.ratio > 0

    def observe_output(self, buffers, output, grid):
        buffers.guidance = guidance_energy(output, grid)

    def _guidance(self, grid: WindowGrid, stream: StreamBuffers, batch: int) -> torch.Tensor | None:
        """(batch, N) the last output's guidance scores on `grid` of the call's trailing `batch` images (each pair of
        an unconditional and a conditional image shares its score), or None (not IBTM, or no output yet)."""
        if self.config.idm_destination != "guidance" or stream.guidance is None:
            return None
        scores = guidance_scores(stream.guidance, grid.grid)
        return torch.cat([scores, scores])[stream.rows(batch)]

    def derive(self, grid, plan, buffers, batch, noise):
        staleness = buffers.staleness(batch, grid.num_tokens, grid.window_tokens.device)  # (L, B, N)
        terms = self._staleness_terms(grid, plan, staleness, noise, self._guidance(grid, buffers, batch))
        return [terms[layer] for layer in range(self.num_layers)]

    def build(self, slot, x, plan):
        cfg = self.config
        removed, grid = slot.removed, slot.window_grid
        if removed == 0:
            return None
        b = x.shape[0]
        staleness = slot.buffers.staleness(b, x.shape[1], x.device)  # (B, N), this block's
        terms: _StalenessTerms = slot.derived if slot.derived_batch == b else self._staleness_terms(
            grid, plan, staleness, slot.noise[-b:] if slot.noise is not None else None,
            self._guidance(grid, slot.buffers.stream, b))  # part of the batch
        if plan.phase is Phase.STRUCTURE and cfg.structure_merge == "window":
            merge = window_merge(x, grid, removed // (grid.window_size - 1), terms.window_priority, cfg.a_s)
        else:
            unit, destinations = None, terms.destinations
            if destinations is None:  # "similar": from this block's input
                unit = unit_vectors(x)
                destinations = choose_destinations(grid, b, window_medoid_scores(x, grid, unit), terms.priority,
                                                   self._prior_weight(plan))
            merge = bipartite_merge(x, grid, removed, destinations, unit, cfg.match_radius, cfg.match_dim)
        _age(staleness, merge)
        return merge

    def reuse(self, slot, merge):
        _age(slot.buffers.staleness(merge.batch_size, merge.num_tokens, merge.device), merge)

    def _prior_weight(self, plan: StepPlan) -> float:
        return self.config.a_s if plan.phase is Phase.STRUCTURE else self.config.a_d

    def _staleness_terms(self, grid: WindowGrid, plan: StepPlan, staleness: torch.Tensor,
                         noise: torch.Tensor | None, guidance: torch.Tensor | None = None) -> _StalenessTerms:
        """`_StalenessTerms` from counters `staleness` (..., B, N), draws `noise` (..., B, W, K) or None and the
        guidance scores (B, N) of IBTM or None."""
        cfg = self.config
        weight = self._prior_weight(plan)
        priority = staleness_priority(staleness, cfg.prior) if weight else None
        if plan.phase is Phase.STRUCTURE and cfg.structure_merge == "window":
            if priority is None:
                return _StalenessTerms()
            window_priority = grid.window_reduce(priority.reshape(-1, grid.num_tokens), mean=True)
            return _StalenessTerms(window_priority=window_priority.view(*priority.shape[:-1], -1))
        choice = self.destination_choice(grid, staleness, noise, guidance)
        if choice is None:
            return _StalenessTerms(priority=priority)
        return _StalenessTerms(destinations=choose_destinations(grid, staleness.shape[-2], choice, priority, weight))

    def destination_choice(self, grid: WindowGrid, staleness: torch.Tensor, noise: torch.Tensor | None,
                           guidance: torch.Tensor | None = None) -> torch.Tensor | None:
        """(..., B, N) counters -> (..., B, W, K) scores whose argmax over each window is its destination
        (`SDTMConfig.idm_destination`); None for "similar", which each block derives from its input, and for
        "guidance" before the first output.

        `noise`: (..., B, W, K) uniform draws (`noise_shape`), for "random" and for the random ties of "stalest"
        with `use_rand`. `guidance`: (B, N) the guidance scores of "guidance" (`_guidance`).
        """
        rule = self.config.idm_destination
        if rule == "random":
            return noise
        if rule == "guidance" and guidance is not None:
            windows = grid.per_window(guidance)  # (B, W, K), the same for every block
            return windows.expand(*staleness.shape[:-2], *windows.shape)
        if rule in ("similar", "guidance"):
            return None
        # the stalest token, ties broken at random with use_rand
        plus = noise.flatten(0, -3) if noise is not None else None
        return grid.per_window(staleness.flatten(0, -2), plus).view(*staleness.shape[:-1], grid.num_windows,
                                                                    grid.window_size)

    def finish(self, slot, name, merge, output, store):
        if merge is not None:
            cfg = self.config
            shape = torch.Size((output.shape[0], merge.num_tokens, output.shape[-1]))
            cache = slot.buffers.cached_output(name, shape, output.device) if cfg.uses_cache else None
            output = merge.unmerge(output, cache, cfg.mcw)
        if store:
            slot.buffers.store_output(name, output)
        return output


class TokenCache(MergeMethod):
    """Token caching (`TokenCacheConfig`): dense steps compute and cache every token's sub-layer outputs; a cached
    step computes, per image and block, the tokens whose input changed most since they were last computed (or a
    random / least-redundant share), the others keep their own cached outputs, moved along their last change per
    step (`TokenCacheConfig.extrapolation`). Self-attention keeps every key.

    Per block the buffers hold the step each token was last computed at and the sketch of its input then; per cached
    sub-layer its last output of every token and, with extrapolation, that output's change per step between the
    token's last two computations; with `TokenCacheConfig.cache_keys` the self-attention's last key and value
    projections of every token (`hooks.KeyCacheHook`).
    """

    config: TokenCacheConfig
    roles = ("attn", "cross", "mlp")
    attention_rows = "query"

    @property
    def needs_step_count(self) -> bool:
        return self.config.final_dense_steps > 0 and self.config.ratio > 0

    def plan(self, step: int, num_steps: int | None) -> StepPlan:
        return token_cache_plan(self.config, step, num_steps if num_steps is not None else step + 1)

    def removal_schedule(self, num_steps: int, grid: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.tokens_removed(self.plan(step, num_steps), grid) for step in range(num_steps))

    def tokens_removed(self, plan, grid):
        return cached_tokens(plan.ratio, math.prod(grid)) if plan.phase is Phase.CACHED else 0

    def stream_plan(self, plan, buffers):
        if plan.phase is Phase.CACHED and not buffers.filled:  # nothing cached yet (img2img starts mid-schedule)
            return StepPlan(plan.step, plan.num_steps, Phase.FULL, 0.0, False, False)
        return plan

    def prepare(self, buffers, plan, num_tokens, batch, device):
        buffers.now(device).fill_(plan.step)
        buffers.computed_at(batch, num_tokens, device)

    def noise_shape(self, grid, batch, plan):
        if plan.phase is Phase.CACHED and self.config.selection == "random":
            return (self.num_layers, batch, grid.num_tokens)
        return None

    def cache_roles(self, plan):
        cfg = self.config
        if cfg.ratio <= 0:
            return ()
        return tuple(role for role, cached in (("attn", cfg.cache_attn), ("cross", cfg.cache_cross),
                                               ("mlp", cfg.cache_mlp)) if cached)

    @property
    def reduces_attention_alone(self) -> bool:
        return not self.config.cache_mlp

    def kept_outputs(self):
        per_role = 2 if self.config.extrapolation else 1  # the last output, and its change per step
        kept = {role: per_role for role in self.cache_roles(None)}
        if self.config.cache_keys and kept:
            kept["keys"] = 1  # each key and value projection's last output
        return kept

    @staticmethod
    def _references(buffers: BlockBuffers, sketch: torch.Tensor) -> torch.Tensor:
        b, n, d = sketch.shape
        return buffers.references(b, n, d, sketch.device, torch.float32)

    def observe(self, slot, x):
        b, n, _ = x.shape
        buffers = slot.buffers
        now = buffers.now(x.device)
        computed_at = buffers.computed_at(b, n, x.device)
        slot.gap = (now - computed_at).unsqueeze(-1)  # (B, N, 1) steps since last computed
        computed_at.copy_(now.expand_as(computed_at))
        if self.config.selection == "change":
            sketch = token_sketch(x, self.config.sketch_dim)
            self._references(buffers, sketch).copy_(sketch)

    def build(self, slot, x, plan):
        removed, grid, buffers = slot.removed, slot.window_grid, slot.buffers
        if removed == 0:
            return None
        cfg = self.config
        b, n, _ = x.shape
        now = buffers.now(x.device)
        computed_at = buffers.computed_at(b, n, x.device)
        age = now - computed_at  # (B, N) steps since each token was last computed
        sketch = reference = None
        if cfg.selection == "change":
            sketch = token_sketch(x, cfg.sketch_dim)
            reference = self._references(buffers, sketch)
            score = change_scores(sketch, reference)
        elif cfg.selection == "random":
            score = slot.noise[-b:]
        else:  # the tokens least similar to their window computed first (loose tokens: neutral)
            similarity = torch.zeros(b * n, device=x.device)
            windows = grid.batch_tables(b).window_tokens.flatten()
            similarity.index_copy_(0, windows, window_medoid_scores(x, grid).flatten())
            score = similarity.view(b, n).neg_()
        if cfg.staleness_weight:
            score = score.add(age, alpha=cfg.staleness_weight)
        selection = RowSelection(choose_rows(score, n - removed), n)
        flat = selection.flat_rows
        selection.gap = age.view(-1).index_select(0, flat).unsqueeze(-1)  # (B·A, 1)
        computed_at.view(-1).index_fill_(0, flat, now)
        selection.age = (now - computed_at).unsqueeze(-1)  # (B, N, 1): 0 where computed now
        if reference is not None:
            d = reference.shape[-1]
            reference.view(-1, d).index_copy_(0, flat, sketch.reshape(-1, d).index_select(0, flat))
        return selection

    def finish(self, slot, name, merge, output, store):
        weight = self.config.extrapolation
        buffers = slot.buffers
        if merge is None:  # dense: every token computed, kept as it is (updated in place at the cached steps)
            if store and weight:
                last = buffers.cached_output(name, output.shape, output.device)
                gap = slot.gap[-output.shape[0]:].to(output.dtype)
                slope = torch.zeros_like(output) if last is None else torch.sub(output, last).div_(gap)
                buffers.store_slope(name, slope)
            if store:
                buffers.store_output(name, output)
            return output
        shape = torch.Size((output.shape[0], merge.num_tokens, output.shape[-1]))
        last = buffers.cached_output(name, shape, output.device)
        if last is None:
            raise RuntimeError(f"block {slot.index} {name}: no cached output to complete a cached step (the block did not "
                               "run at any dense step of this call)")
        c = last.shape[-1]
        rows, flat = output.reshape(-1, c), merge.flat_rows
        slope = None
        if weight:  # the computed tokens' change per step since their previous computation
            computed_slope = torch.sub(rows, last.reshape(-1, c).index_select(0, flat)).div_(merge.gap.to(rows.dtype))
            slope = buffers.cached_slope(name, shape, output.device)
            slope.view(-1, c).index_copy_(0, flat, computed_slope)
            buffers.update_slope(name, slope)
        last.view(-1, c).index_copy_(0, flat, rows)  # each token's last computed output
        buffers.update_output(name, last)
        if not weight:
            return last
        # computed tokens have age 0: their exact outputs; the others move along their last change per step
        return torch.addcmul(last, slope, merge.age.to(rows.dtype), value=weight)


def make_method(config: SDTMConfig | ToMeConfig | TokenCacheConfig | None, num_layers: int) -> MergeMethod:
    if config is None:
        return NoMerge(num_layers)
    if isinstance(config, SDTMConfig):
        return SDTM(config, num_layers)
    if isinstance(config, ToMeConfig):
        return ToMe(config, num_layers)
    if isinstance(config, TokenCacheConfig):
        return TokenCache(config, num_layers)
    raise TypeError(f"config must be an SDTMConfig, a ToMeConfig or a TokenCacheConfig, got {type(config).__name__}")
