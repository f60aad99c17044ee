"""`MergeState`: what a patched model merges at each step of a generation, and what it merged.

The step comes from the `GenerationClock` (`sdtm_plugin.clock`). Each transformer call within a step is a *stream*
with its own buffers (`StreamBuffers`: staleness counters, merge cache), held for one generation and freed when it
ends (`end_generation`); the telemetry of the last generation stays readable.

A forward has two halves. `begin_forward` runs eagerly before it (never inside a compiled region): it moves the
clock, plans the step (`ForwardPlan`), works out the tokens each merge removes, draws the forward's random numbers,
resets what a full step resets, opens the telemetry record, and hands each block its share of all that in its
`BlockSlot`. The blocks (`block_merge`, `finish`) then read only their slot (values of a bounded set: the phase,
the sub-layer flags, the token budget, which outputs to cache; tensors), never a step or a block index: under
`torch.compile(fullgraph=True)` the forward is one graph per budget and phase, and under regional compilation
(`compile_repeated_blocks`) blocks whose slots agree share one graph. `open_forward` / `close_forward` clear what a
block keeps within the forward (its merge), so nothing a compiled forward builds outlives it.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .clock import GenerationClock
from .config import SDTMConfig, ToMeConfig
from .merge import TokenMerge
from .grid import WindowGrid
from .methods import BlockBuffers, MergeMethod, StreamBuffers, make_method
from .schedule import StepPlan

logger = logging.getLogger(__name__)

# Of a GPU's memory, what one call's caches may take between forwards: estimated above it, they go to host memory
# (`cache_offload=None`); held above it (`cache_offload=False`), a warning.
DEVICE_SHARE = 0.2


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of a CUDA device (None for others: CPU memory is the host's, shared with everything)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory

ROLES = ("attn", "cross", "mlp")
MAX_RECORDS = 4096  # telemetry kept for the current generation (a bare model without a step count never wraps)


@dataclass
class ForwardRecord:
    """Telemetry of one transformer call: its step, its index within the step, tokens entering each sub-layer.

    `tokens[role][layer]` is None for a block that did not run (a step cache skipped it); `grid_tokens[layer]` is
    the block's unmerged token count. Each block writes its own entry of `blocks` (through its slot).
    """

    step: int
    call: int
    batch_size: int
    phase: str
    blocks: list[dict[str, int | None]] = field(default_factory=list)

    @property
    def tokens(self) -> dict[str, list[int | None]]:
        return {role: [block[role] for block in self.blocks] for role in ROLES}

    @property
    def grid_tokens(self) -> list[int | None]:
        return [block["grid"] for block in self.blocks]


@dataclass
class ForwardPlan:
    """What one forward runs, decided before it: its step's plan, the model's token grid, the call's buffers, the
    outputs the merge cache keeps, its telemetry record; per token grid, the tokens a merge removes and the random
    draws and what the method derives from them for all blocks (made on first use, eagerly: a U-Net's levels ask
    once per spatial transformer)."""

    plan: StepPlan
    grid: tuple[int, ...]
    buffers: StreamBuffers
    cache_roles: tuple[str, ...]
    record: ForwardRecord
    removed: dict[tuple[int, ...], int] = field(default_factory=dict)
    noise: dict[tuple, torch.Tensor | None] = field(default_factory=dict)
    derived: dict[tuple, list[Any] | None] = field(default_factory=dict)


class BlockSlot:
    """One block's share of the running forward, which its hooks read: set eagerly before the forward
    (`MergeState.prepare_blocks`, never inside a compiled region) and filled in by the block as it runs.

    A traced hook reads what it needs here, never a block index: dynamo specialises a graph on each integer it reads,
    so an index would compile one graph per block under regional compilation. Blocks whose slots hold equal values
    (phase, budget, flags) share one graph.

    Attributes:
        index: the block's position in the model (error messages only).
        merges: the method merges this block (it is not protected).
        previous: the previous block's slot (a merge is shared by `plan_blocks` consecutive blocks).
        grid, window_grid, removed, noise: per forward, the block's token grid, its windows, the tokens its merge
            removes and its rows of the forward's random draws.
        derived, derived_batch: what the method derived for its merge before the forward (`MergeMethod.derive`),
            and for how many images.
        buffers: the block's `BlockBuffers` of the running call.
        stores: the sub-layer roles whose outputs it keeps in the merge cache this forward.
        allowed: its grid is within `max_downsample` of the model's (U-Net levels).
        counts: its entry of the forward's `ForwardRecord`.
        merge, built, age, observed, gap: within the forward, its merge once built (None: all tokens), whether
            that was decided, blocks since the merge was built, whether the method observed its input (a full step),
            and token caching's steps since each token was last computed.
    """

    def __init__(self, index: int, merges: bool, previous: BlockSlot | None) -> None:
        self.index, self.merges, self.previous = index, merges, previous
        self.grid: tuple[int, ...] | None = None
        self.removed = 0
        self.stores: tuple[str, ...] = ()
        self.allowed = True
        self.release()

    def release(self) -> None:
        """Drop what the slot refers to of the last forward (buffers, draws, windows); its grid stays readable."""
        self.window_grid: WindowGrid | None = None
        self.noise: torch.Tensor | None = None
        self.derived: Any = None
        self.derived_batch = 0
        self.buffers: BlockBuffers | None = None
        self.counts: dict[str, int | None] = {}
        self.clear()

    def clear(self) -> None:
        """Forget what the block made within a forward."""
        self.merge: TokenMerge | None = None
        self.built = False
        self.age = 0
        self.observed = False
        self.gap: torch.Tensor | None = None


class MergeState:
    """Everything one patched model remembers across blocks and steps; the hooks call it.

    Args:
        config: the method's configuration (None: nothing is merged, the patch only drives a step cache).
        num_layers: blocks of the model (in execution order).

    Merge plans are made per image, so an image never depends on its batch mates.
    """

    def __init__(self, config: SDTMConfig | ToMeConfig | None, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self.method: MergeMethod = make_method(config, num_layers)
        self.clock = GenerationClock(getattr(config, "num_inference_steps", None), getattr(config, "calls_per_step", 1))
        self.on_generation: list = []  # step-cache resets, run when a generation begins
        self._timesteps: torch.Tensor | None = None  # the schedule, on the CPU
        self._last_timestep: Any = None
        self.records: deque[ForwardRecord] = deque(maxlen=MAX_RECORDS)
        self._grids: dict[tuple, WindowGrid] = {}
        self._streams: dict[tuple, StreamBuffers] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self.slots: list[BlockSlot] = []
        for layer in range(num_layers):
            self.slots.append(BlockSlot(layer, self.method.merges_layer(layer), self.slots[-1] if layer else None))
        self.forward: ForwardPlan | None = None  # the running (or last) forward's plan
        self.grid: tuple[int, ...] | None = None  # the model's token grid
        self.ready = False  # `begin_forward` ran for the coming forward outside its compiled region
        self._last_shape: tuple | None = None
        self.peak_held_bytes = 0  # the most `held_bytes` seen at the start of a forward (telemetry)
        self._memory_warned = False
        # (layer, role) -> the linear layers whose output widths and dtypes size what that sub-layer may keep
        self.output_layers: dict[tuple[int, str], list[torch.nn.Linear]] = {}

    # -- generations and forwards -----------------------------------------------------------------------------
    @property
    def plan(self) -> StepPlan | None:
        """The running forward's step plan."""
        return self.forward.plan if self.forward is not None else None

    @property
    def layer_grids(self) -> list[tuple[int, ...] | None]:
        """Per block, its token grid in the running forward."""
        return [slot.grid for slot in self.slots]

    @property
    def step(self) -> int:
        return self.clock.step

    @property
    def num_steps(self) -> int | None:
        return self.clock.num_steps

    @property
    def batch_size(self) -> int | None:
        """Batch of the last transformer call (classifier-free guidance doubles the images)."""
        return self.records[-1].batch_size if self.records else None

    @property
    def token_counts(self) -> list[dict[str, list[int | None]]]:
        """Per step (its first transformer call), tokens entering each block's attention / MLP; None: not run."""
        return [r.tokens for r in self.records if r.call == 0]

    def begin_generation(self, num_steps: int | None, timesteps: torch.Tensor | None = None) -> None:
        """A new generation of `num_steps` steps: the pipeline's scheduler set its `timesteps`."""
        self.clock.begin(num_steps, scheduled=True)
        # one host sync per generation, so that the current timestep is known later without any
        # (moved before the cast: MPS has no float64)
        self._timesteps = timesteps.detach().cpu().double() if timesteps is not None else None
        self.reset_step_caches()
        self._new_generation()

    def reset_step_caches(self) -> None:
        """Reset the step-cache hooks of the patch (never inside a forward: that would drop their cache context)."""
        for callback in self.on_generation:
            callback()

    def current_timestep(self) -> float:
        """The timestep of the current forward (for step-cache callbacks); scheduled: read off the schedule."""
        step = self.clock.step
        if self._timesteps is not None and 0 <= step < len(self._timesteps):
            return float(self._timesteps[step])
        t = _timestep_value(self._last_timestep)
        return t if t is not None else 0.0

    def _new_generation(self) -> None:
        self.records.clear()
        self._generators = {}
        self._streams.clear()  # nothing (staleness, output caches) carries over from the previous generation
        self.peak_held_bytes = 0

    def token_budgets(self) -> dict[tuple[int, ...], list[tuple[int, float]]]:
        """Per token grid of the current (or last) generation, its distinct merges: (tokens removed, the ratio that
        realises), smallest first. With `SDTMConfig.token_budgets` there are at most that many per grid."""
        if self.num_steps is None or self.config is None:
            return {}
        grids = {key[0] for key in self._grids}
        out = {}
        for grid in sorted(grids):
            n = math.prod(grid)
            out[grid] = sorted({(r, r / n) for r in self.method.removal_schedule(self.num_steps, grid) if r})
        return out

    def held_bytes(self) -> int:
        """Bytes of the tensors the merge state holds on the model's device for the running generation (merge caches
        unless offloaded, staleness, sketches)."""
        return sum(stream.held_bytes() for stream in self._streams.values())

    def host_bytes(self) -> int:
        """Bytes of the caches offloaded to host memory for the running generation (`cache_offload`)."""
        return sum(stream.host_bytes() for stream in self._streams.values())

    def cache_estimate(self, grid: tuple[int, ...], batch_size: int) -> int:
        """Bytes the output caches of one call of `batch_size` images on token grid `grid` hold once filled: per
        merged block and role, the method's kept outputs (`MergeMethod.kept_outputs`) of (B, N, C) at the widths
        and dtypes of the sub-layer's output layers. An upper bound where a sub-layer keeps its output at one of
        several places by phase (FLUX's single-stream blocks) and on U-Nets (every level at the model's grid)."""
        kept = self.method.kept_outputs()
        per_token = sum(kept[role] * linear.out_features * linear.weight.element_size()
                        for (layer, role), linears in self.output_layers.items()
                        if role in kept and self.method.merges_layer(layer) for linear in linears)
        return per_token * math.prod(grid) * batch_size

    def _offloads(self, grid: tuple[int, ...], batch_size: int, device: torch.device | str) -> bool:
        """Whether a new call's caches go to host memory: the config's `cache_offload`, or (None) whether
        `cache_estimate` exceeds `DEVICE_SHARE` of the GPU's memory."""
        choice = getattr(self.config, "cache_offload", False)
        if choice is not None:
            return choice
        total = device_memory(torch.device(device))
        if total is None:
            return False
        estimate = self.cache_estimate(grid, batch_size)
        if estimate <= DEVICE_SHARE * total:
            return False
        logger.info("%s: a call's caches take %.2f GiB (over %.0f %% of the device's %.1f GiB): kept in host memory",
                    type(self.config).__name__, estimate / 2**30, 100 * DEVICE_SHARE, total / 2**30)
        return True

    def end_generation(self) -> None:
        """The generation ended (its last step, an early stop, an exception in the loop): free what it held."""
        self.clock.end()
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes())
        self.release()

    def release(self) -> None:
        """Free the per-generation buffers (output caches, staleness); the telemetry stays readable."""
        self._streams = {}
        self.forward = None
        for slot in self.slots:
            slot.release()

    def begin_forward(self, grid: tuple[int, ...], batch_size: int, start_index=lambda: 0,
                      timestep: Any = None, device: torch.device | str = "cpu") -> StepPlan:
        """Start a model forward on latents whose token grid is `grid` (every block's, unless a grid source says).

        Args:
            device: the latents' device.
            start_index: ``() -> int``, the scheduler position of the generation's first forward.
            timestep: the forward's timestep argument (read only where no schedule is known).
        """
        self._last_timestep = timestep
        clock = self.clock
        if clock.num_steps is None and self.method.needs_step_count:
            raise RuntimeError(
                "the step count is unknown: apply SDTM to the pipeline (its scheduler gives the step count) or pass "
                "num_inference_steps=... when applying it to a bare model"
            )
        if not clock.scheduled and clock.step >= 0 and (grid, batch_size) != self._last_shape:
            clock.begin(clock.num_steps)  # another resolution or batch: a new generation of a bare model
        if clock.advance(start_index, lambda: _timestep_value(timestep)):  # a bare model's new generation
            self._new_generation()
            self.reset_step_caches()
        self._last_shape = (grid, batch_size)
        key = (clock.call, batch_size, grid)
        if key not in self._streams:
            self._streams[key] = StreamBuffers(self.num_layers, batch_size, self._offloads(grid, batch_size, device))
        buffers = self._streams[key]
        plan = self.method.stream_plan(self.method.plan(clock.step, clock.num_steps), buffers)
        record = ForwardRecord(clock.step, clock.call, batch_size, plan.phase.value,
                               [dict.fromkeys(("grid", *ROLES)) for _ in range(self.num_layers)])
        self.records.append(record)
        self.forward = ForwardPlan(plan, grid, buffers, self.method.cache_roles(plan), record)
        self.grid = grid
        held = self.held_bytes()
        self.peak_held_bytes = max(self.peak_held_bytes, held)
        if clock.step == 1 and clock.call == 0:  # the first step filled what each call keeps
            self._check_memory(held, device)
        if clock.step == 0 or not plan.merges:  # a full step computes every token on its own
            buffers.reset_staleness()
        buffers.filled = buffers.filled or not plan.merges
        if self.config is not None:  # the first-use allocations stay out of the forward
            self.method.prepare(buffers, plan, math.prod(grid), batch_size, device)
        self.prepare_blocks(range(self.num_layers), grid, batch_size, device)
        return plan

    def prepare_blocks(self, layers: Iterable[int], grid: tuple[int, ...], batch: int,
                       device: torch.device | str) -> None:
        """Hand blocks `layers`, whose tokens lie on `grid` in this forward (the model's; a U-Net level's, from its
        grid hook), their share of the forward: eagerly, so that the generator, the window tables and the draws
        stay out of any compiled region."""
        forward = self.forward
        removed = self.removed(grid)
        window_grid = noise = derived = None
        if removed:
            window_grid = self._window_grid(grid, torch.device(device))
            if getattr(self.config, "match_radius", None) is not None:
                window_grid.neighbour_windows(self.config.match_radius)
            noise = self._noise(window_grid, batch)
            key = (grid, batch)
            if key not in forward.derived:
                forward.derived[key] = self.method.derive(window_grid, forward.plan, forward.buffers, batch, noise)
            derived = forward.derived[key]
        allowed = self.config is None or math.prod(forward.grid) <= math.prod(grid) * self.config.max_downsample ** 2
        rows = noise.unbind(0) if noise is not None else [None] * self.num_layers
        for layer in layers:
            slot = self.slots[layer]
            slot.grid, slot.window_grid, slot.removed, slot.noise = grid, window_grid, removed, rows[layer]
            slot.derived, slot.derived_batch = (derived[layer], batch) if derived is not None else (None, 0)
            slot.buffers = forward.buffers.blocks[layer]
            slot.stores = forward.cache_roles if slot.merges else ()
            slot.allowed = allowed
            slot.counts = forward.record.blocks[layer]

    def open_forward(self) -> None:
        """The forward's blocks begin (inside the forward)."""
        for slot in self.slots:
            slot.clear()

    def observe_output(self, output: Any) -> None:
        """The forward's output (a tensor, a tuple or an output dataclass: its first tensor), for a method that chooses
        by it (`MergeMethod.observes_output`); inside the forward."""
        if self.forward is None or not self.method.observes_output:
            return
        if not isinstance(output, torch.Tensor):
            output = output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))
        self.method.observe_output(self.forward.buffers, output, self.forward.grid)

    def close_forward(self) -> None:
        """The forward ended: its merges are dropped (inside the forward, so a compiled one hands none back)."""
        for slot in self.slots:
            slot.clear()

    def removed(self, grid: tuple[int, ...]) -> int:
        """Tokens this forward's merges remove on a token grid (0 when nothing merges)."""
        forward = self.forward
        if grid not in forward.removed:
            merges = self.config is not None and forward.plan.merges
            forward.removed[grid] = self.method.tokens_removed(forward.plan, grid) if merges else 0
        return forward.removed[grid]

    def _noise(self, grid: WindowGrid, batch: int) -> torch.Tensor | None:
        """This forward's uniform draws (L, ...) for the merges of `grid` with `batch` images
        (`MergeMethod.noise_shape`), drawn once per forward from the patch's generator."""
        forward, key = self.forward, (grid.grid, batch)
        if key not in forward.noise:
            shape = self.method.noise_shape(grid, batch, forward.plan)
            device = grid.window_tokens.device
            forward.noise[key] = (None if shape is None else
                                  torch.rand(shape, generator=self._generator(device), device=device))
        return forward.noise[key]

    # -- per sub-layer (traced with the model: slot values only) -------------------------------------------------
    def block_merge(self, slot: BlockSlot, role: str, x: torch.Tensor) -> TokenMerge | None:
        """The merge of a block for a sub-layer of `role` ("attn" / "mlp"); None when it runs on all tokens.

        Built once per block and forward from the input of its first merged sub-layer (the attention input in the
        structure phase, the MLP input in the detail phase) and shared by the others.
        """
        plan = self.plan
        if plan is None:
            raise RuntimeError("a merged block ran outside a model forward; was the step hook removed?")
        num_tokens = math.prod(slot.grid)
        if x.dim() != 3 or x.shape[1] != num_tokens:
            raise ValueError(
                f"block {slot.index} {role}: expected hidden states (B, {num_tokens}, C) for the "
                f"{'x'.join(map(str, slot.grid))} token grid, got {tuple(x.shape)} (chunked feed-forward cannot be "
                "combined with merging)"
            )
        counts = slot.counts
        counts["grid"] = counts[role] = num_tokens
        if not plan.merges:
            if role in slot.stores and not slot.observed:  # the input a cached step would select on
                slot.observed = True
                self.method.observe(slot, x)
            return None
        if not plan.merges_sublayer(role) or not slot.merges or not slot.allowed:
            return None
        if not slot.built:
            previous = slot.previous if self.method.plan_blocks > 1 else None  # (not read otherwise: a guard)
            if (previous is not None and previous.merge is not None and previous.age + 1 < self.method.plan_blocks
                    and previous.grid == slot.grid):
                slot.merge, slot.age = previous.merge, previous.age + 1
                self.method.reuse(slot, previous.merge)
            else:
                slot.merge, slot.age = self.method.build(slot, x, plan), 0
            slot.built = True
        merge = slot.merge
        if merge is not None:
            counts[role] = merge.num_rows
        return merge

    def finish(self, slot: BlockSlot, name: str, role: str, merge: TokenMerge | None,
               output: torch.Tensor) -> torch.Tensor:
        """A sub-layer output (B, N', C) -> (B, N, C): unmerged, blended with the cache, cached."""
        if merge is None and not slot.allowed:  # a block that never merges at its resolution
            return output
        return self.method.finish(slot, name, merge, output, role in slot.stores)

    def finish_joint(self, slot: BlockSlot, name: str, role: str, merge: TokenMerge | None, output: torch.Tensor,
                     text_last: bool = False) -> torch.Tensor:
        """`finish` for a joint (B, T + N', C) output whose T text rows lead (FLUX's joint sequence) or, `text_last`,
        trail (HunyuanVideo's): the text rows pass through, the image rows are finished."""
        if merge is None and role not in slot.stores:
            return output  # nothing to unmerge or keep
        image_rows = merge.num_rows if merge is not None else math.prod(slot.grid)
        text = output.shape[1] - image_rows
        image = output[:, :image_rows] if text_last else output[:, text:]
        if merge is None:  # kept in the cache: laid out as an unmerged output is (one graph for both under compile;
            # `contiguous` would keep a batch of one's leading stride, which dynamo's guards compare too)
            image = image.clone(memory_format=torch.contiguous_format)
        image = self.finish(slot, name, role, merge, image)
        return torch.cat([image, output[:, image_rows:]] if text_last else [output[:, :text], image], dim=1)

    def _check_memory(self, held: int, device: torch.device | str) -> None:
        """Warn once per patch when what the calls of a step keep on the device between forwards exceeds
        `DEVICE_SHARE` of its memory (the buffers live until the generation ends)."""
        total = device_memory(torch.device(device))
        if self._memory_warned or total is None or held <= DEVICE_SHARE * total:
            return
        self._memory_warned = True
        logger.warning(
            "%s keeps %.2f GiB on the device between forwards (%.0f %% of its %.1f GiB) until the generation ends: "
            "leave cache_offload at None (or True) to keep the caches in host memory, or lower the resolution or "
            "batch (docs/usage.md#memory)", type(self.config).__name__, held / 2**30, 100 * held / total, total / 2**30)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _window_grid(self, grid: tuple[int, ...], device: torch.device) -> WindowGrid:
        key = (grid, device)
        if key not in self._grids:
            self._grids[key] = WindowGrid.build(grid, self.config.sx, self.config.sy, device, self.config.st)
        return self._grids[key]

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if device.type == "meta":  # shape-only runs (MAC counting) draw nothing
            return None
        if device not in self._generators:
            seed = self.config.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self._generators[device] = torch.Generator(device).manual_seed(seed)
        return self._generators[device]


def _timestep_value(timestep: Any) -> float | None:
    """A forward's timestep as a number (the largest entry: per-token timesteps hold 0 for conditioning frames)."""
    if timestep is None:
        return None
    timestep = torch.as_tensor(timestep).detach()
    return None if timestep.device.type == "meta" else float(timestep.flatten().max())
