"""SDTM (Structure-then-Detail Token Merging) and ToMe for HuggingFace diffusers transformers.

    from sdtm_plugin import apply_SDTM, remove_SDTM
    apply_SDTM(pipe)            # the paper's SDTM*-a defaults
    image = pipe("a cat", num_inference_steps=20).images[0]
    remove_SDTM(pipe)           # bit-identical to never patched
"""

from .adapters import supported_models
from .caching import supported_step_caches
from .config import SDTMConfig, TokenCacheConfig, ToMeConfig
from .patch import (
    apply_SDTM, apply_step_cache, apply_token_cache, apply_ToMe, calibrate_mag_cache, get_merge_state, remove_SDTM,
    remove_step_cache, remove_token_cache, remove_ToMe,
)
from .schedule import Phase, StepPlan, cosine_ratio, step_plan

__all__ = [
    "SDTMConfig",
    "ToMeConfig",
    "TokenCacheConfig",
    "apply_SDTM",
    "apply_ToMe",
    "apply_token_cache",
    "remove_SDTM",
    "remove_ToMe",
    "remove_token_cache",
    "apply_step_cache",
    "remove_step_cache",
    "calibrate_mag_cache",
    "get_merge_state",
    "supported_models",
    "supported_step_caches",
    "Phase",
    "StepPlan",
    "cosine_ratio",
    "step_plan",
]
