"""Paired quality differences between any two settings of a finished run, from their saved per-prompt scores.

    python -m benchmarks.compare --run outputs/flux-tune --model flux-shapes --set tune 96 \\
        "sdtm:rotary_positions=mean" sdtm

The harness compares every setting with the baseline; choosing between two settings (two position rules, sketched
or exact matching) needs their difference on the same prompts and seeds, with its own paired-bootstrap interval
(`QualityScorer.compare`): setting A - setting B for adherence (per attribute), detail, KID and FID.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .methods import method_label, parse_method
from .models import PRESETS
from .reference import quality
from .judging import scores_path


def paired_differences(run: Path, model: str, eval_set: quality.EvalSet, setting: str, other: str) -> pd.DataFrame:
    """`setting` - `other` on `eval_set`: one row per figure (estimate, low, high of its 95 % interval)."""
    preset = PRESETS.get(model)
    data = preset.data if preset is not None and preset.data else eval_set.data
    labels = [method_label(*parse_method(s)) for s in (setting, other)]
    paths = [scores_path(run, model, eval_set, label) for label in labels]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no saved scores for {missing}; run `python -m benchmarks --model {model} "
                                f"--eval-set {eval_set.name} --quality-prompts {len(eval_set)} --method ...` first")
    scorer = quality.QualityScorer(eval_set, quality.judge(data))
    ours, theirs = (quality.SetScores.load(p) for p in paths)
    differences = scorer.compare(ours, theirs)
    return pd.DataFrame([(name, i.estimate, i.low, i.high) for name, i in differences.items()],
                        columns=["figure", "difference", "low", "high"]).set_index("figure")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the --out folder of a `python -m benchmarks` run")
    parser.add_argument("--model", default="pixart-shapes")
    parser.add_argument("--set", nargs=2, metavar=("NAME", "PROMPTS"), default=("tune", "144"),
                        help="evaluation set and its number of prompts, as run (default: tune 144)")
    parser.add_argument("settings", nargs=2, metavar="SETTING", help="two method settings as given to --method")
    args = parser.parse_args(argv)
    name, prompts = args.set[0], int(args.set[1])
    data = PRESETS[args.model].data if args.model in PRESETS and PRESETS[args.model].data else "shapes"
    eval_set = quality.evaluation_set(name, data).head(prompts)
    table = paired_differences(args.run, args.model, eval_set, *args.settings)
    print(f"{args.settings[0]} - {args.settings[1]} on {args.model}, {name} set ({prompts} prompts), 95 % paired "
          f"bootstrap intervals:")
    print(table.round(2).to_string())
    return table


if __name__ == "__main__":
    main()
