"""Latency and fidelity measurement of one pipeline call.

`PipelineProbe` instruments a pipeline for the benchmark only (removed on exit): it times every denoiser forward
(CUDA events on GPU, so no host sync per step) and captures the latents the pipeline hands to ``vae.decode``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CallResult:
    """One timed pipeline call."""

    pipeline_s: float
    denoiser_s: float
    latents: torch.Tensor  # (B, C, h, w) as handed to the VAE, fp32 on CPU
    images: np.ndarray  # (B, H, W, 3) in [0, 1]
    peak_memory_bytes: float = float("nan")  # the GPU's peak allocation during the call (NaN on CPU)


def denoiser_attr(pipe: Any) -> str:
    """The pipeline attribute that holds its denoiser (tested against None: a compiled module has no truth value)."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


class PipelineProbe:
    """Times the denoiser's forwards and captures the decoder's input latents during pipeline calls.

    Args:
        pipe: a diffusers pipeline with a `transformer` or `unet` and a `vae`.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.denoiser: nn.Module = getattr(pipe, denoiser_attr(pipe))
        self.device = self.denoiser.device
        self._spans: list[Any] = []
        self._latents: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "PipelineProbe":
        self._handles = [
            self.denoiser.register_forward_pre_hook(lambda m, a: self._mark()),
            self.denoiser.register_forward_hook(lambda m, a, o: self._mark()),
        ]
        vae = self.pipe.vae
        decode = vae.decode

        def capturing_decode(z, *args, **kwargs):
            self._latents = z.detach().float().cpu()
            return decode(z, *args, **kwargs)

        vae.decode = capturing_decode
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.pipe.vae.__dict__.pop("decode", None)

    def _mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._spans.append(event)
        else:
            self._spans.append(time.perf_counter())

    def _denoiser_seconds(self) -> float:
        starts, ends = self._spans[0::2], self._spans[1::2]
        if self.device.type == "cuda":
            return sum(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3
        return sum(e - s for s, e in zip(starts, ends))

    def call(self, run: Callable[[], Any]) -> CallResult:
        """Run `run()` (a pipeline call returning an output with numpy `images`) and measure it."""
        self._spans, self._latents = [], None
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        output = run()
        _sync(self.device)
        pipeline_s = time.perf_counter() - start
        if self._latents is None:
            raise RuntimeError("the pipeline never called vae.decode; pass output_type='np'")
        peak = float(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else float("nan")
        images = output.frames if hasattr(output, "frames") else output.images  # video pipelines return frames
        return CallResult(pipeline_s, self._denoiser_seconds(), self._latents, np.asarray(images, np.float64), peak)


def median_iqr(values: list[float]) -> tuple[float, float]:
    """Median and interquartile range (0 for fewer than two values)."""
    if len(values) < 2:
        return statistics.median(values), 0.0
    q = np.percentile(values, [25, 75])
    return statistics.median(values), float(q[1] - q[0])


@dataclass
class Timing:
    """Median and interquartile range of repeated measurements, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def iqr(self) -> float:
        return median_iqr(self.samples_ms)[1]


def rel_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole tensor."""
    return float((x - reference).norm() / reference.norm().clamp_min(1e-12))


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of (B, H, W, 3) images in [0, 1] (inf when identical)."""
    mse = float(np.mean((images - reference) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def ssim(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity (scikit-image, Gaussian window) over the batch of (B, H, W, 3) images in [0, 1]
    (videos, (B, F, H, W, 3): over their frames)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as err:  # pragma: no cover - bench extra not installed
        raise RuntimeError("SSIM needs scikit-image: pip install 'sdtm-plugin[bench]'") from err
    return float(np.mean([
        structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False)
        for a, b in zip(images.reshape(-1, *images.shape[-3:]), reference.reshape(-1, *reference.shape[-3:]))
    ]))


class ClipScorer:
    """CLIP score (100 x cosine of image and prompt embeddings, floored at 0) with a CLIP checkpoint the user has.

    Needs downloaded weights, so it is opt-in (``--clip-model``) and fails with a clear error when they are missing.
    """

    def __init__(self, name_or_path: str, device: torch.device) -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise RuntimeError(
                f"--clip-model {name_or_path!r} could not be loaded ({type(err).__name__}): the CLIP score needs a CLIP "
                "checkpoint available locally (e.g. a downloaded openai/clip-vit-large-patch14); omit --clip-model to "
                "skip it"
            ) from err
        self.device = device

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompt: str) -> float:
        inputs = self.processor(
            text=[prompt] * len(images), images=list((images * 255).round().astype(np.uint8)), return_tensors="pt",
            padding=True, truncation=True,
        ).to(self.device)
        out = self.model(**inputs)
        cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
        return float(100 * cos.clamp_min(0).mean())
