"""The fastest setting per method at equal quality, and the protocol that decides it out of sample.

    python -m benchmarks.frontier --out outputs/frontier                 # tune sweep -> choice -> report set
    python -m benchmarks.frontier --out outputs/frontier --stage speed   # then time the chosen settings alone

Stage ``tune`` runs the baseline and every candidate setting of `CANDIDATES` on the *tune* prompt set (quality
only; the fixed references are left to the report set, where they are published), then the compositions of
`COMPOSED` whose merge setting alone was not shown worse (equal or inconclusive: a step cache adds its own error,
so a composition is worth measuring only where its merge part may be equal); for each method the fastest candidate
by MACs that is at equal quality there (the non-inferiority rule of `benchmarks.stats`) is chosen. Stage ``report``
runs the chosen settings and the fixed reference settings (`REFERENCES`) on the disjoint *report* set, which alone
produces the published figures and verdicts (equal / worse / inconclusive). Stage ``speed`` times them (no quality
measurement), best on an otherwise idle machine; `speed_table` joins speed and report-set quality by setting.
``--only PATTERN...`` runs a partial frontier (e.g. one method family and the step caches it composes with).
Extra arguments go to ``python -m benchmarks`` (e.g. ``--threads 2``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import pandas as pd

from sdtm_plugin import SDTMConfig

from .cli import main as benchmark
from . import stats
from .methods import config_spec, method_label, parse_method
from .verdicts import best_at_equal_quality, verdicts

# settings every report carries, whatever the tune set chose: the baseline, the peers' and the paper's defaults,
# the paper's defaults with its exact per-step token counts, its exact (unsketched) matching and window-local matching,
# the presets, the paper's unprotected setting
REFERENCES = ["baseline", "tome", "sdtm", "tokencache", "sdtm:token_budgets=null", "sdtm:match_dim=null",
              "sdtm:match_radius=1", config_spec("sdtm", SDTMConfig.faithful()),
              config_spec("sdtm", SDTMConfig.fast()), "sdtm:ratio=0.35,protect_steps_frequency=-1"]
# the names a reader knows the presets by, keyed by the harness's label of their spec
PRESET_NAMES = {method_label(*parse_method(spec)): name for spec, name in (
    ("sdtm", "SDTM*-a (default)"), (config_spec("sdtm", SDTMConfig.faithful()), "SDTMConfig.faithful()"),
    (config_spec("sdtm", SDTMConfig.fast()), "SDTMConfig.fast()"), ("tome", "ToMe 0.5 (default)"),
    ("tokencache", "TokenCacheConfig() (default)"))}
# token caching: the share served from the cache (its default 0.7), the dense interval, the selection rules the
# issue asks to compare (by change, at random, by similarity) and the extrapolation of cached outputs (1, TaylorSeer's
# first order, was the only one at equal quality on the tune set of the 86f9818 run; so also at larger shares)
TOKEN_CACHE = ["tokencache:ratio=0.6", "tokencache:ratio=0.8", "tokencache:ratio=0.9", "tokencache:dense_every=2",
               "tokencache:dense_every=4", "tokencache:selection=random", "tokencache:selection=similarity",
               "tokencache:extrapolation=0", "tokencache:extrapolation=1", "tokencache:extrapolation=1,ratio=0.8",
               "tokencache:extrapolation=1,ratio=0.9",
               "tokencache:extrapolation=1,cache_keys=true", "tokencache:extrapolation=1,cache_keys=true,ratio=0.8"]
# SDTM with whole queries: keys and values merged in the structure phase, at the default and a larger share
KEYS_ONLY = ["sdtm:merge_queries=false", "sdtm:merge_queries=false,ratio=0.5"]
# merged keys weighted by their group size in the softmax (ToMe's proportional attention)
PROPORTIONAL = ["sdtm:proportional_attention=true", "tome:proportional_attention=true"]
# IBTM: each window's destination the token classifier-free guidance moves most, alone and with proportional attention
GUIDANCE_DESTINATIONS = ["sdtm:idm_destination=guidance", "sdtm:idm_destination=guidance,proportional_attention=true"]
# the tune sweep: per method, settings from cautious to aggressive (each a few minutes on 2 CPU cores); the default
# token cache is a reference, so tuned too
CANDIDATES = [
    "tome:ratio=0.2", "sdtm:ratio=0.2", "sdtm:ratio=0.3,mcw=1.0", "sdtm:ratio=0.4,mcw=1.0",
    "sdtm:ratio=0.2,protect_steps_frequency=-1,mcw=1.0", "tokencache", *TOKEN_CACHE,
    *(f"fbcache:threshold={t}" for t in (0.1, 0.2, 0.3)),
    *(f"magcache:threshold={t}" for t in (0.04, 0.06, 0.1)), "magcache:threshold=0.06,retention_ratio=0.1",
    "taylorseer:cache_interval=2", "pab", "fastercache", "dbcache:residual_diff_threshold=0.2",
    "dbcache:residual_diff_threshold=0.3", *KEYS_ONLY, *PROPORTIONAL, *GUIDANCE_DESTINATIONS,
]
# merging or token caching composed with a step cache: tuned only where the merge setting alone (a candidate above)
# was not shown worse on the tune set, since a step cache adds its own error to the merge's
COMPOSED = [
    *(f"sdtm+{cache}:{merge},cache.threshold={t}" for cache, t in (("fbcache", 0.2), ("magcache", 0.06))
      for merge in ("ratio=0.2", "mcw=1.0,ratio=0.3")),
    *(f"tokencache+{cache}:{merge}cache.{field}={t}"
      for merge in ("", "ratio=0.9,", "extrapolation=1,", "extrapolation=1,cache_keys=true,")
      for cache, field, t in (("fbcache", "threshold", 0.1), ("fbcache", "threshold", 0.2),
                              ("dbcache", "residual_diff_threshold", 0.2))),
    "tokencache+magcache:cache.threshold=0.06", "tokencache+taylorseer:cache.cache_interval=2",
    # flux-shapes' token-caching choice (a dense step every 2nd step) with the step caches tried there (FirstBlockCache
    # 0.05 skipped no step of a flux-shapes call)
    *(f"tokencache+{cache}:dense_every=2,cache.{field}={t}"
      for cache, field, t in (("fbcache", "threshold", 0.1), ("dbcache", "residual_diff_threshold", 0.2))),
]


# past this many prompts "would resolve it" says only that an estimate sits on its margin
MANY_PROMPTS = 100_000


def restrict(specs: list[str], only: list[str] | None) -> list[str]:
    """The specs matching one of the shell-style patterns `only` (all of them when None); the baseline always."""
    if only is None:
        return list(specs)
    return [spec for spec in specs if spec == "baseline" or any(fnmatch.fnmatchcase(spec, p) for p in only)]


def merge_part(spec: str) -> str:
    """The merge setting of a composed spec: ``sdtm+fbcache:mcw=1.0,cache.threshold=0.2`` -> ``sdtm mcw=1.0``
    (a label)."""
    name, params = parse_method(spec)
    return method_label(name.split("+")[0], {k: v for k, v in params.items() if not k.startswith("cache.")})


def composed_to_tune(tune: pd.DataFrame, composed: list[str] = COMPOSED) -> list[str]:
    """The `composed` specs whose merge setting alone was not shown worse (equal or inconclusive) in the tune table."""
    worse = set(tune.loc[verdicts(tune) == "worse", "label"])
    measured = set(tune["label"])
    return [spec for spec in composed if merge_part(spec) in measured and merge_part(spec) not in worse]


def chosen_settings(tune: pd.DataFrame) -> list[str]:
    """The method specs that go on to the report set, one per method: its fastest setting at equal quality on the
    tune set (by MACs), else its fastest inconclusive one whose estimates all lie within their margins (so that the
    report set's larger sample may resolve it; a method whose every setting is worse, or past a margin, has none)."""
    best = best_at_equal_quality(tune.assign(speedup_denoiser=float("nan")))
    resolvable = (best["verdict"] == "inconclusive") & (best["prompts_to_resolve"].astype(float) < float("inf"))
    labels = set(best.loc[(best["verdict"] == "equal") | resolvable, "label"].dropna())
    return [spec for spec in [*CANDIDATES, *COMPOSED] if method_label(*parse_method(spec)) in labels]


def speed_table(report: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Report-set quality rows with the speed columns of a timing run of the same settings (joined by model and
    label)."""
    timing = ["pipeline_ms", "denoiser_ms", "speedup_pipeline", "speedup_denoiser", "speedup_denoiser_paired",
              "speedup_denoiser_paired_iqr", "repeats", "threads"]
    timed = speed[["model", "label", *timing]]
    return report.drop(columns=timing, errors="ignore").merge(timed, on=["model", "label"], how="left")


def verdict_text(row: pd.Series, bold: bool = True) -> str:
    """A row's verdict in words: equal; worse, with the metrics shown past their margin; inconclusive, with the
    metrics not shown within it and about how many prompts would show equality if the estimates held."""
    verdict = verdicts(pd.DataFrame([row])).iloc[0]
    if verdict == "equal":
        return "**equal**" if bold else "equal"
    if verdict == "worse":
        worse = row.get("quality_worse")
        return f"worse ({worse if isinstance(worse, str) and worse else row['quality_failures']})"
    needed = row.get("prompts_to_resolve")
    if needed is None or pd.isna(needed):
        more = ""
    elif needed == float("inf"):
        more = "; an estimate lies past its margin"
    elif needed > MANY_PROMPTS:
        more = "; an estimate lies at its margin"
    else:
        more = f"; ~{int(needed)} prompts would resolve it"
    return f"inconclusive ({row['quality_failures']}{more})"


def _interval(row: pd.Series, name: str, digits: int = 1, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{row[name]:{sign}.{digits}f} [{row[name + '_low']:{sign}.{digits}f}, "
            f"{row[name + '_high']:{sign}.{digits}f}]")


def report_tables(run: Path) -> dict[str, str]:
    """Markdown tables of a frontier run's report set (with the speed stage's timings when it ran): the frontier
    (speed, quality with intervals, the verdict), the per-attribute differences and a short summary (the README's)."""
    from .reference.quality import ATTRIBUTES

    report = pd.read_csv(run / "report" / "results.csv")
    speed_csv = run / "speed" / "results.csv"
    table = speed_table(report, pd.read_csv(speed_csv)) if speed_csv.exists() else report
    table = table.sort_values("macs_speedup").reset_index(drop=True)
    table["label"] = table["label"].replace(PRESET_NAMES)
    n = int(table["quality_images"].iloc[0])
    head = ("| setting | MACs speed-up | denoiser speed-up (paired, IQR) | adherence % [95 % CI] | Δ adherence | "
            "Δ detail | KID ×10³ | Δ KID | PSNR dB | verdict |")
    lines = [head, "| " + " | ".join(["---"] * 10) + " |"]
    for _, row in table.iterrows():
        verdict = verdict_text(row, bold=False)
        paired = (f"{row['speedup_denoiser_paired']:.2f}× ({row['speedup_denoiser_paired_iqr']:.2f})"
                  if pd.notna(row.get("speedup_denoiser_paired")) else "—")
        baseline = row["method"] == "baseline"
        lines.append(" | ".join([
            f"| {row['label']}", f"{row['macs_speedup']:.2f}×", paired, _interval(row, "adherence"),
            "—" if baseline else _interval(row, "adherence_diff", signed=True),
            "—" if baseline else _interval(row, "detail_diff", signed=True), _interval(row, "kid"),
            "—" if baseline else _interval(row, "kid_diff", signed=True),
            "—" if baseline else f"{row['psnr_db']:.1f}", verdict]) + " |")
    lines.append(f"\n{n} report prompts and seeds; intervals: paired bootstrap over prompts (2000 draws).")
    summary = ["| setting | MACs speed-up | denoiser speed-up (CPU) | Δ adherence (points) | Δ KID ×10³ | verdict |",
               "| --- | --- | --- | --- | --- | --- |"]
    merged = table[table["method"] != "baseline"]
    timed = merged.get("speedup_denoiser_paired", pd.Series(float("nan"), index=merged.index))
    for _, row in merged.loc[timed.fillna(merged["macs_speedup"]).sort_values(ascending=False).index].iterrows():
        speed = f"{row['speedup_denoiser_paired']:.2f}×" if pd.notna(row.get("speedup_denoiser_paired")) else "—"
        verdict = verdict_text(row)
        summary.append(f"| {row['label']} | {row['macs_speedup']:.2f}× | {speed} | "
                       f"{_interval(row, 'adherence_diff', signed=True)} | {_interval(row, 'kid_diff', signed=True)} "
                       f"| {verdict} |")
    scored = [a for a in ATTRIBUTES if f"adherence_{a}" in table and table[f"adherence_{a}"].notna().any()]
    attributes = ["| setting | " + " | ".join(f"Δ {a} [95 % CI]" for a in scored) + " |",
                  "| " + " | ".join(["---"] * (len(scored) + 1)) + " |"]
    for _, row in table[table["method"] != "baseline"].iterrows():
        attributes.append(f"| {row['label']} | " + " | ".join(
            _interval(row, f"adherence_{a}_diff", signed=True) for a in scored) + " |")
    base = table[table["method"] == "baseline"].iloc[0]
    attributes.append("| baseline (absolute, %) | " + " | ".join(
        _interval(base, f"adherence_{a}") for a in scored) + " |")
    return {"frontier": "\n".join(lines) + "\n", "attributes": "\n".join(attributes) + "\n",
            "summary": "\n".join(summary) + "\n"}


def scale_table(runs: list[Path]) -> str:
    """Markdown: the same settings measured on reference models of different token counts (one frontier-layout run
    each: ``report/`` and, when timed, ``speed/``), a row per setting and model, sorted by setting then tokens."""
    frames = []
    for run in runs:
        report = pd.read_csv(run / "report" / "results.csv")
        speed_csv = run / "speed" / "results.csv"
        frames.append(speed_table(report, pd.read_csv(speed_csv)) if speed_csv.exists() else report)
    table = pd.concat(frames, ignore_index=True).copy()  # one block: the merges left it fragmented
    base = table["method"] == "baseline"
    margin = table["model"].map(table[base].set_index("model")["kid"]) * stats.KID_RELATIVE_MARGIN
    table = table[~base].assign(kid_margin=margin[~base])
    table["label"] = table["label"].replace(PRESET_NAMES)
    order = {label: i for i, label in enumerate(table.sort_values("macs_speedup")["label"].drop_duplicates())}
    table = table.sort_values(["label", "tokens"], key=lambda c: c.map(order) if c.name == "label" else c)
    lines = ["| setting | model (tokens) | MACs speed-up | CPU denoiser (paired) | Δ adherence | Δ shape | Δ detail | "
             "Δ KID ×10³ (margin) | verdict |", "| " + " | ".join(["---"] * 9) + " |"]
    for _, row in table.iterrows():
        paired = (f"{row['speedup_denoiser_paired']:.2f}×" if pd.notna(row.get("speedup_denoiser_paired")) else "—")
        lines.append(" | ".join([
            f"| {row['label']}", f"{row['model']} ({int(row['tokens'])})", f"{row['macs_speedup']:.2f}×", paired,
            _interval(row, "adherence_diff", signed=True), _interval(row, "adherence_shape_diff", signed=True),
            _interval(row, "detail_diff", signed=True),
            f"{_interval(row, 'kid_diff', signed=True)} (+{row['kid_margin']:.1f})",
            verdict_text(row)]) + " |")
    counts = ", ".join(f"{m}: {int(n)}" for m, n in
                       pd.concat(frames).groupby("model")["quality_images"].first().items())
    lines.append(f"\nReport prompts and seeds per model: {counts}; intervals: paired bootstrap over prompts.")
    return "\n".join(lines) + "\n"


def tune_table(run: Path) -> str:
    """Markdown: every setting a frontier run tried on the tune set, its verdict, and what went on to the report."""
    tune = pd.read_csv(run / "tune" / "results.csv").sort_values(["method", "macs_speedup"])
    rows = ["| setting | MACs speed-up | Δ adherence | Δ KID ×10³ | verdict |", "| --- | --- | --- | --- | --- |"]
    for _, row in tune[tune["method"] != "baseline"].iterrows():
        verdict = verdict_text(row)
        rows.append(f"| {row['label']} | {row['macs_speedup']:.2f}× | {_interval(row, 'adherence_diff', signed=True)} "
                    f"| {_interval(row, 'kid_diff', signed=True)} | {verdict} |")
    rows.append(f"\n{int(tune['quality_images'].iloc[0])} tune prompts and seeds. Chosen for the report set: "
                + (", ".join(f"`{spec}`" for spec in chosen_settings(tune)) or "nothing") + ".")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/frontier"))
    parser.add_argument("--model", default="pixart-shapes", help="a trained preset (default %(default)s)")
    parser.add_argument("--stage", nargs="+", default=["tune", "report"], choices=["tune", "report", "speed"])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per setting in the speed stage")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="a partial frontier: only the candidate, composed and reference specs matching one of "
                             "these shell-style patterns (e.g. 'tokencache*' 'dbcache:*'); the baseline always runs")
    args, extra = parser.parse_known_args(argv)
    common = ["--model", args.model, *extra]
    if "tune" in args.stage:
        tune = [*common, "--out", str(args.out / "tune"), "--eval-set", "tune", "--no-latency", "--method",
                "baseline", *restrict(CANDIDATES, args.only)]
        composed = composed_to_tune(benchmark(tune), restrict(COMPOSED, args.only))
        if composed:  # the settings above resume from the CSV
            benchmark([*tune, *composed])
    chosen = chosen_settings(pd.read_csv(args.out / "tune" / "results.csv"))
    (args.out / "chosen.json").write_text(json.dumps(chosen, indent=1))
    specs = list(dict.fromkeys([*restrict(REFERENCES, args.only), *chosen]))
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
