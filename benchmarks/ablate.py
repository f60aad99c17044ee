"""Ablations: sweeps over any method fields, run by the benchmark harness, gathered into one CSV and one plot.

    python -m benchmarks.ablate                               # the SDTM suite on the trained model (tune set)
    python -m benchmarks.ablate --tables prior destination    # some of its tables
    python -m benchmarks.ablate --spec my_sweep.json          # {"table": {"base": "sdtm:ratio=0.3", "vary": [{...}]}}

A table is a base method setting and its variants (each a dict of fields to override); every variant of a table
changes one design choice at the same merge ratio, so token counts (and MACs) match where the choice does not
change them. Extra arguments go to ``python -m benchmarks`` (e.g. ``--repeats 5 --threads 2``). Writes
``<out>/results.csv`` (the harness's rows), ``<out>/ablation.csv`` (table, variant, speed-up, MACs, quality) and
``<out>/ablation.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from .cli import main as benchmark
from .methods import method_label, parse_method

BASE = "sdtm"
# the design choices of SDTM examined on the trained model (issue: "measure SDTM's own design choices")
SDTM_SUITE: dict[str, dict[str, Any]] = {
    "prior": {"base": BASE, "vary": [
        {"a_s": a, "a_d": a} for a in (-0.5, 0.0, 0.05, 0.5)] + [{"prior": "bounded", "a_s": 0.05, "a_d": 0.05},
                                                                  {"prior": "bounded", "a_s": -0.5, "a_d": -0.5}]},
    "destination": {"base": BASE, "vary": [{"idm_destination": r} for r in ("stalest", "random", "similar")]},
    "structure_merge": {"base": BASE, "vary": [{"structure_merge": m} for m in ("window", "bipartite")]},
    "protection": {"base": BASE, "vary": [{"protect_steps_frequency": k} for k in (-1, 2, 3, 5)]},
    "cache": {"base": BASE, "vary": [{"mcw": 0.1}, {"mcw": 0.5}, {"mcw": 1.0}, {"cache_each_step": False}]},
    "schedule": {"base": BASE, "vary": [{"deviation": 0.0}, {"deviation": 0.1}, {"deviation": 0.2},
                                        {"switch_step": 0}, {"switch_step": 10}, {"switch_step": 35},
                                        {"switch_step": 50}]},
    "detail_attention": {"base": BASE, "vary": [{"detail_merge_attn": False}, {"detail_merge_attn": True}]},
    "blocks": {"base": BASE, "vary": [{}, {"protect_first_layers": 1}, {"protect_last_layers": 1},
                                      {"protect_first_layers": 1, "protect_last_layers": 1},
                                      {"protect_layers_frequency": 2}]},
    "no_protection_collapse": {"base": "sdtm:protect_steps_frequency=-1", "vary": [
        {"ratio": r, **extra} for r in (0.2, 0.35) for extra in (
            {}, {"mcw": 1.0}, {"a_s": 0.0, "a_d": 0.0}, {"structure_merge": "bipartite"}, {"switch_step": 0})]},
    "plan_sharing": {"base": BASE, "vary": [{"plan_blocks": k} for k in (1, 2, 3)]},
    "plan_sharing_fast": {"base": "sdtm:ratio=0.35,protect_steps_frequency=-1,mcw=1.0",
                          "vary": [{"plan_blocks": k} for k in (1, 2, 3)]},
}
SUMMARY = ["table", "variant", "label", "macs_speedup", "speedup_denoiser", "speedup_pipeline", "adherence",
           "adherence_diff_low", "detail_diff_low", "kid", "kid_diff_high", "equal_quality", "psnr_db", "ssim",
           "merge_bytes_x"]


def expand(suite: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(table, variant, method spec) for every variant; a variant is named by the fields it sets."""
    rows = []
    for table, spec in suite.items():
        name, base = parse_method(spec["base"])
        for variant in spec["vary"]:
            params = {**base, **variant}
            text = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(params.items()))
            described = " ".join(f"{k}={v}" for k, v in variant.items()) or "base"
            rows.append((table, described, f"{name}:{text}" if text else name))
    return rows


def summarise(table: pd.DataFrame, variants: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One row per (table, variant), joined to the harness's row of that setting."""
    rows = []
    for group, variant, spec in variants:
        label = method_label(*parse_method(spec))
        match = table[table["label"] == label]
        if not match.empty:
            rows.append({"table": group, "variant": variant, **match.iloc[0].to_dict()})
    return pd.DataFrame(rows)[[c for c in SUMMARY]]


def plot(summary: pd.DataFrame, baseline: pd.Series, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import speed_column

    speed = speed_column(summary)
    tables = list(dict.fromkeys(summary["table"]))
    fig, axes = plt.subplots(len(tables), 1, figsize=(9, 2.6 * len(tables)), squeeze=False)
    for ax, name in zip(axes[:, 0], tables):
        rows = summary[summary["table"] == name]
        ax.scatter(rows[speed], rows["adherence"], s=18)
        for _, row in rows.iterrows():
            ax.annotate(f"{row['variant']} (KID {row['kid']:.1f})", (row[speed], row["adherence"]), fontsize=6)
        ax.axhline(baseline["adherence"], color="grey", lw=0.8, ls="--")
        ax.set(title=name, xlabel=speed.replace("_", " "), ylabel="adherence, %")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=None, help="a JSON suite (default: the built-in SDTM suite)")
    parser.add_argument("--tables", nargs="+", default=None, help="run only these tables of the suite")
    parser.add_argument("--model", default="pixart-shapes", help="model (default %(default)s: learned weights)")
    parser.add_argument("--out", type=Path, default=Path("outputs/ablation"))
    args, extra = parser.parse_known_args(argv)
    suite = json.loads(args.spec.read_text()) if args.spec else SDTM_SUITE
    if args.tables:
        unknown = sorted(set(args.tables) - set(suite))
        if unknown:
            raise SystemExit(f"--tables: unknown {unknown}; the suite has {sorted(suite)}")
        suite = {k: suite[k] for k in args.tables}
    variants = expand(suite)
    specs = list(dict.fromkeys(spec for _, _, spec in variants))
    if "--eval-set" not in extra:  # ablations choose: the tune set, never the report set
        extra = [*extra, "--eval-set", "tune"]
    table = benchmark(["--model", args.model, "--out", str(args.out), "--method", *specs, *extra])
    summary = summarise(table, variants)
    summary.to_csv(args.out / "ablation.csv", index=False)
    baseline = table[table["method"] == "baseline"].iloc[0]
    if summary["adherence"].notna().any():
        plot(summary, baseline, args.out / "ablation.png")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(summary.to_string(index=False))
    return summary


if __name__ == "__main__":
    main()
