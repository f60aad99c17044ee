"""Benchmark jobs: build the list, run each (MACs, latency, quality, fidelity), write rows incrementally, resume, gather.

A job is one (model, method, parameters) setting; its row is appended to ``<out>/parts/rank<r>.csv`` as soon as it is
measured, so a crash loses nothing and a re-run skips the jobs whose key (every input that changes a figure, code
and library versions included) is already written. Under ``accelerate launch`` the jobs are split across processes
(one per GPU); each process measures the baseline of every model it touches itself, and the rows are gathered on
the main process into ``<out>/results.csv``.

Per job the method is applied once, to its own copy of the denoiser, and warmed up by an untimed call; timed calls
then alternate between the baseline and the method, so both see the same machine state. On presets with learned
weights (`ModelPreset.trained`) every method also generates a fixed prompt set, scored for prompt adherence and
FID / KID against renders of the same prompts, and against the baseline's images of the same seeds (PSNR, SSIM,
relative L2 of the latents); on random-weight models only the last three are measured, on the timed call's output.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diffusers.hooks import MagCacheConfig
from diffusers.utils.torch_utils import unwrap_module

from sdtm_plugin import calibrate_mag_cache, get_merge_state

from .compiling import compile_denoiser, compiled_graphs
from .counting import MacRun
from .judging import QualityRun
from .macs import ForwardMacs
from .measure import CallResult, ClipScorer, PipelineProbe, Timing, denoiser_attr, median_iqr, psnr, rel_l2, ssim
from .methods import METHODS, Composed, method_label
from .models import PRESETS, call_default, load_pipeline, pipeline_class, wan_call_size
from .plots import sample_path
from .reference import quality
from .reference.train import TrainConfig, pipeline_call_kwargs

logger = logging.getLogger(__name__)

# quality figures: value and interval; differences to the baseline: value and interval
QUALITY_FIGURES = ["adherence", "all_correct", *[f"adherence_{a}" for a in quality.ATTRIBUTES], "detail",
                   *[f"detail_{d}" for d in quality.DETAIL_STATISTICS], "kid", "fid"]
QUALITY_COLUMNS = [f"{name}{suffix}" for name in QUALITY_FIGURES
                   for suffix in ("", "_low", "_high", "_diff", "_diff_low", "_diff_high")]

# the CSV schema: one row per job; every column is always present (NaN where not measured)
COLUMNS = [
    "key", "model", "family", "trained", "resolution", "tokens", "method", "label", "ratio", "params", "steps",
    "batch_size", "guidance_scale", "scheduler", "seed",
    # MACs: per denoiser forward at this batch (CFG halves included), per generated image (all steps), and the
    # baseline's per-image total over this job's (> 1: fewer MACs)
    "macs_forward_linear_G", "macs_forward_total_G", "macs_image_linear_T", "macs_image_total_T",
    "macs_self_attn_G", "macs_cross_attn_G", "macs_mlp_G", "macs_merge_G", "macs_other_G", "macs_speedup",
    # merge-path GPU proxies per merged block: output bytes / block input bytes, dispatched ops (mean over phases)
    "merge_bytes_x", "merge_ops", "merge_traffic",
    # step caches: share of attention / MLP sub-layers computed per forward (1 = all), mean and per step
    "sublayers_run", "sublayers_run_per_step",
    "pipeline_ms", "pipeline_iqr_ms", "denoiser_ms", "denoiser_iqr_ms",
    "baseline_pipeline_ms", "baseline_denoiser_ms", "speedup_pipeline", "speedup_denoiser",
    # median and IQR over repeats of baseline call / the method call after it: robust to the machine's slow drift
    "speedup_denoiser_paired", "speedup_denoiser_paired_iqr",
    # memory: the GPU's peak allocation during the method's timed calls (NaN on CPU); the most the merge state held
    # (merge caches, staleness) during a generation, any device
    "peak_memory_MB", "merge_state_peak_MB",
    # image quality on an evaluation set (trained presets only): the set, its size, every figure with its 95 % interval
    # (paired bootstrap over prompts), the differences to the baseline's images of the same prompts and seeds with
    # their intervals, and the equal-quality verdict (non-inferiority on every metric; the failing ones listed)
    # verdict: "equal" (non-inferiority shown), "worse" (a loss past a margin shown: the metrics in quality_worse),
    # "inconclusive" (neither; prompts_to_resolve: about how many prompts would show equality if the estimates held,
    # inf where an estimate lies past its margin)
    "quality_set", "quality_images", *QUALITY_COLUMNS, "equal_quality", "verdict", "quality_failures", "quality_worse",
    "prompts_to_resolve",
    # fidelity against the baseline output of the same seeds
    "psnr_db", "ssim", "rel_l2_latents", "clip_score", "tokens_per_step",
    "device", "device_name", "dtype", "compile", "threads", "warmup", "repeats", "torch", "diffusers",
    "code_version", "python", "rank", "finished_at",
]


@dataclass(frozen=True)
class Job:
    """One benchmark setting. `params` are the method's parameters that differ from its defaults."""

    model: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()

    def config(self, num_steps: int | None = None) -> Any:
        return METHODS[self.method].make_config(dict(self.params), num_steps)

    @property
    def ratio(self) -> float:
        """The merge ratio of a merging setting (composed ones included); 0 for the others."""
        config = self.config()
        config = config.merge if isinstance(config, Composed) else config
        return float(getattr(config, "ratio", 0.0) or 0.0)

    @property
    def label(self) -> str:
        return method_label(self.method, dict(self.params))


@dataclass
class Settings:
    """Run-wide settings (the CLI's options)."""

    out: Path
    steps: int | None = None
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    prompt: str = "a photo of an astronaut riding a horse on the moon"
    guidance_scale: float | None = None
    batch_size: int = 1
    device: str | None = None
    dtype: str = "float32"
    threads: int | None = None
    measure_latency: bool = True
    measure_fidelity: bool = True
    eval_set: str = "report"  # trained presets: the evaluation set quality is measured on ("tune" or "report")
    quality_prompts: int | None = None  # its first prompts scored (None: all of them; 0: no quality measurement)
    resume: bool = True
    model_cache: Path | None = None
    clip_model: str | None = None
    samples: bool = True
    compile: str | None = None  # torch.compile backend for the baseline's and the methods' denoisers
    extra_call_kwargs: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_jobs(models: list[str], methods: list[tuple[str, dict[str, Any]]], ratios: list[float] | None) -> list[Job]:
    """Baseline once per model, then every method setting, at every ratio of `ratios` for methods with a ratio
    that was not given explicitly. Every config is validated now, not after an hour of benchmarking."""
    jobs = []
    for model in models:
        for name, params in methods:
            sweep = METHODS[name].sweep_param
            values = ratios if (ratios and sweep and sweep not in params) else [None]
            for value in values:
                p = dict(params) if value is None else {**params, sweep: value}
                job = Job(model, name, tuple(sorted(p.items())))
                job.config()
                jobs.append(job)
    # the baseline of every model first: every other row's speed-up, MAC and fidelity references; per model, the
    # methods that leave state behind (`MethodSpec.runs_last`) after the others
    jobs.sort(key=lambda job: (models.index(job.model), METHODS[job.method].runs_last))
    return list(dict.fromkeys([Job(m, "baseline") for m in models] + jobs))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """A digest of the plugin's and the harness's files (code and shipped weights): any change re-measures."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for folder in ("sdtm_plugin", "benchmarks"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix in {".py", ".json", ".safetensors", ".txt"}:
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment(device: torch.device, settings: Settings) -> dict[str, Any]:
    import diffusers

    return dict(
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=settings.dtype, compile=settings.compile or "", threads=torch.get_num_threads(), warmup=settings.warmup,
        repeats=settings.repeats, torch=torch.__version__, diffusers=diffusers.__version__, code_version=code_version(),
        python=platform.python_version(),
    )


def job_key(job: Job, settings: Settings, env: dict[str, Any]) -> str:
    """Identity of a row for resuming: the job, every setting that changes its numbers, the machine and versions."""
    ident = [
        job.model, job.method, list(job.params), settings.steps, settings.seed, settings.prompt,
        settings.guidance_scale, settings.batch_size, settings.measure_latency, settings.measure_fidelity,
        settings.eval_set, settings.quality_prompts, settings.clip_model,
        *(env[k] for k in ("device", "device_name", "dtype", "compile", "threads", "warmup", "repeats", "torch",
                           "diffusers", "code_version", "python")),
    ]
    return hashlib.sha1(json.dumps(ident, default=str).encode()).hexdigest()[:16]


# -- the CSV ------------------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"key": str})
    if list(table.columns) != COLUMNS:
        raise RuntimeError(
            f"{path} was written with other columns than this version's ({len(table.columns)} vs {len(COLUMNS)}); "
            "use another --out folder, or move the file away"
        )
    return table


def read_rows(out: Path) -> pd.DataFrame:
    """Every row written so far (gathered results and per-process parts), one per key."""
    paths = [p for p in [out / "results.csv", *sorted((out / "parts").glob("rank*.csv"))] if p.exists()]
    frames = [f for f in (_read_csv(p) for p in paths) if not f.empty]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True).drop_duplicates("key", keep="last")


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        _read_csv(path)  # refuses a file with another header instead of appending misaligned columns
    pd.DataFrame([row], columns=COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False)


# -- one model in one process ---------------------------------------------------------------------------------------
class ModelSession:
    """One model in one process: the baseline pipeline, a copy of its denoiser for the methods, the baseline's
    reference call, and each job's timed calls; its quality (`protocol`, `judging.QualityRun`) and MACs (`macs`,
    `counting.MacRun`)."""

    def __init__(self, name: str, settings: Settings, device: torch.device) -> None:
        self.name, self.settings, self.device = name, settings, device
        self.preset = PRESETS.get(name)
        self.reference: CallResult | None = None  # the baseline's timed-call output (random-weight models)
        self.protocol = QualityRun(self)  # quality of trained presets
        self.macs = MacRun(self)
        self._mag_ratios: dict[int, list[float]] = {}

    @functools.cached_property
    def pipe(self):
        s = self.settings
        pipe = load_pipeline(self.name, seed=0, cache_dir=s.model_cache, dtype=s.torch_dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if s.compile:
            attr = denoiser_attr(pipe)
            setattr(pipe, attr, compile_denoiser(getattr(pipe, attr), s.compile))
        return pipe

    @functools.cached_property
    def method_pipe(self):
        """The same pipeline with its own denoiser and scheduler, which methods patch: the baseline stays clean."""
        components = dict(self.pipe.components)
        denoiser = copy.deepcopy(self.denoiser)
        if self.settings.compile:
            denoiser = compile_denoiser(denoiser, self.settings.compile)
        components[self.denoiser_attr] = denoiser
        components["scheduler"] = copy.deepcopy(components["scheduler"])
        pipe = type(self.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def denoiser_attr(self) -> str:
        return denoiser_attr(self.pipe)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The baseline's denoiser, unwrapped from `torch.compile`."""
        return unwrap_module(getattr(self.pipe, self.denoiser_attr))

    @property
    def trained(self) -> bool:
        return bool(self.preset and self.preset.trained)

    @functools.cached_property
    def clip(self) -> ClipScorer | None:
        """Loaded on first measurement only (never for --macs-only)."""
        return ClipScorer(self.settings.clip_model, self.device) if self.settings.clip_model else None

    @property
    def pipeline_cls(self) -> type:
        return pipeline_class(self.preset) if self.preset else type(self.pipe)

    @property
    def family(self) -> str:
        return self.preset.family if self.preset else type(self.denoiser).__name__

    @property
    def steps(self) -> int:
        return self.settings.steps or call_default(self.pipeline_cls, "num_inference_steps")

    @property
    def guidance(self) -> float:
        g = self.settings.guidance_scale
        if g is None:
            g = call_default(self.pipeline_cls, "guidance_scale")
        return 1.0 if g is None else g  # None: the pipeline's guidance is off by default (Qwen-Image: true_cfg_scale)

    @property
    def denoiser_batch(self) -> int:
        """Images per denoiser forward: doubled under classifier-free guidance where the pipeline batches both halves;
        FLUX.1's, FLUX.2's and HunyuanVideo's guidance is an input of one forward (distilled), Wan and Qwen-Image run
        one forward per half."""
        batched_cfg = self.guidance > 1 and self.family not in ("flux", "wan", "flux2", "qwen-image", "hunyuan-video")
        return self.settings.batch_size * (2 if batched_cfg else 1)

    @property
    def calls_per_step(self) -> int:
        """Denoiser forwards per step: Wan calls it once per guidance half, and so does FLUX under true guidance (the
        trained FLUX reference is not guidance-distilled)."""
        if self.family == "wan" and self.guidance > 1:
            return 2
        true_cfg = self.call_kwargs().get("true_cfg_scale", 1.0) if self.family == "flux" else 1.0
        return 2 if true_cfg > 1 else 1

    @functools.cached_property
    def train_config(self) -> TrainConfig:
        """The training configuration of a trained preset."""
        return TrainConfig.from_json(self.preset.weights / "train_config.json")

    # -- pipeline calls ----------------------------------------------------------------------------------------
    def call_kwargs(self, prompts: list[str] | None = None, seed: int | None = None) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "output_type": "np", "num_inference_steps": self.steps,
            "generator": torch.Generator("cpu").manual_seed(s.seed if seed is None else seed),
        }
        if s.guidance_scale is not None:
            kwargs["guidance_scale"] = s.guidance_scale
        if self.family == "dit":
            kwargs["class_labels"] = list(range(s.batch_size))
        elif prompts is not None:
            kwargs["prompt"] = prompts
        elif self.trained:  # the timed call: the first prompts of the evaluation set
            kwargs["prompt"] = [p.caption for p in self.protocol.eval_set.prompts[: s.batch_size]]
        else:
            kwargs["prompt"] = s.prompt
            kwargs["num_images_per_prompt"] = s.batch_size
        if self.trained:  # how its training says to call it (trained size, text length, guidance)
            kwargs.update(pipeline_call_kwargs(self.train_config))
        elif self.family == "pixart":
            kwargs.update(use_resolution_binning=False, clean_caption=False)
        elif self.family == "flux" and self.preset is not None:  # FluxPipeline defaults to 1024 px, 512 T5 tokens
            kwargs.update(height=self.preset.resolution, width=self.preset.resolution,
                          max_sequence_length=self.preset.text_tokens)
        if self.family == "wan" and self.preset is not None:  # WanPipeline defaults to 480 x 832, 81 frames
            kwargs.update(**wan_call_size(self.preset), max_sequence_length=self.preset.text_tokens)
            kwargs["num_videos_per_prompt"] = kwargs.pop("num_images_per_prompt", 1)
        return {**kwargs, **s.extra_call_kwargs}

    def call(self, pipe, prompts: list[str] | None = None, seed: int | None = None) -> CallResult:
        """One pipeline call, timed (pipeline and denoiser) with its final latents captured."""
        with PipelineProbe(pipe) as probe:
            return probe.call(lambda: pipe(**self.call_kwargs(prompts, seed)))

    # -- measurements ----------------------------------------------------------------------------------------
    def measure(self, job: Job) -> dict[str, Any]:
        s = self.settings
        spec = METHODS[job.method]
        is_baseline = job.method == "baseline"
        pipe = self.pipe if is_baseline else self.method_pipe
        row: dict[str, Any] = {}
        if self.reference is None:  # the baseline's first call: its warm-up and the fidelity reference
            self.reference = self.call(self.pipe)
            for _ in range(s.warmup - 1):
                self.call(self.pipe)
        result = self.reference
        if not is_baseline:
            spec.apply(pipe, self.resolve(job.config(self.steps)))  # once per job, outside the timed calls
        try:
            if not is_baseline:
                for _ in range(s.warmup):  # the method's cold start (layouts, first allocations), untimed
                    result = self.call(pipe)
                if s.compile:  # after a method's graphs the baseline's next call compiles frames of its own
                    self.call(self.pipe)
            timings, baseline = (Timing(), Timing()), (Timing(), Timing())
            graphs_before = compiled_graphs()
            peaks = [result.peak_memory_bytes]
            for _ in range(s.repeats if s.measure_latency else 0):
                base_result = self.call(self.pipe)
                _record(baseline, base_result)
                if is_baseline:
                    peaks.append(base_result.peak_memory_bytes)
                else:
                    result = self.call(pipe)
                    _record(timings, result)
                    peaks.append(result.peak_memory_bytes)
            row["peak_memory_MB"] = max(peaks) / 2**20
            if compiled_graphs() > graphs_before:
                logger.warning("%s %s: %d graphs were compiled during the timed calls; its times include compilation "
                               "(raise --warmup)", self.name, job.label, compiled_graphs() - graphs_before)
            state = get_merge_state(pipe)
            if state is not None:
                row["tokens_per_step"] = json.dumps(_mean_tokens(state.token_counts))
                row["merge_state_peak_MB"] = state.peak_held_bytes / 2**20
            images = result.images
            if self.protocol.enabled:
                images, latents = self.protocol.images(job, pipe)
                row.update(self.protocol.row(job, images, latents))
            elif s.measure_fidelity:
                row.update(psnr_db=psnr(images, self.reference.images), ssim=ssim(images, self.reference.images),
                           rel_l2_latents=rel_l2(result.latents, self.reference.latents))
        finally:
            if not is_baseline:
                spec.remove(pipe)
        if s.samples:
            path = sample_path(s.out, self.name, job.label)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, (images[:16] * 255).round().astype(np.uint8))
        if is_baseline:
            timings = baseline
        if s.measure_latency:
            row.update(
                pipeline_ms=timings[0].median, pipeline_iqr_ms=timings[0].iqr, denoiser_ms=timings[1].median,
                denoiser_iqr_ms=timings[1].iqr, baseline_pipeline_ms=baseline[0].median,
                baseline_denoiser_ms=baseline[1].median, speedup_pipeline=baseline[0].median / timings[0].median,
                speedup_denoiser=baseline[1].median / timings[1].median,
            )
            paired = median_iqr([b / m for b, m in zip(baseline[1].samples_ms, timings[1].samples_ms)])
            row.update(speedup_denoiser_paired=paired[0], speedup_denoiser_paired_iqr=paired[1])
        if self.clip is not None and self.family != "dit":
            row["clip_score"] = self.clip(result.images, s.prompt)
        return row

    def resolve(self, config: Any) -> Any:
        """A job's config with what only this model can tell filled in: MagCache's calibrated ratios."""
        if isinstance(config, Composed):
            return dataclasses.replace(config, cache=self.resolve(config.cache))
        if isinstance(config, MagCacheConfig) and config.calibrate:
            ratios = self.mag_ratios(config.num_inference_steps)
            return dataclasses.replace(config, calibrate=False, mag_ratios=ratios)
        return config

    def mag_ratios(self, num_steps: int) -> list[float]:
        """MagCache's residual-magnitude ratios of this model, from one calibration run (diffusers logs them)."""
        if num_steps not in self._mag_ratios:
            self._mag_ratios[num_steps] = calibrate_mag_cache(self.method_pipe, num_steps, **{
                k: v for k, v in self.call_kwargs().items() if k != "num_inference_steps"})
        return self._mag_ratios[num_steps]


def _record(timings: tuple[Timing, Timing], result: CallResult) -> None:
    timings[0].samples_ms.append(result.pipeline_s * 1e3)
    timings[1].samples_ms.append(result.denoiser_s * 1e3)


def _mean_tokens(token_counts: list[dict[str, list[int | None]]]) -> dict[str, list[float]]:
    """Per step, the mean number of tokens entering each role's sub-layers over the blocks that ran."""
    out: dict[str, list[float]] = {}
    for role in ("attn", "mlp"):
        out[role] = [
            round(sum(c for c in step[role] if c is not None) / max(1, sum(c is not None for c in step[role])), 2)
            for step in token_counts
        ]
    return out


def macs_columns(macs: ForwardMacs, baseline: ForwardMacs, batch_size: int, calls_per_step: int = 1,
                 baseline_calls: int | None = None) -> dict[str, Any]:
    """`calls_per_step`: forwards per step that `macs` (one per step, counted shape-only) stands for (Wan's guidance
    halves: the same shapes and merges twice; 1 where a real call counted every forward); `baseline_calls`: the same
    for `baseline` (default `calls_per_step`), so that the speed-up compares whole calls."""
    baseline_calls = calls_per_step if baseline_calls is None else baseline_calls
    n = len(macs.steps)
    per_call = macs.per_call  # every forward of one pipeline call (batch_size images)
    labels = per_call.by_label()
    return {
        "macs_forward_linear_G": macs.mean_per_forward("linear") / 1e9,
        "macs_forward_total_G": macs.mean_per_forward("total") / 1e9,
        "macs_image_linear_T": per_call.linear * calls_per_step / batch_size / 1e12,
        "macs_image_total_T": per_call.total * calls_per_step / batch_size / 1e12,
        **{f"macs_{label}_G": v / n / 1e9 for label, v in labels.items()},
        "macs_speedup": baseline.per_call.total * baseline_calls / (per_call.total * calls_per_step),
    }


def traffic_columns(macs: ForwardMacs, block_bytes: int | None) -> dict[str, Any]:
    if block_bytes is None or not macs.token_counts:
        return {}
    traffic = macs.merge_traffic(block_bytes)
    if not traffic:
        return {}
    return {
        "merge_bytes_x": float(np.mean([t["bytes_x"] for t in traffic.values()])),
        "merge_ops": float(np.mean([t["ops"] for t in traffic.values()])),
        "merge_traffic": json.dumps({k: {m: round(v, 3) for m, v in t.items()} for k, t in traffic.items()}),
    }


def process_device(requested: str | None, state: Any) -> torch.device:
    """This process's device: accelerate's (its own GPU), or `requested`; a bare ``cuda`` means this process's GPU."""
    if not requested:
        return state.device
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", state.local_process_index)
    return device


def run_jobs(jobs: list[Job], settings: Settings, macs_only: bool = False) -> pd.DataFrame:
    """Run `jobs` (split across processes under accelerate); returns their rows (resumed ones included)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # on CPU (no GPU, or --device cpu) accelerate's processes talk over gloo
    state = PartialState(cpu=not torch.cuda.is_available() or (settings.device or "").startswith("cpu"))
    device = process_device(settings.device, state)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = settings.out
    env = environment(device, settings)
    keys = {job: job_key(job, settings, env) for job in jobs}
    done = set(read_rows(out)["key"]) if settings.resume else set()
    todo = [j for j in jobs if keys[j] not in done]
    if len(todo) < len(jobs) and state.is_main_process:
        logger.info("resuming: %d of %d jobs already in %s", len(jobs) - len(todo), len(jobs), out)
    part = out / "parts" / f"rank{state.process_index}.csv"
    rows: list[dict] = []
    error: BaseException | None = None
    with state.split_between_processes(todo) as mine:
        sessions: dict[str, ModelSession] = {}
        try:
            for job in tqdm(mine, desc=f"benchmark[{state.process_index}]", disable=not mine):
                session = sessions.get(job.model)
                if session is None:
                    sessions.clear()  # one pipeline in memory at a time
                    session = sessions[job.model] = ModelSession(job.model, settings, device)
                row = _job_row(job, session, settings, env, keys[job], macs_only)
                row["rank"] = state.process_index
                append_row(part, row)
                rows.append(row)
                logger.info("%s %s: %s", job.model, job.label, _summary(row))
        except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks were released
            error = err
    if state.num_processes > 1:
        # every rank reaches the gather, also one whose job raised: nobody waits forever
        gathered = gather_object([(rows, None if error is None else f"rank {state.process_index}: {error!r}")])
        failures = [msg for _, msg in gathered if msg]
        all_rows = [r for rs, _ in gathered for r in rs]
    else:
        failures, all_rows = [], rows
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(f"benchmark failed on another process: {'; '.join(failures)}")
    if state.is_main_process:
        table = pd.concat([read_rows(out), pd.DataFrame(all_rows, columns=COLUMNS)], ignore_index=True)
        table = table.drop_duplicates("key", keep="last")
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "results.csv", index=False)
    state.wait_for_everyone()
    table = read_rows(out)
    return table[table["key"].isin(set(keys.values()))].reset_index(drop=True)


def _job_row(job: Job, session: ModelSession, settings: Settings, env: dict[str, Any], key: str,
             macs_only: bool) -> dict:
    preset = session.preset
    row: dict[str, Any] = dict(
        key=key, model=job.model, family=session.family, trained=session.trained,
        resolution=preset.resolution if preset else None, tokens=preset.num_tokens if preset else None,
        method=job.method, label=job.label, ratio=job.ratio, params=json.dumps(dict(job.params)), steps=session.steps,
        batch_size=settings.batch_size, guidance_scale=session.guidance, seed=settings.seed,
        scheduler=type(session.pipe.scheduler).__name__ if not macs_only else None,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), **env,
    )
    macs = session.macs.of(job)
    calls = 1 if METHODS[job.method].caches else session.calls_per_step  # a real call counts every forward
    row.update(macs_columns(macs, session.macs.of(Job(job.model, "baseline")), settings.batch_size, calls,
                            session.calls_per_step))
    if METHODS[job.method].merges:
        row.update(traffic_columns(macs, session.macs.block_input_bytes()))
    if macs.sublayers_run is not None:
        row["sublayers_run"] = float(np.mean(macs.sublayers_run))
        row["sublayers_run_per_step"] = json.dumps([round(v, 3) for v in macs.sublayers_run])
    if not macs_only:
        row.update(session.measure(job))
    return row


def _summary(row: dict) -> str:
    parts = [f"MACs/fwd {row['macs_forward_total_G']:.2f}G"]
    if row.get("speedup_pipeline") is not None:
        parts.append(f"speed-up {row['speedup_pipeline']:.2f}x (denoiser {row['speedup_denoiser']:.2f}x)")
    if row.get("adherence") is not None:
        parts.append(f"adherence {row['adherence']:.1f}% ({row['adherence_diff']:+.1f} "
                     f"[{row['adherence_diff_low']:+.1f}, {row['adherence_diff_high']:+.1f}]), "
                     f"KID {row['kid']:.1f} ({row['kid_diff']:+.1f}), detail {row['detail']:.1f}%, "
                     f"verdict: {row['verdict']}")
    if row.get("psnr_db") is not None:
        parts.append(f"PSNR {row['psnr_db']:.1f} dB")
    return ", ".join(parts)
