"""`apply_SDTM`, `apply_ToMe`, `apply_step_cache`, `remove_SDTM`: attach and detach the hooks on a pipeline or model.

One patch per denoiser: token merging (SDTM or ToMe), a diffusers step cache, or both composed (`step_cache=`).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import io
import logging
import types
from dataclasses import dataclass
from typing import Any, TypeVar

from diffusers.hooks import HookRegistry, MagCacheConfig
from diffusers.utils.torch_utils import unwrap_module
from torch import nn

from .adapters import ParallelBlock, find_adapter, supported_models
from .caching import attach_step_cache
from .config import SDTMConfig, TokenCacheConfig, ToMeConfig
from .hooks import (DENOISERS, GRID_HOOK, MERGE_HOOK, STEP_HOOK, GridHook, ParallelBlockMerge, StepHook,
                    SubLayerMergeHook, key_cache_hooks, row_hooks)
from .state import MergeState

logger = logging.getLogger(__name__)

T = TypeVar("T")
_PATCH_ATTR = "_sdtm_patch"


@dataclass
class _Patch:
    """What `remove_SDTM` needs to undo one application."""

    state: MergeState
    step_hook: StepHook
    hooked: list[tuple[nn.Module, str, Any]]  # (module, hook name, the forward our hook installed)

    def remove(self) -> None:
        self.step_hook.watch.remove()
        self.step_hook.remove_compiled_prelude()
        for module, name, ours in reversed(self.hooked):  # outermost first
            outer = module.__dict__.get("forward")
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.remove_hook(name, recurse=False)
            if outer is not ours and module.__dict__.get("_old_forward") is ours:
                # accelerate (enable_model_cpu_offload after patching) wrapped our forward and calls it through
                # `_old_forward`; remove_hook would drop that wrapper: splice ours out beneath it instead
                module._old_forward, module.forward = module.forward, outer
            if registry.hooks:
                registry.invalidate_child_registries_cache()
            else:
                _drop_empty_registry(module)


def _drop_empty_registry(module: nn.Module) -> None:
    """Leave the module as it was before patching: no registry, no instance-level `forward`."""
    del module._diffusers_hook
    bound = module.__dict__.get("forward")
    if bound is not None and getattr(bound, "__func__", None) is type(module).forward:
        del module.forward


def _denoisers(pipe_or_model: Any, denoiser: str | None = None) -> list[tuple[nn.Module, Any, Any]]:
    """-> [(denoiser, pipeline or None, what the caller holds)]: a pipeline's denoisers (`transformer`, Wan 2.2's
    second expert `transformer_2`, or `unet`; one of them by attribute name with `denoiser`) or the model passed.

    A `torch.compile`d model (`OptimizedModule`) is unwrapped: the hooks go on the original module, which the
    compiled wrapper (kept third, to run the step's Python work in front of its compiled region) calls.
    """
    if isinstance(pipe_or_model, nn.Module):
        if denoiser is not None:
            raise ValueError(f"denoiser={denoiser!r} picks a denoiser of a pipeline; a model was passed")
        return [(unwrap_module(pipe_or_model), None, pipe_or_model)]
    found: dict[str, tuple[nn.Module, Any, Any]] = {}
    for attr in DENOISERS:
        held = getattr(pipe_or_model, attr, None)
        if isinstance(held, nn.Module) and all(unwrap_module(held) is not m for m, _, _ in found.values()):
            found[attr] = (unwrap_module(held), pipe_or_model, held)
    if denoiser is not None:
        if denoiser not in found:
            raise ValueError(f"denoiser must be one of {sorted(found)} (the denoisers of "
                             f"{type(pipe_or_model).__name__}) or None for all, got {denoiser!r}")
        return [found[denoiser]]
    if not found:
        raise TypeError(
            f"expected a diffusers pipeline with a `transformer` / `unet` or such a model, got "
            f"{type(pipe_or_model).__name__}; supported models: {supported_models()}"
        )
    return list(found.values())


def _forward_parameters(model: nn.Module) -> list[str]:
    return [n for n in inspect.signature(type(model).forward).parameters if n != "self"]


def _apply(pipe_or_model: T, config: SDTMConfig | ToMeConfig | TokenCacheConfig | None, step_cache: Any = None,
           denoiser: str | None = None) -> T:
    """Patch every denoiser of a pipeline (both experts of Wan 2.2 A14B: each its own merge state and caches, both
    following the pipeline's scheduler), or the one named by `denoiser`, or the model passed."""
    targets = _denoisers(pipe_or_model, denoiser)
    done: list[nn.Module] = []
    try:
        for model, pipeline, held in targets:
            _apply_to(model, pipeline, held, config, step_cache)
            done.append(model)
    except BaseException:
        for model in done:  # all or nothing
            remove_SDTM(model)
        raise
    return pipe_or_model


def _apply_to(model: nn.Module, pipeline: Any, held: Any, config: SDTMConfig | ToMeConfig | TokenCacheConfig | None,
              step_cache: Any) -> None:
    adapter = find_adapter(model)
    if config is not None and config.st > 1 and not adapter.video:
        raise ValueError(f"st={config.st} makes windows span frames, but {type(model).__name__} generates images; st "
                         f"must be 1 here (st > 1 is for video models: Wan)")
    layout = adapter.layout(model)
    num_layers = len(layout.blocks)
    state = MergeState(config, num_layers=num_layers)
    if config is not None and config.ratio > 0 and not any(state.method.merges_layer(i) for i in range(num_layers)):
        fields = ", ".join(f"{name}={getattr(config, name)}" for name in
                           ("protect_layers_frequency", "protect_first_layers", "protect_last_layers"))
        raise ValueError(f"{fields} protect all {num_layers} blocks of {type(model).__name__}: nothing would merge; "
                         f"keep protect_first_layers + protect_last_layers < {num_layers} and "
                         "protect_layers_frequency -1 or >= 2")
    previous = model.__dict__.get(_PATCH_ATTR)
    # a patch belongs to the model: pipelines that share it (each with its own scheduler) share the patch, so
    # re-applying through one of them replaces the patch for all and keeps following the others
    pipelines = previous.step_hook.watch.pipelines if previous is not None else []
    remove_SDTM(model)  # re-applying replaces, never stacks

    step_hook = StepHook(state, adapter, _forward_parameters(model), lambda: _other_experts(model, step_hook))
    for follow in [*pipelines, *([pipeline] if pipeline is not None else [])]:
        step_hook.watch.add(follow)
    hooked: list[tuple[nn.Module, str, Any]] = []

    def register(module: nn.Module, hook, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        if module is not model:
            _bind_forward(module)
        hooked.append((module, name, module.__dict__["forward"]))

    patch = _Patch(state, step_hook, hooked)
    setattr(model, _PATCH_ATTR, patch)
    try:
        if config is not None:
            _register_merge_hooks(model, layout, state, register)
        if step_cache is not None:  # registered after the merge hooks: outside them
            for module, name in attach_step_cache(model, step_cache, state):
                if module is not model:
                    _bind_forward(module)
                hooked.append((module, name, module.__dict__["forward"]))
        # the step hook is the model's outermost hook: every other hook of a forward (a step cache's denoiser-level
        # hook and its timestep callback included) runs at the step it has just moved to
        register(model, step_hook, STEP_HOOK)
    except BaseException:
        remove_SDTM(model)
        raise
    step_hook.installed_forward = model.__dict__["forward"]
    step_hook.install_compiled_prelude(held)
    logger.info("%s applied to %s (%d blocks), step cache %s", type(config).__name__, type(model).__name__,
                len(layout.blocks), type(step_cache).__name__ if step_cache is not None else None)


def _bind_forward(module: nn.Module) -> None:
    """Re-install the hooked forward diffusers' registry just put on a block's sub-module as a bound method.

    The registry installs ``functools.partial(hooked, module)``, which dynamo guards by identity: under regional
    compilation (`compile_repeated_blocks`) each block would compile its own graphs. A method bound to the same
    function is guarded by the function's code, which every block's hook shares. (The model's own forward keeps the
    partial: its signature, which pipelines inspect, follows the partial's `__wrapped__`.)
    """
    forward = module.__dict__.get("forward")
    if isinstance(forward, functools.partial) and forward.args == (module,) and not forward.keywords:
        module.forward = types.MethodType(forward.func, module)


def _other_experts(model: nn.Module, step_hook: StepHook) -> list[MergeState]:
    """The merge states of the other patched denoisers of the pipelines `model`'s patch follows (Wan 2.2's other
    expert): once this model runs, theirs hold caches no later step reads."""
    states = []
    for pipeline in step_hook.watch.pipelines:
        for attr in DENOISERS:
            other = getattr(pipeline, attr, None)
            patch = unwrap_module(other).__dict__.get(_PATCH_ATTR) if isinstance(other, nn.Module) else None
            if patch is not None and unwrap_module(other) is not model and patch.state not in states:
                states.append(patch.state)
    return states


# attention processors that add an (B, 1, 1, keys) float attention_mask to the logits (proportional attention)
KEY_BIAS_PROCESSORS = ("AttnProcessor2_0", "FluxAttnProcessor", "WanAttnProcessor")


def _register_merge_hooks(model: nn.Module, layout, state: MergeState, register) -> None:
    """The merge hooks of every block: one per sub-layer whose role the method reduces (and, for a method that
    reduces one side of the attention, that side's projections' and the rotary sites'), or a `ParallelBlock`'s set."""
    method = state.method
    for module, layers in layout.grid_sources:
        register(module, GridHook(state, layers), GRID_HOOK)
    for layer, block in enumerate(layout.blocks):
        attentions = [block.attn] if isinstance(block, ParallelBlock) else [s.module for s in block if s.role == "attn"]
        if getattr(state.config, "proportional_attention", False) and "attn" in method.roles:
            names = [type(a.processor).__name__ for a in attentions]
            unbiased = [name for name in names if name not in KEY_BIAS_PROCESSORS]
            if unbiased:
                raise TypeError(f"proportional_attention passes its key bias as the attention's additive mask, which "
                                f"block {layer}'s {unbiased[0]} does not apply; supported processors: "
                                f"{', '.join(KEY_BIAS_PROCESSORS)} (PixArt, DiT, SD U-Nets, FLUX.1, Wan)")
        if method.attention_rows is not None and any(getattr(a, "fused_projections", False) for a in attentions):
            raise ValueError(f"block {layer} of {type(model).__name__} has fused QKV projections, which cannot compute "
                             "queries for fewer rows than keys; call unfuse_qkv_projections() before applying")
        try:
            if isinstance(block, ParallelBlock):
                # kept at a branch's output (where only it merges) or at proj_out's, by phase; token caching of
                # both branches keeps them at proj_out's only (`ParallelBlockMerge._cached_at_output`)
                kept = method.kept_outputs()
                at_output = method.attention_rows == "query" and "attn" in kept and "mlp" in kept
                alone = [_output_layer(block.attn)] if method.reduces_attention_alone and not at_output else []
                state.output_layers[layer, "attn"] = [*alone, block.proj_out]
                state.output_layers[layer, "mlp"] = [] if at_output else [block.proj_mlp]
                if "keys" in kept:
                    state.output_layers[layer, "keys"] = list(block.keys)
                for module, hook in ParallelBlockMerge(state, layer, block).hooks():
                    register(module, hook, MERGE_HOOK)
                continue
            for sub in block:
                if sub.role not in method.roles:
                    continue
                state.output_layers[layer, sub.role] = [_output_layer(sub.module)]
                hook = SubLayerMergeHook(state, layer, sub)
                register(sub.module, hook, MERGE_HOOK)
                if hook.side is not None or sub.sites:
                    for module, row_hook in row_hooks(lambda hook=hook: hook.rows, hook.side, sub.query, sub.keys,
                                                      sub.sites):
                        register(module, row_hook, MERGE_HOOK)
                if hook.side == "query":
                    key_hooks = key_cache_hooks(lambda hook=hook: hook.rows, state, layer, sub.name, sub.keys,
                                                sub.text_last)
                    for module, key_hook in key_hooks:
                        register(module, key_hook, MERGE_HOOK)
                    if key_hooks:
                        state.output_layers[layer, "keys"] = [module for module, _ in key_hooks]
        except TypeError as err:
            raise TypeError(f"{type(state.config).__name__} does not support {type(model).__name__}: {err}") from None


def _output_layer(module: nn.Module) -> nn.Linear:
    """The linear layer that writes a sub-layer's output (an attention's `to_out[0]`, an MLP's last projection): the
    last one registered."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(module).__name__} has no linear layer to size its outputs by")
    return linears[-1]


def apply_SDTM(pipe_or_model: T, config: SDTMConfig | None = None, *, step_cache: Any = None,
               denoiser: str | None = None, **params: Any) -> T:
    """Patch a pipeline (or its bare transformer) with Structure-then-Detail Token Merging, in place.

    Pass an `SDTMConfig`, or its fields as keywords (``ratio=0.3, deviation=0.2, switch_step=20, use_rand=True,
    sx=2, sy=2, a_s=0.05, a_d=0.05, mcw=0.1, protect_steps_frequency=3, protect_layers_frequency=-1,
    merge_attn=True, merge_mlp=True, cache_each_step=True, seed=0``: the paper's SDTM*-a). `step_cache` composes
    a diffusers step cache (e.g. ``FirstBlockCacheConfig(threshold=0.1)``, see `apply_step_cache`) with the
    merging. Applying again replaces the earlier patch (SDTM, ToMe, step cache). Returns its argument.

    A pipeline with two denoisers (Wan 2.2 A14B: `transformer` for the high-noise steps, `transformer_2` for the
    low-noise ones) has both patched, each with its own merge state and caches; `denoiser="transformer_2"` (or
    "transformer") patches one only, so that each expert can get its own settings by applying twice.

    Raises:
        TypeError: for a model no adapter supports (the message lists the supported ones), or an unknown
            step-cache config.
        ValueError: for parameters out of range (the message names the parameter and its range).
    """
    if config is not None and params:
        raise TypeError("pass either an SDTMConfig or keyword parameters, not both")
    return _apply(pipe_or_model, config if config is not None else SDTMConfig(**params), step_cache, denoiser)


def apply_ToMe(pipe_or_model: T, config: ToMeConfig | None = None, *, step_cache: Any = None,
               denoiser: str | None = None, **params: Any) -> T:
    """Patch with the ToMe baseline (tomesd semantics, `ToMeConfig`) on the same blocks and hooks as SDTM;
    `step_cache` and `denoiser` as in `apply_SDTM`."""
    if config is not None and params:
        raise TypeError("pass either a ToMeConfig or keyword parameters, not both")
    return _apply(pipe_or_model, config if config is not None else ToMeConfig(**params), step_cache, denoiser)


def apply_token_cache(pipe_or_model: T, config: TokenCacheConfig | None = None, *, step_cache: Any = None,
                      denoiser: str | None = None, **params: Any) -> T:
    """Patch with token caching (`TokenCacheConfig`): on cached steps each block recomputes a share of the image
    tokens, chosen by how much their input changed, attending to every token; the others keep their own cached
    outputs. `step_cache` composes a diffusers step cache and `denoiser` picks an expert as in `apply_SDTM`. Removed
    by `remove_SDTM` (alias `remove_token_cache`).

    Supported: PixArt, DiT, FLUX.1, Qwen-Image, Wan 2.1 / 2.2 and SD U-Nets. Raising a `TypeError`: SD3 (its joint
    attention splits its output by the query count), FLUX.2 (its single-stream blocks project queries, keys and the
    MLP input in one linear layer), HunyuanVideo 1.5 (its processor builds a square mask from the query count) and
    Z-Image (its processor rotates queries and keys with one per-image table).
    """
    if config is not None and params:
        raise TypeError("pass either a TokenCacheConfig or keyword parameters, not both")
    return _apply(pipe_or_model, config if config is not None else TokenCacheConfig(**params), step_cache, denoiser)


def apply_step_cache(pipe_or_model: T, config: Any, *, denoiser: str | None = None) -> T:
    """Patch with one of diffusers' step caches alone, wired for any supported denoiser (PixArt included).

    `config` is a diffusers config: `FirstBlockCacheConfig`, `TaylorSeerCacheConfig`,
    `PyramidAttentionBroadcastConfig`, `FasterCacheConfig` or `MagCacheConfig`; the timestep callbacks PAB and
    FasterCache need and TaylorSeer's module patterns are filled in where left unset. Each expert of a two-expert
    pipeline gets its own cache (`denoiser` picks one, as in `apply_SDTM`). Removed by `remove_SDTM`.
    """
    return _apply(pipe_or_model, None, config, denoiser)


def calibrate_mag_cache(pipe: Any, num_inference_steps: int, **call_kwargs: Any) -> list[float]:
    """MagCache's per-step residual-magnitude ratios for this pipeline (`MagCacheConfig(mag_ratios=...)`), from one
    generation in diffusers' calibration mode (nothing skipped) with `call_kwargs` (prompt, guidance, ...).

    MagCache needs them per model and step count. The pipeline must not be patched; it is left unpatched.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    targets = _denoisers(pipe)
    if len(targets) > 1:
        raise ValueError(f"{type(pipe).__name__} runs {len(targets)} denoisers, each for part of the steps; MagCache "
                         "ratios are calibrated on one denoiser's full schedule: not supported here")
    model = targets[0][0]
    if _PATCH_ATTR in model.__dict__:
        raise ValueError("calibrate_mag_cache needs an unpatched pipeline: call remove_SDTM(pipe) first")
    messages: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    # diffusers reports the ratios only by logging (and printing) them at the end of the run
    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = Capture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    apply_step_cache(pipe, MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pipe(**call_kwargs, num_inference_steps=num_inference_steps)
    finally:
        remove_SDTM(pipe)
        log.removeHandler(handler)
        log.setLevel(level)
    found = [m for m in messages if "Calibration Results" in m]
    if not found:
        raise RuntimeError("MagCache calibration logged no ratios (did the call run all its steps?)")
    return [float(v) for v in ast.literal_eval(found[-1].split(":", 1)[1].strip())]


def remove_SDTM(pipe_or_model: T, *, denoiser: str | None = None) -> T:
    """Undo `apply_SDTM` / `apply_ToMe` / `apply_step_cache`: every hook goes (step caches too), outputs are
    bit-identical to the unpatched model. Every denoiser of a pipeline is unpatched, or the one `denoiser` names.
    A model that was never patched is returned unchanged.
    """
    for model, _, _ in _denoisers(pipe_or_model, denoiser):
        patch = model.__dict__.pop(_PATCH_ATTR, None)
        if patch is not None:
            patch.remove()
    return pipe_or_model


remove_ToMe = remove_step_cache = remove_token_cache = remove_SDTM


def get_merge_state(pipe_or_model: Any, denoiser: str | None = None) -> MergeState | None:
    """The live `MergeState` of a patched pipeline or transformer (step, plan, per-step token counts), else None;
    of a pipeline's first denoiser, or the one `denoiser` names (Wan 2.2: "transformer_2", the low-noise expert)."""
    model = _denoisers(pipe_or_model, denoiser)[0][0]
    patch = model.__dict__.get(_PATCH_ATTR)
    return patch.state if patch is not None else None
