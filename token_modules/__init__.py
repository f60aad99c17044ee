"""Token modules: scored patch selection (SDTPS, SEPS), register tokens, HSI-conditioned MAE."""
