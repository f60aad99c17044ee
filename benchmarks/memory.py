"""What a patch holds between denoiser forwards at full size, counted on the ``meta`` device (shapes only, seconds).

    python -m benchmarks.memory --model flux-dev wan2.1-14b-720p --method sdtm tokencache tokencache:extrapolation=0

One guidance stream is one image of one transformer call (PixArt batches its two guidance halves into one call and
holds twice this; Wan calls once per half and holds this per call). The figure is the most the patch's state
(`MergeState.held_bytes`: output caches, slopes, counters, sketches) held at the start of any forward of a whole
generation, next to the bytes of the denoiser's weights in the same dtype: with every cache on the device
(``cache_offload=False``), and where the default (``cache_offload=None``) puts the caches on a GPU of
``--gpu-memory`` GiB (host memory when the estimate exceeds `DEVICE_SHARE` of it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pandas as pd
import torch

from sdtm_plugin import get_merge_state
from sdtm_plugin.state import DEVICE_SHARE

from .methods import METHODS, method_label, parse_method
from .models import PRESETS, build_denoiser, denoiser_inputs

GIB = 2**30


@dataclass(frozen=True)
class HeldMemory:
    """Bytes of a denoiser's weights and the most its patch held between forwards, per guidance stream: with the
    caches on the device (`held`), and as the default `cache_offload=None` places them on a GPU of `gpu_memory`
    bytes (`device`, `host`)."""

    model: str
    label: str
    weights: int
    held: int
    estimate: int
    gpu_memory: int
    device: int
    host: int

    @property
    def share(self) -> float:
        return self.held / self.weights

    @property
    def offloaded(self) -> bool:
        return self.host > 0


def held_memory(model: str, spec: str, steps: int = 20, dtype: torch.dtype = torch.bfloat16,
                gpu_memory: int = 80 * GIB) -> HeldMemory:
    """Run `steps`-step generations of preset `model` patched with `spec` (a harness method, ``NAME[:K=V,...]``)
    on the meta device, one image per call, and return the most its state held: with the caches on the device, and
    where the default `cache_offload=None` puts them on a GPU with `gpu_memory` bytes (`MergeState.cache_estimate`
    against `DEVICE_SHARE` of it)."""
    if model not in PRESETS:
        raise ValueError(f"model must be one of {sorted(PRESETS)}, got {model!r}")
    name, params = parse_method(spec)
    method = METHODS[name]
    if method.caches or not method.merges:
        raise ValueError(f"{spec!r}: only merging and token caching keep a state the meta device can count")
    preset = PRESETS[model]
    denoiser = build_denoiser(preset, "meta").to(dtype)
    weights = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    inputs = denoiser_inputs(preset, 1, "meta", dtype)

    def generate(offload: bool) -> tuple[int, int, int]:
        method.apply(denoiser, method.make_config({**params, "cache_offload": offload}, steps))
        try:
            state = get_merge_state(denoiser)
            held = host = 0
            with torch.no_grad():
                for _ in range(steps):
                    denoiser(**inputs)
                    held, host = max(held, state.peak_held_bytes), max(host, state.host_bytes())
            return held, host, state.cache_estimate(state.grid, 1)
        finally:
            method.remove(denoiser)

    held, _, estimate = generate(False)
    device, host = held, 0
    if estimate > DEVICE_SHARE * gpu_memory:
        device, host, _ = generate(True)
    return HeldMemory(model, method_label(name, params), weights, held, estimate, gpu_memory, device, host)


def memory_table(models: list[str], specs: list[str], steps: int = 20, gpu_memory: int = 80 * GIB) -> pd.DataFrame:
    rows = [held_memory(model, spec, steps, gpu_memory=gpu_memory) for model in models for spec in specs]
    return pd.DataFrame([{"model": r.model, "setting": r.label, "weights_GiB": r.weights / GIB,
                          "on_device_GiB": r.held / GIB, "on_device_share": r.share, "estimate_GiB": r.estimate / GIB,
                          "offloaded": r.offloaded, "default_device_GiB": r.device / GIB,
                          "default_device_share": r.device / r.weights, "default_host_GiB": r.host / GIB}
                         for r in rows])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # casting a meta model to bf16 warns per model
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["flux-dev", "wan2.1-14b-720p"])
    parser.add_argument("--method", nargs="+", default=["sdtm", "tokencache"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gpu-memory", type=float, default=80.0,
                        help="GiB of the GPU the default placement (cache_offload=None) is worked out for")
    args = parser.parse_args(argv)
    table = memory_table(args.model, args.method, args.steps, int(args.gpu_memory * GIB))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
