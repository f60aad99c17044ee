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

import functools
import weakref
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from .adapters import SubLayer
from .merge import MergePlan
from .state import MergeState

STEP_HOOK = "sdtm_step"
GRID_HOOK = "sdtm_grid"
MERGE_HOOK = "sdtm_merge"


class StepHook(ModelHook):
    """Transformer-level hook: every forward is one denoising step; it reads the token grid from the input.

    Args:
        state: the shared `MergeState`.
        token_grid: ``(model, latents) -> (h, w)``, the adapter's grid of the forward's latent input.
        input_name: keyword of the latent input when it is not passed positionally.
        pipeline: the pipeline whose scheduler announces generations (weakly referenced), or None.
    """

    _is_stateful = True

    def __init__(self, state: MergeState, token_grid: Callable, input_name: str, pipeline: Any = None) -> None:
        super().__init__()
        self.state = state
        self.token_grid = token_grid
        self.input_name = input_name
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._scheduler = None
        self._scheduler_set_timesteps = None
        self._model = None
        self.installed_forward = None  # the model's forward once this hook is registered (set by `patch`)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._model = weakref.ref(module)
        return module

    def ensure_wired(self) -> None:
        """Put this hook back in front of the model's forward if a wrapper that was outside it reset that forward.

        accelerate's `enable_model_cpu_offload` re-creates its hooks after every pipeline call, restoring the
        forward it had wrapped (the unpatched one when offloading was enabled before patching).
        """
        model = self._model() if self._model is not None else None
        ours = self.installed_forward
        if model is None or ours is None or model.forward is ours or model.__dict__.get("_old_forward") is ours:
            return
        self.fn_ref.forward = model.forward  # ours now calls the new wrapper, which calls the model
        model.forward = ours

    # The scheduler's `set_timesteps` runs once at the start of every pipeline call, however the step count was
    # passed (keyword, positional, default, custom timesteps), also after a call that raised. Wrapping it on the
    # instance tells the exact number of transformer calls to come: len(scheduler.timesteps).
    def watch_scheduler(self) -> bool:
        """Instrument the pipeline's current scheduler; True when it was not the one watched so far."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        if scheduler is None or scheduler is self._scheduler:
            return False
        self.unwatch_scheduler()
        original = scheduler.set_timesteps
        state = self.state

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            self.ensure_wired()
            state.begin_generation(len(scheduler.timesteps))
            return result

        scheduler.set_timesteps = set_timesteps
        self._scheduler, self._scheduler_set_timesteps = scheduler, set_timesteps
        return True

    def unwatch_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is not None and scheduler.__dict__.get("set_timesteps") is self._scheduler_set_timesteps:
            del scheduler.set_timesteps
        self._scheduler = self._scheduler_set_timesteps = None

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        latents = args[0] if args else kwargs[self.input_name]
        if self.watch_scheduler() and getattr(self._scheduler, "timesteps", None) is not None:
            # the user swapped pipe.scheduler after applying: this call's timesteps are already set
            self.state.begin_generation(len(self._scheduler.timesteps))
        self.state.begin_step(self.token_grid(module, latents), latents.shape[0])
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
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
        self._plan: MergePlan | None = None

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from_kwargs = not args
        x = kwargs["hidden_states"] if from_kwargs else args[0]
        plan = self.state.merge_plan(self.layer, self.role, x)
        self._plan = plan
        if plan is None:
            return args, kwargs
        if self.role == "attn" and kwargs.get("attention_mask") is not None:
            raise ValueError(
                f"block {self.layer}: self-attention got an attention_mask over the full token sequence, which "
                "cannot follow a token merge; run without a self-attention mask or with merge_attn=False"
            )
        merged = plan.merge(x)
        if from_kwargs:
            return args, {**kwargs, "hidden_states": merged}
        return (merged, *args[1:]), kwargs

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output):
        plan, self._plan = self._plan, None
        if isinstance(output, tuple):
            return (self.state.finish(self.layer, self.name, self.role, plan, output[0]), *output[1:])
        return self.state.finish(self.layer, self.name, self.role, plan, output)
