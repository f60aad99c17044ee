"""The fastest setting per method at equal quality, and the protocol that decides it out of sample.

    python -m benchmarks.frontier --out outputs/frontier                 # tune sweep -> choice -> report set
    python -m benchmarks.frontier --out outputs/frontier --stage speed   # then time the chosen settings alone

Stage ``tune`` runs every candidate setting of `CANDIDATES` on the *tune* prompt set (quality only); for each method
the fastest candidate by MACs that is at equal quality there (the non-inferiority rule of `benchmarks.stats`) is
chosen. Stage ``report`` runs the chosen settings and the fixed reference settings (`REFERENCES`) on the disjoint
*report* set, which alone produces the published figures and verdicts. Stage ``speed`` times them (no quality
measurement), best on an otherwise idle machine; `speed_table` joins speed and report-set quality by setting.
Extra arguments go to ``python -m benchmarks`` (e.g. ``--threads 2``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from . import stats
from .methods import method_label, parse_method

COLUMNS = ["model", "method", "label", "ranked_by", "speedup_denoiser", "speedup_pipeline", "macs_speedup",
           "adherence", "adherence_diff_low", "detail_diff_low", "kid", "kid_diff_high", "psnr_db", "ssim",
           "settings_tried", "settings_within"]

FAST = "ratio=0.35,protect_steps_frequency=-1,mcw=1.0"
# settings every report carries, whatever the tune set chose: the baseline, the peers' and the paper's defaults,
# the presets
REFERENCES = ["baseline", "tome", "sdtm", "sdtm:a_s=-0.5,a_d=-0.5", f"sdtm:{FAST}",
              "sdtm:ratio=0.35,protect_steps_frequency=-1"]
# the tune sweep: per method, settings from cautious to aggressive
CANDIDATES = [
    *(f"tome:ratio={r}" for r in (0.1, 0.3)),
    *(f"sdtm:ratio={r}" for r in (0.2, 0.4)),
    *(f"sdtm:ratio={r},mcw=1.0" for r in (0.3, 0.4, 0.5)),
    *(f"sdtm:ratio={r},protect_steps_frequency=-1,mcw=1.0" for r in (0.15, 0.25)),
    "sdtm:ratio=0.4,a_s=-0.5,a_d=-0.5",
    *(f"fbcache:threshold={t}" for t in (0.05, 0.1, 0.15, 0.2, 0.3)),
    *(f"magcache:threshold={t}" for t in (0.02, 0.04, 0.06, 0.1)),
    "magcache:threshold=0.06,retention_ratio=0.1",
    *(f"taylorseer:cache_interval={k}" for k in (2, 3)),
    "pab", "fastercache",
    *(f"dbcache:residual_diff_threshold={t}" for t in (0.12, 0.2)),
    *(f"sdtm+{cache}:{merge}cache.threshold={t}" for cache, thresholds in (("fbcache", (0.1, 0.2)),
                                                                          ("magcache", (0.04, 0.06)))
      for merge in ("", "mcw=1.0,") for t in thresholds),
]


def equal_quality_rule() -> str:
    """The non-inferiority margins, in words."""
    return (f"95 % intervals of the difference above -{stats.ADHERENCE_MARGIN:g} points of adherence, "
            f"-{stats.ATTRIBUTE_MARGIN:g} points on each attribute, -{stats.DETAIL_MARGIN:g} points of detail, "
            f"and below +{stats.KID_RELATIVE_MARGIN:.0%} of the baseline's KID")


def _passes(table: pd.DataFrame) -> pd.Series:
    """The equal-quality verdict of each row (written as True / False, read back as bools or strings)."""
    return table["equal_quality"].astype(str) == "True"


def best_at_equal_quality(table: pd.DataFrame) -> pd.DataFrame:
    """Per model and method (e.g. ``fbcache``, ``sdtm+magcache``), its fastest setting at equal quality to the
    baseline by the non-inferiority rule (`benchmarks.stats`); a method with no such setting gets a row with NaN
    figures. Speed is the measured denoiser speed-up where the table has one, else the MAC ratio. Fastest first."""
    data = table.dropna(subset=["equal_quality"])
    rows = []
    for model, group in data.groupby("model"):
        speed = "speedup_denoiser" if group["speedup_denoiser"].notna().any() else "macs_speedup"
        within_all = group[_passes(group)]
        for method, settings in group[group["method"] != "baseline"].groupby("method"):
            within = within_all[within_all["method"] == method]
            if within.empty:
                row = {"model": model, "method": method, "label": "(none at equal quality)"}
            else:
                row = within.loc[within[speed].idxmax()].to_dict()
            row.update(ranked_by=speed, settings_tried=len(settings), settings_within=len(within))
            rows.append(row)
    out = pd.DataFrame(rows, columns=COLUMNS)
    order = "speedup_denoiser" if out["speedup_denoiser"].notna().any() else "macs_speedup"
    return out.sort_values(order, ascending=False, na_position="last").reset_index(drop=True)


def chosen_settings(tune: pd.DataFrame) -> list[str]:
    """The method specs of the tune set's fastest settings at equal quality (by MACs), one per method."""
    best = best_at_equal_quality(tune.assign(speedup_denoiser=float("nan")))
    labels = set(best["label"].dropna())
    return [spec for spec in CANDIDATES if method_label(*parse_method(spec)) in labels]


def speed_table(report: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Report-set quality rows with the speed columns of a timing run of the same settings (joined by model and
    label)."""
    timing = ["pipeline_ms", "denoiser_ms", "speedup_pipeline", "speedup_denoiser", "speedup_denoiser_paired",
              "speedup_denoiser_paired_iqr", "repeats", "threads"]
    return report.drop(columns=timing).merge(speed[["model", "label", *timing]], on=["model", "label"], how="left")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from .__main__ import main as benchmark

    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--model", default="pixart-shapes", help="a trained preset (default %(default)s)")
    parser.add_argument("--stage", nargs="+", default=["tune", "report"], choices=["tune", "report", "speed"])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per setting in the speed stage")
    args, extra = parser.parse_known_args(argv)
    common = ["--model", args.model, *extra]
    if "tune" in args.stage:
        benchmark([*common, "--out", str(args.out / "tune"), "--eval-set", "tune", "--no-latency", "--method",
                   *REFERENCES, *CANDIDATES])
    chosen = chosen_settings(pd.read_csv(args.out / "tune" / "results.csv"))
    (args.out / "chosen.json").write_text(json.dumps(chosen, indent=1))
    specs = list(dict.fromkeys([*REFERENCES, *chosen]))
    table = pd.DataFrame()
    if "report" in args.stage:
        table = benchmark([*common, "--out", str(args.out / "report"), "--eval-set", "report", "--no-latency",
                           "--method", *specs])
    if "speed" in args.stage:
        speed = benchmark([*common, "--out", str(args.out / "speed"), "--quality-prompts", "0",
                           "--repeats", str(args.repeats), "--method", *specs])
        report = pd.read_csv(args.out / "report" / "results.csv")
        table = speed_table(report, speed)
        table.to_csv(args.out / "frontier.csv", index=False)
    return table


if __name__ == "__main__":
    main()
