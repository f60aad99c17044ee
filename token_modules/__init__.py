"""Token modules: scored patch selection and aggregation (SDTPS, SEPS), register tokens for cross-modal alignment,
and an HSI-conditioned masked autoencoder. Each has tests in `tests/` and a CPU demo in `token_modules.demos`.
"""

from .hsi_mae import (
    AuxEncoderConfig,
    HSIConditionedMAE,
    HSIEncoder,
    HSIMAEConfig,
    masked_info_nce,
    masked_mse,
    model_complexity,
    random_masking,
)
from .registers import NestedDropout, RegisterTokenConfig, RegisterTokenLoss, RegisterTokenModule, info_nce
from .sdtps import MultiModalSDTPS, SDTPSOutput
from .selection import Selection, TokenAggregation, TokenSparse, straight_through_topk
from .seps import SEPS, PatchWordAlignment

__all__ = [
    "AuxEncoderConfig",
    "HSIConditionedMAE",
    "HSIEncoder",
    "HSIMAEConfig",
    "masked_info_nce",
    "masked_mse",
    "model_complexity",
    "random_masking",
    "NestedDropout",
    "RegisterTokenConfig",
    "RegisterTokenLoss",
    "RegisterTokenModule",
    "info_nce",
    "MultiModalSDTPS",
    "SDTPSOutput",
    "Selection",
    "TokenAggregation",
    "TokenSparse",
    "straight_through_topk",
    "SEPS",
    "PatchWordAlignment",
]
