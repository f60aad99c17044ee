"""Benchmark jobs: build the list, run each (MACs, latency, fidelity), write rows incrementally, resume, gather.

A job is one (model, method, parameters) setting; its row is appended to ``<out>/parts/rank<r>.csv`` as soon as it is
measured, so a crash loses nothing and a re-run skips the jobs whose key is already written. Under
``accelerate launch`` the jobs are split across processes (one per GPU); each process measures the baseline of every
model it touches itself, so speed-ups and fidelity compare like with like, and the rows are gathered on the main
process into ``<out>/results.csv``.
"""

from __future__ import annotations

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

import pandas as pd
import torch
from tqdm.auto import tqdm

from sdtm_plugin import SDTMConfig, ToMeConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.adapters import find_adapter

from .macs import ForwardMacs, count_forward_macs
from .measure import ClipScorer, PipelineProbe, Timing, psnr, rel_l2, ssim
from .models import PRESETS, build_denoiser, call_default, denoiser_inputs, load_pipeline, pipeline_class

logger = logging.getLogger(__name__)

METHODS = ("baseline", "tome", "sdtm")
CONFIGS = {"tome": ToMeConfig, "sdtm": SDTMConfig}

# the CSV schema: one row per job; every column is always present (NaN where not measured)
COLUMNS = [
    "key", "model", "family", "resolution", "tokens", "method", "ratio", "params", "steps", "batch_size",
    "guidance_scale", "seed",
    "macs_forward_linear_G", "macs_forward_total_G", "macs_image_linear_T", "macs_image_total_T",
    "macs_self_attn_G", "macs_cross_attn_G", "macs_mlp_G", "macs_merge_G", "macs_other_G", "macs_reduction",
    "pipeline_ms", "pipeline_iqr_ms", "denoiser_ms", "denoiser_iqr_ms",
    "baseline_pipeline_ms", "baseline_denoiser_ms", "speedup_pipeline", "speedup_denoiser",
    "psnr_db", "ssim", "rel_l2_latents", "clip_score", "tokens_per_step",
    "device", "device_name", "dtype", "threads", "repeats", "torch", "diffusers", "python", "rank", "finished_at",
]


@dataclass(frozen=True)
class Job:
    """One benchmark setting. `params` are the method's config fields that differ from its defaults."""

    model: str
    method: str
    params: tuple[tuple[str, Any], ...] = ()

    def config(self, num_steps: int | None = None) -> SDTMConfig | ToMeConfig | None:
        if self.method == "baseline":
            return None
        extra = {"num_inference_steps": num_steps} if num_steps is not None else {}
        return CONFIGS[self.method](**dict(self.params), **extra)

    @property
    def ratio(self) -> float:
        config = self.config()
        return 0.0 if config is None else config.ratio


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
    resume: bool = True
    model_cache: Path | None = None
    clip_model: str | None = None
    extra_call_kwargs: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_jobs(models: list[str], methods: list[str], ratios: list[float] | None,
              overrides: dict[str, dict[str, Any]]) -> list[Job]:
    """Baseline once per model, then every method at every ratio (its default ratio when none are given).

    SDTM's deviation is capped at each swept ratio (ratio - deviation must stay >= 0).
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    jobs = []
    for model in models:
        if "baseline" in methods:
            jobs.append(Job(model, "baseline"))
        for method in methods:
            if method == "baseline":
                continue
            for ratio in ratios or [None]:
                params = dict(overrides.get(method, {}))
                if ratio is not None:
                    params["ratio"] = ratio
                    if method == "sdtm":
                        deviation = params.get("deviation", SDTMConfig.deviation)
                        params["deviation"] = min(deviation, ratio, round(0.999 - ratio, 6))
                job = Job(model, method, tuple(sorted(params.items())))
                job.config()  # validate now, not after an hour of benchmarking
                jobs.append(job)
    return list(dict.fromkeys(jobs))


def job_key(job: Job, settings: Settings, device: str) -> str:
    """Identity of a row for resuming: the job and every setting that changes its numbers."""
    ident = [job.model, job.method, list(job.params), settings.steps, settings.seed, settings.prompt,
             settings.guidance_scale, settings.batch_size, device, settings.dtype, settings.measure_latency,
             settings.measure_fidelity, settings.repeats, settings.clip_model]
    return hashlib.sha1(json.dumps(ident, default=str).encode()).hexdigest()[:16]


def read_rows(out: Path) -> pd.DataFrame:
    """Every row written so far (gathered results and per-process parts), one per key."""
    frames = [pd.read_csv(p) for p in [out / "results.csv", *sorted((out / "parts").glob("rank*.csv"))] if p.exists()]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True).drop_duplicates("key", keep="last")


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row], columns=COLUMNS).to_csv(path, mode="a", header=not path.exists(), index=False)


class ModelSession:
    """One model in one process: its pipeline (loaded on first use), its baseline reference and timings, MACs."""

    def __init__(self, name: str, settings: Settings, device: torch.device) -> None:
        self.name, self.settings, self.device = name, settings, device
        self.preset = PRESETS.get(name)
        self.reference = None
        self._macs: dict[Job, ForwardMacs] = {}

    @functools.cached_property
    def pipe(self):
        s = self.settings
        pipe = load_pipeline(self.name, seed=0, cache_dir=s.model_cache, torch_dtype=s.torch_dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @functools.cached_property
    def clip(self) -> ClipScorer | None:
        """Loaded on first measurement only (never for --macs-only)."""
        return ClipScorer(self.settings.clip_model, self.device) if self.settings.clip_model else None

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, "transformer", None) or self.pipe.unet

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
    def denoiser_batch(self) -> int:
        """Images per call, doubled under classifier-free guidance (the pipelines batch both halves)."""
        guidance = self.settings.guidance_scale
        if guidance is None:
            guidance = call_default(self.pipeline_cls, "guidance_scale")
        return self.settings.batch_size * (2 if guidance > 1 else 1)

    # -- pipeline calls --------------------------------------------------------------------------------------
    def call_kwargs(self) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            "output_type": "np", "generator": torch.Generator("cpu").manual_seed(s.seed), "num_inference_steps": self.steps,
        }
        if s.guidance_scale is not None:
            kwargs["guidance_scale"] = s.guidance_scale
        if self.family == "dit":
            kwargs["class_labels"] = list(range(s.batch_size))
        else:
            kwargs["prompt"] = s.prompt
            kwargs["num_images_per_prompt"] = s.batch_size
        if self.family == "pixart":
            kwargs.update(use_resolution_binning=False, clean_caption=False)
        return {**kwargs, **s.extra_call_kwargs}

    def _apply(self, job: Job) -> None:
        remove_SDTM(self.pipe)
        if job.method == "sdtm":
            apply_SDTM(self.pipe, job.config())
        elif job.method == "tome":
            apply_ToMe(self.pipe, job.config())

    def _run(self, probe: PipelineProbe):
        return probe.call(lambda: self.pipe(**self.call_kwargs()))

    def _record(self, timings: tuple[Timing, Timing], result) -> None:
        timings[0].samples_ms.append(result.pipeline_s * 1e3)
        timings[1].samples_ms.append(result.denoiser_s * 1e3)

    # -- measurements ----------------------------------------------------------------------------------------
    def measure(self, job: Job) -> dict[str, Any]:
        """Latency (interleaved with the baseline), fidelity against the baseline of the same seed, token counts."""
        s = self.settings
        row: dict[str, Any] = {}
        with PipelineProbe(self.pipe) as probe:
            remove_SDTM(self.pipe)
            if self.reference is None:  # the baseline output of this seed, also the first warm-up call
                self.reference = self._run(probe)
                for _ in range(s.warmup - 1):
                    self._run(probe)
            # the baseline is re-timed between the method's calls so that both see the same machine state
            timings, baseline = (Timing(), Timing()), (Timing(), Timing())
            result = None
            for _ in range(s.repeats if s.measure_latency else 1):
                if s.measure_latency and job.method != "baseline":
                    remove_SDTM(self.pipe)
                    self._record(baseline, self._run(probe))
                self._apply(job)
                result = self._run(probe)
                self._record(timings, result)
            state = get_merge_state(self.pipe)
            if state is not None:
                row["tokens_per_step"] = json.dumps(_mean_tokens(state.token_counts))
            remove_SDTM(self.pipe)
        if job.method == "baseline":
            baseline = timings
        if s.measure_latency:
            row.update(
                pipeline_ms=timings[0].median, pipeline_iqr_ms=timings[0].iqr, denoiser_ms=timings[1].median,
                denoiser_iqr_ms=timings[1].iqr, baseline_pipeline_ms=baseline[0].median,
                baseline_denoiser_ms=baseline[1].median, speedup_pipeline=baseline[0].median / timings[0].median,
                speedup_denoiser=baseline[1].median / timings[1].median,
            )
        if s.measure_fidelity:
            row.update(
                psnr_db=psnr(result.images, self.reference.images), ssim=ssim(result.images, self.reference.images),
                rel_l2_latents=rel_l2(result.latents, self.reference.latents),
            )
        if self.clip is not None and self.family != "dit":
            row["clip_score"] = self.clip(result.images, s.prompt)
        return row

    def macs(self, job: Job) -> ForwardMacs:
        """MACs of every denoiser forward of one generation: on the meta device for presets, else captured inputs."""
        if job in self._macs:
            return self._macs[job]
        steps = self.steps
        model, inputs = self._macs_model
        config = job.config(num_steps=steps)
        if config is not None:
            (apply_SDTM if job.method == "sdtm" else apply_ToMe)(model, config)
        try:
            result = count_forward_macs(model, inputs, steps)
        finally:
            remove_SDTM(model)
        self._macs[job] = result
        return result

    @functools.cached_property
    def _macs_model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The model and inputs MACs are counted on, built once: shapes only on meta for presets."""
        if self.preset is not None:
            inputs = denoiser_inputs(self.preset, self.denoiser_batch, "meta", self.settings.torch_dtype)
            return build_denoiser(self.preset, "meta"), inputs
        return self.denoiser, self._captured_inputs()

    def _captured_inputs(self) -> dict[str, Any]:
        """The denoiser's keyword inputs at the first step of a real call (checkpoints without a preset)."""
        captured: dict[str, Any] = {}

        def grab(module, args, kwargs):
            captured.update(kwargs)
            if args:
                captured[find_adapter(module).input_name] = args[0]
            raise _Captured

        handle = self.denoiser.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.pipe(**{**self.call_kwargs(), "num_inference_steps": 1})
        except _Captured:
            pass
        finally:
            handle.remove()
        captured.pop("return_dict", None)
        return captured


class _Captured(Exception):
    """Stops a pipeline call once the denoiser's inputs are captured."""


def _mean_tokens(token_counts: list[dict[str, list[int | None]]]) -> dict[str, list[float]]:
    """Per step, the mean number of tokens entering each role's sub-layers over the blocks."""
    out: dict[str, list[float]] = {}
    for role in ("attn", "mlp"):
        out[role] = [
            round(sum(c for c in step[role] if c is not None) / max(1, sum(c is not None for c in step[role])), 2)
            for step in token_counts
        ]
    return out


def environment(device: torch.device, settings: Settings) -> dict[str, Any]:
    import diffusers

    return dict(
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=settings.dtype, threads=torch.get_num_threads(), repeats=settings.repeats, torch=torch.__version__,
        diffusers=diffusers.__version__, python=platform.python_version(),
    )


def macs_columns(macs: ForwardMacs, baseline: ForwardMacs | None) -> dict[str, Any]:
    n = len(macs.steps)
    per_image = macs.per_image
    labels = per_image.by_label()
    row = {
        "macs_forward_linear_G": macs.mean_per_forward("linear") / 1e9,
        "macs_forward_total_G": macs.mean_per_forward("total") / 1e9,
        "macs_image_linear_T": per_image.linear / 1e12,
        "macs_image_total_T": per_image.total / 1e12,
        **{f"macs_{label}_G": v / n / 1e9 for label, v in labels.items()},
    }
    if baseline is not None:
        row["macs_reduction"] = baseline.per_image.total / per_image.total
    return row


def run_jobs(jobs: list[Job], settings: Settings, macs_only: bool = False) -> pd.DataFrame:
    """Run `jobs` (split across processes under accelerate); returns their rows (resumed ones included)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    # on CPU (no GPU, or --device cpu) accelerate's processes talk over gloo
    state = PartialState(cpu=not torch.cuda.is_available() or (settings.device or "").startswith("cpu"))
    device = torch.device(settings.device) if settings.device else state.device
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = settings.out
    keys = {job: job_key(job, settings, device.type) for job in jobs}
    done = set(read_rows(out)["key"]) if settings.resume else set()
    todo = [j for j in jobs if keys[j] not in done]
    if len(todo) < len(jobs) and state.is_main_process:
        logger.info("resuming: %d of %d jobs already in %s", len(jobs) - len(todo), len(jobs), out)
    part = out / "parts" / f"rank{state.process_index}.csv"
    rows: list[dict] = []
    with state.split_between_processes(todo) as mine:
        sessions: dict[str, ModelSession] = {}
        for job in tqdm(mine, desc=f"benchmark[{state.process_index}]", disable=not mine):
            session = sessions.get(job.model)
            if session is None:
                sessions.clear()  # one pipeline in memory at a time
                session = sessions[job.model] = ModelSession(job.model, settings, device)
            row = _job_row(job, session, settings, device, macs_only)
            row["rank"] = state.process_index
            append_row(part, row)
            rows.append(row)
            logger.info("%s %s %s: %s", job.model, job.method, dict(job.params), _summary(row))
    all_rows = gather_object(rows) if state.num_processes > 1 else rows
    if state.is_main_process:
        table = pd.concat([read_rows(out), pd.DataFrame(all_rows, columns=COLUMNS)], ignore_index=True)
        table = table.drop_duplicates("key", keep="last")
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "results.csv", index=False)
    state.wait_for_everyone()
    table = read_rows(out)
    return table[table["key"].isin(set(keys.values()))].reset_index(drop=True)


def _job_row(job: Job, session: ModelSession, settings: Settings, device: torch.device, macs_only: bool) -> dict:
    preset = session.preset
    config = job.config()
    defaults = {f.name: f.default for f in dataclasses.fields(type(config))} if config is not None else {}
    row: dict[str, Any] = dict(
        key=job_key(job, settings, device.type), model=job.model, family=session.family,
        resolution=preset.resolution if preset else None, tokens=preset.num_tokens if preset else None,
        method=job.method, ratio=job.ratio,
        params=json.dumps({k: v for k, v in dataclasses.asdict(config).items() if v != defaults[k]} if config else {}),
        steps=session.steps, batch_size=settings.batch_size, guidance_scale=settings.guidance_scale,
        seed=settings.seed, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **environment(device, settings),
    )
    row.update(macs_columns(session.macs(job), session.macs(Job(job.model, "baseline"))))
    if not macs_only:
        row.update(session.measure(job))
    return row


def _summary(row: dict) -> str:
    parts = [f"MACs/fwd {row['macs_forward_total_G']:.1f}G"]
    if row.get("speedup_pipeline") is not None:
        parts.append(f"speed-up {row['speedup_pipeline']:.2f}x (denoiser {row['speedup_denoiser']:.2f}x)")
    if row.get("psnr_db") is not None:
        parts.append(f"PSNR {row['psnr_db']:.1f} dB, rel-L2 {row['rel_l2_latents']:.3f}")
    return ", ".join(parts)
