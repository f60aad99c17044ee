"""diffusers `ModelHook`s that drive merging: one on the transformer (step tracking), one per merged sub-layer.

No block forward is copied: a sub-layer hook merges the (B, N, C) input of `attn1` / `ff` in `pre_forward` and
unmerges the output in `post_forward`. The block's per-channel modulation and gate commute with both, so the
block code runs unchanged.

Under `torch.compile` the per-step Python work (the step clock, the plan, the random draws) runs eagerly in
`StepHook.begin`, before the compiled region: `install_compiled_prelude` puts it in front of a compiled model
(`torch.compile(model)` or `model.compile()`), and under regional compilation (`compile_repeated_blocks`) the
transformer's own forward is eager anyway. The sub-layer hooks are traced with the model: they read only values
of a bounded set (phase, budget, flags) and tensors, so `fullgraph=True` holds and a generation compiles one graph
per token budget and phase. U-Nets keep an eager grid hook (their levels' grids are read at run time).
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch._dynamo.eval_frame import OptimizedModule

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
        self._prelude_handles: dict[int, Any] = {}  # id(compiled wrapper) -> its pre-hook handle

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

    def install_compiled_prelude(self, *wrappers: Any) -> None:
        """Run `begin` eagerly in front of the compiled region of a compiled model, so that the compiled forward holds
        no per-step Python work: a pre-hook on each `torch.compile(model)` wrapper among `wrappers`, and a wrapper of
        the compiled call of an in-place `model.compile()`. Called when applying and whenever a generation begins
        (a model compiled after applying is found then)."""
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for wrapper in wrappers:
            if (isinstance(wrapper, OptimizedModule) and wrapper._orig_mod is model
                    and id(wrapper) not in self._prelude_handles):
                self._prelude_handles[id(wrapper)] = wrapper.register_forward_pre_hook(
                    lambda _, args, kwargs: self.prelude(model, args, kwargs), with_kwargs=True)
        compiled = model.__dict__.get("_compiled_call_impl")
        if compiled is not None and not hasattr(compiled, "sdtm_compiled_call"):
            @functools.wraps(compiled)
            def call(*args, **kwargs):
                self.prelude(model, args, kwargs)
                return compiled(*args, **kwargs)

            call.sdtm_compiled_call = compiled
            model._compiled_call_impl = call

    def remove_compiled_prelude(self) -> None:
        for handle in self._prelude_handles.values():
            handle.remove()
        self._prelude_handles = {}
        model = self._model() if self._model is not None else None
        compiled = model.__dict__.get("_compiled_call_impl") if model is not None else None
        if compiled is not None and hasattr(compiled, "sdtm_compiled_call"):
            model._compiled_call_impl = compiled.sdtm_compiled_call

    def _begin(self, scheduler: Any) -> None:
        """A watched scheduler set its timesteps: a generation begins."""
        self.ensure_wired()
        self.install_compiled_prelude(*(getattr(p, attr, None) for p in self.watch.pipelines
                                        for attr in ("transformer", "unet")))
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

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.state.ready:  # `begin` ran already, outside the compiled region of a compiled model
            self.state.ready = False
        else:
            self.begin(module, args, kwargs)
        self.state.open_forward()
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        self.state.close_forward()
        return output

    @torch.compiler.disable
    def begin(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Everything a forward needs decided before it runs (`MergeState.begin_forward`); never compiled."""
        latents = args[0] if len(args) else kwargs[self.input_name]
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
                                 lambda: self._start_index(timestep), timestep, latents.device)

    def prelude(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """`begin` run in front of a compiled model's compiled region; the traced `pre_forward` then skips it."""
        self.begin(model, args, kwargs)
        self.state.ready = True

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

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from_kwargs = len(args) == 0
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

    def post_forward(self, module: torch.nn.Module, output):
        merge, self._merge = self._merge, None
        if isinstance(output, tuple):
            return (self.state.finish(self.layer, self.name, self.role, merge, output[0]), *output[1:])
        return self.state.finish(self.layer, self.name, self.role, merge, output)
