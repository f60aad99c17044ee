"""diffusers `ModelHook`s that drive merging: one on the transformer (step tracking), one per merged sub-layer.

No block forward is copied: a sub-layer hook merges the (B, N, C) input of `attn1` / `ff` in `pre_forward` and
unmerges the output in `post_forward`. The block's per-channel modulation and gate commute with both, so the
block code runs unchanged.

Under `torch.compile` every hook method runs eagerly (`torch.compiler.disable`): they hold the per-step Python
state (step counter, phase, ratio, generators) that dynamo would otherwise guard on and recompile for at every
step. The model's own code between them is compiled; the merged token count is the only shape that varies, which
automatic dynamic shapes absorb with at most one recompile per graph.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from .adapters import SubLayer
from .clock import PipelineWatch
from .merge import TokenMerge
from .state import MergeState

STEP_HOOK = "sdtm_step"
GRID_HOOK = "sdtm_grid"
MERGE_HOOK = "sdtm_merge"


class StepHook(ModelHook):
    """Transformer-level hook, the model's outermost: tells the state where each forward sits in the generation and
    its token grid.

    Args:
        state: the shared `MergeState`.
        token_grid: ``(model, latents) -> (h, w)``, the adapter's grid of the forward's latent input.
        input_name: keyword of the latent input when it is not passed positionally.
        timestep_position: positional index of the forward's ``timestep`` argument (None: keyword only).
    """

    _is_stateful = True

    def __init__(self, state: MergeState, token_grid: Callable, input_name: str,
                 timestep_position: int | None) -> None:
        super().__init__()
        self.state = state
        self.token_grid = token_grid
        self.input_name = input_name
        self.timestep_position = timestep_position
        self.watch = PipelineWatch(state.clock.claim, self._begin, self._stepped, state.end_generation)
        self._scheduler = None  # the scheduler of the running generation
        self._model = None
        self.installed_forward = None  # the model's outermost hooked forward (set by `patch`)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._model = weakref.ref(module)
        return module

    def ensure_wired(self) -> None:
        """Put the patch's hooks back in front of the model's forward if a wrapper outside them reset that forward.

        accelerate's `enable_model_cpu_offload` re-creates its hooks after every pipeline call, restoring the
        forward it had wrapped (the unpatched one when offloading was enabled before patching).
        """
        model = self._model() if self._model is not None else None
        ours = self.installed_forward
        if model is None or ours is None or model.forward is ours or model.__dict__.get("_old_forward") is ours:
            return
        self.fn_ref.forward = model.forward  # ours now calls the new wrapper, which calls the model
        model.forward = ours

    def _begin(self, scheduler: Any) -> None:
        """A watched scheduler set its timesteps: a generation begins."""
        self.ensure_wired()
        self._scheduler = scheduler
        self.state.begin_generation(len(scheduler.timesteps), scheduler.timesteps)

    def _stepped(self) -> None:
        if self.state.clock.scheduler_stepped():  # the schedule's last step: nothing of the call is needed any more
            self.state.end_generation()

    def _start_index(self, timestep: Any) -> int:
        """The schedule position of a generation's first forward: the scheduler's `begin_index` (img2img sets it),
        else the position of the forward's timestep in `scheduler.timesteps` (one host sync per generation)."""
        scheduler = self._scheduler
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        timesteps = getattr(scheduler, "timesteps", None)
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return 0
        t = torch.as_tensor(timestep).detach().flatten()[:1].cpu().double()  # on the CPU: MPS has no float64
        return int((timesteps.detach().cpu().double() - t).abs().argmin())

    def _timestep(self, args: tuple, kwargs: dict) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        position = self.timestep_position
        return args[position] if position is not None and position < len(args) else None

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        latents = args[0] if args else kwargs[self.input_name]
        begun = self.watch.refresh()  # the user swapped pipe.scheduler after applying: this call's timesteps are set
        if begun is not None:
            self._begin(begun)
        clock = self.state.clock
        clock.claim()
        pipelines = self.watch.pipelines
        if pipelines and not clock.active:
            names = ", ".join(type(p).__name__ for p in pipelines)
            raise RuntimeError(
                f"SDTM: the patched {type(module).__name__} was called outside a generation of the pipeline(s) it "
                f"follows ({names}), so its denoising step is unknown. If another pipeline shares this model, apply "
                "the patch to that pipeline too (apply_SDTM(other_pipe): the patch then follows both); to call the "
                "bare model, apply the patch to the model itself with num_inference_steps=..."
            )
        timestep = self._timestep(args, kwargs)
        self.state.begin_forward(self.token_grid(module, latents), latents.shape[0],
                                 lambda: self._start_index(timestep), timestep)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # `CacheMixin` pipelines reset stateful hooks after every call: free what the call held, keep the telemetry
        self.state.release()
        return module


class GridHook(ModelHook):
    """On a U-Net's spatial transformer: its (B, C, H, W) input gives the token grid of its blocks."""

    def __init__(self, state: MergeState, layers: list[int]) -> None:
        super().__init__()
        self.state, self.layers = state, layers

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if hidden_states.dim() == 4:
            self.state.set_layer_grid(self.layers, (hidden_states.shape[-2], hidden_states.shape[-1]))
        return args, kwargs


class SubLayerMergeHook(ModelHook):
    """Merges the (B, N, C) input of one attention or feed-forward module and unmerges its output.

    Tuple outputs (SD3's joint attention returns image and text streams) have their first element unmerged.

    Args:
        state: the shared `MergeState`.
        layer: block index.
        sublayer: the adapter's `SubLayer` (cache name and role).
    """

    def __init__(self, state: MergeState, layer: int, sublayer: SubLayer) -> None:
        super().__init__()
        self.state, self.layer = state, layer
        self.name, self.role = sublayer.name, sublayer.role
        self._merge: TokenMerge | None = None

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from_kwargs = not args
        x = kwargs["hidden_states"] if from_kwargs else args[0]
        merge = self.state.block_merge(self.layer, self.role, x)
        self._merge = merge
        if merge is None:
            return args, kwargs
        if self.role == "attn" and kwargs.get("attention_mask") is not None:
            raise ValueError(
                f"block {self.layer}: self-attention got an attention_mask over the full token sequence, which "
                "cannot follow a token merge; run without a self-attention mask or with merge_attn=False"
            )
        merged = merge.merge(x)
        if from_kwargs:
            return args, {**kwargs, "hidden_states": merged}
        return (merged, *args[1:]), kwargs

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output):
        merge, self._merge = self._merge, None
        if isinstance(output, tuple):
            return (self.state.finish(self.layer, self.name, self.role, merge, output[0]), *output[1:])
        return self.state.finish(self.layer, self.name, self.role, merge, output)
