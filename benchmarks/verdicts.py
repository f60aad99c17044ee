"""Verdicts of result tables: each row's "equal", "worse" or "inconclusive" (`benchmarks.stats.verdict`, in the
rows the runner writes) and, per model and method, the fastest setting at equal quality."""

from __future__ import annotations

import pandas as pd

from . import stats

COLUMNS = ["model", "method", "label", "verdict", "prompts_to_resolve", "ranked_by", "speedup_denoiser",
           "speedup_pipeline", "macs_speedup", "adherence", "adherence_diff_low", "detail_diff_low", "kid",
           "kid_diff_high", "psnr_db", "ssim", "settings_tried", "settings_within"]


def equal_quality_rule() -> str:
    """The non-inferiority margins, in words."""
    return (f"95 % intervals of the difference above -{stats.ADHERENCE_MARGIN:g} points of adherence, "
            f"-{stats.ATTRIBUTE_MARGIN:g} points on each attribute, -{stats.DETAIL_MARGIN:g} points of detail, "
            f"and below +{stats.KID_RELATIVE_MARGIN:.0%} of the baseline's KID")


def verdicts(table: pd.DataFrame) -> pd.Series:
    """Each row's verdict: "equal", "worse" or "inconclusive" (`benchmarks.stats.verdict`); rows of a table written
    before the three-way verdict have only `equal_quality` (True / False, read back as bools or strings), where a
    failure is not told apart: "inconclusive"."""
    equal = table["equal_quality"].astype(str) == "True"
    given = table["verdict"] if "verdict" in table else pd.Series(index=table.index, dtype=object)
    return given.where(given.notna(), equal.map({True: "equal", False: "inconclusive"}))


def best_at_equal_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and method (e.g. ``fbcache``, ``sdtm+magcache``), its fastest setting at equal quality to the
    baseline by the non-inferiority rule (`benchmarks.stats`); a method with none gets its fastest inconclusive
    setting (the verdict column says so, with the prompts that would resolve it), else a row saying every setting
    was worse. Speed is the measured denoiser speed-up where the table has one, else the MAC ratio. Equal settings
    first, fastest first."""
    data = table.dropna(subset=["equal_quality"]).assign(verdict=lambda t: verdicts(t))
    rows = []
    for model, group in data.groupby("model"):
        speed = "speedup_denoiser" if group["speedup_denoiser"].notna().any() else "macs_speedup"
        for method, settings in group[group["method"] != "baseline"].groupby("method"):
            within = settings[settings["verdict"] == "equal"]
            open_ = settings[settings["verdict"] == "inconclusive"]
            if not within.empty:
                row = within.loc[within[speed].idxmax()].to_dict()
            elif not open_.empty:
                row = open_.loc[open_[speed].idxmax()].to_dict()
            else:
                row = {"model": model, "method": method, "label": "(every setting worse)", "verdict": "worse"}
            row.update(ranked_by=speed, settings_tried=len(settings), settings_within=len(within))
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    order = "speedup_denoiser" if out["speedup_denoiser"].notna().any() else "macs_speedup"
    rank = out["verdict"].map({"equal": 0, "inconclusive": 1, "worse": 2})
    return (out.assign(_rank=rank).sort_values(["_rank", order], ascending=[True, False], na_position="last")
            .drop(columns="_rank").reset_index(drop=True))
