"""diffusers' step caches on any supported denoiser, alone or composed with token merging.

diffusers ships FirstBlockCache, TaylorSeer, PyramidAttentionBroadcast, FasterCache and MagCache as functional
`apply_*` entry points; this module drives them unchanged. What a pipeline without `CacheMixin` (PixArt) lacks is
supplied by `CacheContextHook`, the outermost hook on the denoiser: a cache context around every forward (one per
call within a step, so an extra call such as SD3's skip-layer guidance keeps its own cache state), a reset of
every cache hook when a generation begins, and the current timestep for the callbacks of PAB and FasterCache,
read from the scheduler's schedule without a host sync.

Composition with merging: the cache hooks sit outside the merge hooks, so a skipped or predicted sub-layer or
block returns a full-length cached output and its merge never runs (no merge state changes for it), and a computed
one is cached after it was unmerged. The merge cache (SDTM's per-token sub-layer outputs) and the step cache are
separate tensors; merged outputs are never modified in place after they are returned.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import ExitStack
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, MagCacheConfig, ModelHook,
    PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig, apply_faster_cache, apply_first_block_cache,
    apply_mag_cache, apply_pyramid_attention_broadcast, apply_taylorseer_cache,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from .state import MergeState

logger = logging.getLogger(__name__)

CONTEXT_HOOK = "sdtm_cache_context"
STEP_CACHES: dict[type, Any] = {
    FirstBlockCacheConfig: apply_first_block_cache,
    TaylorSeerCacheConfig: apply_taylorseer_cache,
    PyramidAttentionBroadcastConfig: apply_pyramid_attention_broadcast,
    FasterCacheConfig: apply_faster_cache,
    MagCacheConfig: apply_mag_cache,
}

# TaylorSeer matches module names with `re.fullmatch`; its defaults ("^transformer_blocks.*attn") hook nothing on
# PixArt / DiT / U-Net blocks, whose attention modules are "attn1" / "attn2": the same modules, named as they are
_TAYLORSEER_MODULES = (r"transformer_blocks\.\d+\.attn\d?", r"transformer_blocks\.\d+\.ff")


def supported_step_caches() -> str:
    return ", ".join(cls.__name__ for cls in STEP_CACHES)


def _prepared(config: Any, state: MergeState) -> Any:
    """The config with this project's wiring filled in where the user left it unset (a copy; the user's is kept)."""
    if type(config) not in STEP_CACHES:
        raise TypeError(f"step_cache must be one of {supported_step_caches()}, got {type(config).__name__}")
    changes: dict[str, Any] = {}
    if hasattr(config, "current_timestep_callback") and config.current_timestep_callback is None:
        changes["current_timestep_callback"] = state.current_timestep
    if isinstance(config, TaylorSeerCacheConfig) and not (
        config.cache_identifiers or config.skip_predict_identifiers or config.use_lite_mode
    ):
        changes["cache_identifiers"] = list(_TAYLORSEER_MODULES)
    if isinstance(config, FasterCacheConfig) and config.tensor_format == "BCFHW":
        changes["tensor_format"] = "BCHW"  # image latents (the default is for video)
    return dataclasses.replace(config, **changes) if changes else config


@dataclasses.dataclass
class _RenamedArguments(TransformerBlockMetadata):
    """Block metadata for a block whose forward names an argument otherwise than diffusers' caches ask for it."""

    renames: dict = dataclasses.field(default_factory=dict)  # the name a cache asks for -> the block's

    def _get_parameter_from_args_kwargs(self, identifier, args=(), kwargs=None):
        return super()._get_parameter_from_args_kwargs(self.renames.get(identifier, identifier), args, kwargs)


def _register_block_metadata() -> None:
    """Tell diffusers' block-level caches (FirstBlockCache, MagCache) what they do not know of some blocks: where
    HunyuanVideo 1.5's dual-stream block returns its streams (video, text), and that Z-Image's block takes its hidden
    states as `x` (the caches ask for "hidden_states", which its registered metadata cannot find)."""
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    try:
        TransformerBlockRegistry.get(HunyuanVideo15TransformerBlock)
    except ValueError:
        TransformerBlockRegistry.register(HunyuanVideo15TransformerBlock, TransformerBlockMetadata(
            return_hidden_states_index=0, return_encoder_hidden_states_index=1))
    if not isinstance(TransformerBlockRegistry.get(ZImageTransformerBlock), _RenamedArguments):
        TransformerBlockRegistry.register(ZImageTransformerBlock, _RenamedArguments(
            return_hidden_states_index=0, return_encoder_hidden_states_index=None, renames={"hidden_states": "x"}))


def _mixed_block_outputs(model: nn.Module) -> bool:
    """Whether the model's first dual-stream block returns (text, image) apart while its last single-stream block
    returns one joint tensor (FLUX.2): diffusers' first-block and mag caches take residuals of the last block's output
    against the first's."""
    heads, tails = getattr(model, "transformer_blocks", None), getattr(model, "single_transformer_blocks", None)
    if not heads or not tails:
        return False
    try:
        head, tail = (TransformerBlockRegistry.get(type(b)) for b in (heads[0], tails[-1]))
    except ValueError:  # unregistered blocks: diffusers' own error says so
        return False
    return (head.return_encoder_hidden_states_index is None) != (tail.return_encoder_hidden_states_index is None)


def _hook_names(model: nn.Module) -> set[tuple[int, str]]:
    return {(id(m), name) for m in model.modules() for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})}


class CacheContextHook(ModelHook):
    """Outermost hook on the denoiser: opens a cache context around every forward (see the module docstring).

    Args:
        state: the patch's `MergeState` (its clock tells the call within the step).
    """

    _is_stateful = True

    def __init__(self, state: MergeState) -> None:
        super().__init__()
        self.state = state
        self._contexts: list[ExitStack] = []

    @torch.compiler.disable
    def pre_forward(self, module: nn.Module, *args, **kwargs):
        call = self.state.clock.call  # the step hook, outside this one, has moved to this forward
        stack = ExitStack()
        stack.enter_context(CacheMixin.cache_context(module, "cond" if call == 0 else f"call{call}"))
        self._contexts.append(stack)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self._contexts.pop().close()
        return output

    def reset_state(self, module: nn.Module) -> nn.Module:
        while self._contexts:
            self._contexts.pop().close()
        return module


def attach_step_cache(model: nn.Module, config: Any, state: MergeState) -> list[tuple[nn.Module, str]]:
    """Apply diffusers' step cache `config` to `model` behind the patch's hooks; returns the hooks it registered
    (outermost last), so that they can be removed exactly."""
    prepared = _prepared(config, state)  # raises for an unknown config before anything is hooked
    _register_block_metadata()
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(config, FirstBlockCacheConfig) and blocks and getattr(blocks[-1], "context_pre_only", False):
        raise ValueError(
            f"FirstBlockCacheConfig does not work on {type(model).__name__}: its last block returns no text states "
            "(context_pre_only), which diffusers' first-block cache subtracts; use another step cache"
        )
    if isinstance(config, (FirstBlockCacheConfig, MagCacheConfig)) and _mixed_block_outputs(model):
        raise ValueError(
            f"{type(config).__name__} does not work on {type(model).__name__}: its first block returns the image and "
            "text streams apart and its last one the joint sequence, and diffusers' head/tail residual cannot subtract "
            "the two; use TaylorSeerCacheConfig (or another step cache) here"
        )
    before = _hook_names(model)
    STEP_CACHES[type(config)](model, prepared)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(CacheContextHook(state), CONTEXT_HOOK)
    added = [(m, name) for m in model.modules() for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
             if (id(m), name) not in before]
    if len(added) < 2:
        raise RuntimeError(f"{type(config).__name__} hooked no module of {type(model).__name__}")

    def reset_caches() -> None:  # a new generation: no cache state may carry over
        for module, name in added:
            hook = module._diffusers_hook.get_hook(name)
            if hook is not None and hook._is_stateful and name != CONTEXT_HOOK:
                hook.reset_state(module)

    state.on_generation.append(reset_caches)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
    logger.info("%s applied to %s: %d hooks", type(config).__name__, type(model).__name__, len(added))
    return added
