"""The "best setting per method at equal quality" table of a results table (trained models only)."""

from __future__ import annotations

import pandas as pd

COLUMNS = ["model", "method", "label", "speedup_denoiser", "speedup_pipeline", "macs_speedup", "adherence", "fid",
           "kid", "psnr_db", "ssim", "settings_tried", "settings_within"]


def best_at_equal_quality(table: pd.DataFrame, adherence_drop: float = 0.02, fid_rise: float = 0.10) -> pd.DataFrame:
    """Per model and method (e.g. ``fbcache``, ``sdtm+taylorseer``), its fastest setting (denoiser speed-up) whose
    adherence is at most `adherence_drop` below the baseline's and whose FID is at most `fid_rise` (relative)
    above it; a method with no such setting gets a row with NaN figures. Fastest first."""
    data = table.dropna(subset=["adherence", "speedup_denoiser"])
    rows = []
    for model, group in data.groupby("model"):
        base = group[group["method"] == "baseline"]
        if base.empty:
            continue
        base = base.iloc[0]
        ok = (group["adherence"] >= base["adherence"] - adherence_drop - 1e-9) & (
            group["fid"] <= base["fid"] * (1 + fid_rise) + 1e-9)
        for method, settings in group[group["method"] != "baseline"].groupby("method"):
            within = settings[ok[settings.index]]
            if within.empty:
                row = {"model": model, "method": method, "label": "(none within the quality bounds)"}
            else:
                row = within.loc[within["speedup_denoiser"].idxmax()].to_dict()
            row.update(settings_tried=len(settings), settings_within=len(within))
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    return out.sort_values("speedup_denoiser", ascending=False, na_position="last").reset_index(drop=True)
