"""The harness's command line, ``python -m benchmarks``: MACs, latency, speed-up, image quality and fidelity of each method, as CSV, table, plots.

Examples::

    python -m benchmarks                                   # embedded default (CPU: the trained pixart-shapes model)
    python -m benchmarks --quick                           # smoke run (a few minutes on CPU)
    python -m benchmarks --method baseline tome sdtm sdtm:ratio=0.35,protect_steps_frequency=-1
    python -m benchmarks --macs-only --model pixart-xl-2-1024 sd3-medium --json
    python -m benchmarks --model PixArt-alpha/PixArt-XL-2-512x512 --ratios 0.2 0.3 0.4 --dtype float16
    accelerate launch -m benchmarks --model pixart-xl-2-512 --ratios 0.2 0.3 0.4 0.5   # one process per GPU

With no --model: on CPU the trained ``pixart-shapes`` preset (learned weights: prompt adherence and FID are image
quality); with a GPU, full-size PixArt-XL-2 at 512 and 1024 px in fp16 with a ratio sweep (random weights: speed
and MACs; PSNR against the baseline is not image quality) and the trained preset.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

import torch

from sdtm_plugin import SDTMConfig

from .macs import PAPER_TMACS
from .methods import METHODS, config_spec, parse_method
from .models import PRESETS
from .plots import plot_all
from .runner import Settings, make_jobs, run_jobs
from .verdicts import best_at_equal_quality, equal_quality_rule

logger = logging.getLogger("benchmarks")

TABLE_COLUMNS = [
    "model", "label", "macs_forward_total_G", "macs_speedup", "merge_bytes_x", "merge_ops", "pipeline_ms",
    "denoiser_ms", "speedup_pipeline", "speedup_denoiser", "quality_images", "adherence", "adherence_diff_low",
    "adherence_shape_diff_low", "detail_diff_low", "kid", "kid_diff_high", "equal_quality", "psnr_db", "ssim",
    "rel_l2_latents", "clip_score",
]
MACS_COLUMNS = [
    "model", "label", "steps", "batch_size", "macs_forward_linear_G", "macs_forward_total_G",
    "macs_image_linear_T", "macs_image_total_T", "macs_self_attn_G", "macs_cross_attn_G", "macs_mlp_G",
    "macs_merge_G", "macs_other_G", "macs_speedup", "merge_bytes_x", "merge_ops", "merge_traffic",
]
# the embedded defaults of `./run_benchmark.sh` with no arguments
FAST = config_spec("sdtm", SDTMConfig.fast())
# the settings `python -m benchmarks.frontier` chose on the tune set (fastest per method at equal quality; every
# merge setting and every other step cache tried there failed the rule; token caching from its partial frontier):
# their report-set figures are in docs/results.md, this default re-measures them on the first 64 report prompts
TUNED = ["fbcache:threshold=0.1", "dbcache:residual_diff_threshold=0.2", "tokencache:extrapolation=1"]
# one generation of the trained model takes ~1.2 s on 2 cores, whose speed drifts by up to 30 % between minutes:
# identical runs timed 3 times each differed by 10 %, so the CPU default times 12 calls per job
CPU_DEFAULT = dict(model=["pixart-shapes"], repeats=12, quality_prompts=64,
                   method=["baseline", "tome", "sdtm", FAST, *TUNED])
GPU_DEFAULT = dict(model=["pixart-xl-2-512", "pixart-xl-2-1024", "pixart-shapes"],
                   method=["baseline", "tome", "sdtm", FAST, "tokencache:ratio=0.7"], ratios=[0.2, 0.3, 0.4, 0.5],
                   dtype="float16")


def default_run(gpu: bool) -> dict[str, Any]:
    """What `./run_benchmark.sh` runs with no arguments: the GPU default with a GPU, else the CPU default."""
    return GPU_DEFAULT if gpu else CPU_DEFAULT


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with a JSON value (numbers, true/false, null) or else a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    presets = ", ".join(f"{k} ({v.description})" for k, v in PRESETS.items())
    p.add_argument("--model", nargs="+", default=None,
                   help=f"presets (offline): {presets}; or any diffusers path / hub name (default: see above)")
    methods = "; ".join(f"{k}: {v.description}" for k, v in METHODS.items())
    p.add_argument("--method", nargs="+", default=None, metavar="NAME[:KEY=VALUE,...]",
                   help=f"method settings to run ({methods}); the baseline always runs (default: see above)")
    p.add_argument("--ratios", nargs="+", type=float, default=None,
                   help="ratios swept for every method setting with a ratio that does not set it")
    p.add_argument("--sdtm", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="add a field to every sdtm setting, e.g. --sdtm protect_steps_frequency=-1 (repeatable)")
    p.add_argument("--tome", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="add a field to every tome setting, e.g. --tome merge_mlp=true (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the pipeline's default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per job (median and IQR reported; default 3, or the embedded default's)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls per model (baseline) and per job (method) before timing")
    p.add_argument("--seed", type=int, default=0, help="generator seed (fidelity compares outputs of this seed)")
    p.add_argument("--prompt", default=Settings.prompt, help="prompt of every call")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per prompt")
    p.add_argument("--device", default=None, help="torch device (default: this process's GPU, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default float32; float16 in the GPU default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded in the CSV)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND[:MODE]",
                   help="torch.compile the baseline's and the methods' denoisers (backend: inductor when not given; "
                        "MODE: inductor's, e.g. inductor:reduce-overhead for CUDA graphs); "
                        "the warm-up calls absorb compilation")
    p.add_argument("--fullgraph", action="store_true",
                   help="with --compile: fullgraph=True, a graph break raises (merging alone has none; the step "
                        "caches' own hooks break graphs)")
    p.add_argument("--regional", action="store_true",
                   help="with --compile: regional compilation (diffusers' compile_repeated_blocks: each repeated "
                        "block class compiled, the model's own forward eager), as FLUX and Wan users run")
    p.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="folder for results.csv and plots")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="re-run jobs already in the CSV")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip timing (one call per job)")
    p.add_argument("--no-fidelity", dest="fidelity", action="store_false", help="skip PSNR/SSIM/rel-L2")
    p.add_argument("--eval-set", default="report", choices=["tune", "report"],
                   help="trained presets: the prompt set quality is measured on: 'tune' (144 prompts) to choose settings, "
                        "'report' (288, disjoint prompts and seeds) for published figures (default %(default)s)")
    p.add_argument("--quality-prompts", type=int, default=None,
                   help="score only the first N prompts of the evaluation set (default: all, or the embedded "
                        "default's; 0: no quality measurement, e.g. for a timing-only run)")
    p.add_argument("--no-samples", dest="samples", action="store_false", help="skip the sample grids")
    p.add_argument("--clip-model", default=None,
                   help="CLIP checkpoint (path or cached hub name) for a CLIP score column")
    p.add_argument("--macs-only", action="store_true",
                   help="only count MACs (meta device for presets: no weights, seconds even for full-size models)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--quick", action="store_true", help="smoke run: 6 steps, 1 timed repeat, 16 quality prompts")
    p.add_argument("--fvcore", action="store_true",
                   help="also count the baseline's MACs with fvcore (CPU, real tensors; small models only)")
    p.add_argument("--model-cache", type=Path, default=None, help="where presets are saved (default ~/.cache)")
    p.add_argument("--log-level", default="INFO", help="logging level")
    return p


def main(argv: list[str] | None = None) -> pd.DataFrame:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "sdtm_plugin"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    default = default_run(torch.cuda.is_available() and not (args.device or "").startswith("cpu"))
    if args.model is None:
        args.model = default["model"]
        args.ratios = args.ratios if args.ratios is not None else default.get("ratios")
        args.dtype = args.dtype or default.get("dtype")
        if args.repeats is None:
            args.repeats = default.get("repeats")
        if args.quality_prompts is None:
            args.quality_prompts = default.get("quality_prompts")
    args.dtype = args.dtype or "float32"
    for flag in ("fullgraph", "regional"):
        if getattr(args, flag):
            if args.compile is None:
                raise ValueError(f"--{flag} needs --compile")
            args.compile += f"+{flag}"
    if args.compile is not None:
        check_compile_spec(args.compile)
    args.repeats = 3 if args.repeats is None else args.repeats
    specs = args.method or (["baseline", "sdtm"] if args.macs_only else default["method"])
    if args.quick:
        args.steps, args.repeats, args.warmup = args.steps or 6, 1, 1
        if args.quality_prompts != 0:
            args.quality_prompts = min(args.quality_prompts or 16, 16)
    overrides = {"sdtm": dict(args.sdtm), "tome": dict(args.tome)}
    methods = []
    for spec in specs:
        name, params = parse_method(spec)
        methods.append((name, {**overrides.get(name, {}), **params}))
    jobs = make_jobs(args.model, methods, args.ratios)
    settings = Settings(
        out=args.out, steps=args.steps, repeats=args.repeats, warmup=args.warmup, seed=args.seed, prompt=args.prompt,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        threads=args.threads, measure_latency=args.latency and not args.macs_only,
        measure_fidelity=args.fidelity and not args.macs_only, eval_set=args.eval_set,
        quality_prompts=args.quality_prompts,
        resume=args.resume, model_cache=args.model_cache, clip_model=args.clip_model, samples=args.samples,
        compile=args.compile,
    )
    table = run_jobs(jobs, settings, macs_only=args.macs_only)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return table
    if args.fvcore:
        _fvcore_check(args.model, settings)
    columns = MACS_COLUMNS if args.macs_only else TABLE_COLUMNS
    if args.json:
        rows = table[columns].to_dict(orient="records")
        for row in rows:
            row["paper_TMACs_forward_linear"] = PAPER_TMACS.get((row["model"], row["label"]))
        print(json.dumps(rows, indent=2, default=str))
    else:
        shown = table[columns].dropna(axis=1, how="all")
        with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.3f}".format):
            print(shown.to_string(index=False))
    best = best_at_equal_quality(table)
    if not args.json and not best.empty:
        best.to_csv(args.out / "best_at_equal_quality.csv", index=False)
        print("\nFastest setting per method at equal quality (non-inferior to the baseline on every metric: "
              f"{equal_quality_rule()}):")
        with pd.option_context("display.width", 250, "display.max_columns", 40, "display.float_format", "{:.3f}".format):
            print(best.dropna(axis=1, how="all").to_string(index=False))
    if not args.macs_only:
        for path in plot_all(table, args.out):
            logger.info("wrote %s", path)
    logger.info("results: %s", args.out / "results.csv")
    return table


def check_compile_spec(spec: str) -> None:
    """``BACKEND[:MODE][+fullgraph][+regional]``: a torch.compile backend and, for inductor, one of its modes; else a
    ValueError."""
    import torch._dynamo as dynamo

    from .compiling import COMPILE_MODES, parse_compile_spec

    backend, mode, *_ = parse_compile_spec(spec)
    backends = sorted(dynamo.list_backends(exclude_tags=()))
    try:
        dynamo.lookup_backend(backend)
    except dynamo.exc.InvalidBackend:
        raise ValueError(f"--compile must be a torch.compile backend {backends}, got {backend!r}") from None
    if mode and (backend != "inductor" or mode not in COMPILE_MODES):
        raise ValueError(f"--compile mode must be inductor's, one of {COMPILE_MODES} (inductor:MODE), got {spec!r}")


def _fvcore_check(models: list[str], settings: Settings) -> None:
    """fvcore vs our counter on the baseline forward of each preset (CPU, real tensors)."""
    from .macs import count_forward_macs, fvcore_macs
    from .models import build_denoiser, denoiser_inputs

    for name in models:
        preset = PRESETS.get(name)
        if preset is None:
            logger.warning("--fvcore: %s is not a preset, skipped", name)
            continue
        model = build_denoiser(preset)
        inputs = denoiser_inputs(preset, 2)
        ours = count_forward_macs(model, inputs).steps[0]
        theirs = fvcore_macs(model, inputs)
        logger.info(
            "%s fvcore %.3f GMACs vs ours linear %.3f G / total %.3f G (fvcore skips SDPA)",
            name, theirs / 1e9, ours.linear / 1e9, ours.total / 1e9,
        )

