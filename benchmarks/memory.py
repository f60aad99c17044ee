"""What a patch holds between denoiser forwards at full size, counted on the ``meta`` device (shapes only, seconds).

    python -m benchmarks.memory --model flux-dev wan2.1-14b-720p --method sdtm tokencache tokencache:extrapolation=0

One guidance stream is one image of one transformer call (PixArt batches its two guidance halves into one call and
holds twice this; Wan calls once per half and holds this per call). The figure is the most the patch's state
(`MergeState.held_bytes`: output caches, slopes, counters, sketches) held at the start of any forward of a whole
generation, next to the bytes of the denoiser's weights in the same dtype.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pandas as pd
import torch

from sdtm_plugin import get_merge_state

from .methods import METHODS, method_label, parse_method
from .models import PRESETS, build_denoiser, denoiser_inputs

GIB = 2**30


@dataclass(frozen=True)
class HeldMemory:
    """Bytes of a denoiser's weights and the most its patch held between forwards, per guidance stream."""

    model: str
    label: str
    weights: int
    held: int

    @property
    def share(self) -> float:
        return self.held / self.weights


def held_memory(model: str, spec: str, steps: int = 20, dtype: torch.dtype = torch.bfloat16) -> HeldMemory:
    """Run one `steps`-step generation of preset `model` patched with `spec` (a harness method, ``NAME[:K=V,...]``)
    on the meta device, one image per call, and return the most its state held."""
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
    method.apply(denoiser, method.make_config(params, steps))
    try:
        state = get_merge_state(denoiser)
        held = 0
        with torch.no_grad():
            for _ in range(steps):
                denoiser(**inputs)
                held = max(held, state.peak_held_bytes)
    finally:
        method.remove(denoiser)
    return HeldMemory(model, method_label(name, params), weights, held)


def memory_table(models: list[str], specs: list[str], steps: int = 20) -> pd.DataFrame:
    rows = [held_memory(model, spec, steps) for model in models for spec in specs]
    return pd.DataFrame([{"model": r.model, "setting": r.label, "weights_GiB": r.weights / GIB,
                          "held_GiB": r.held / GIB, "held_share": r.share} for r in rows])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)  # casting a meta model to bf16 warns per model
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["flux-dev", "wan2.1-14b-720p"])
    parser.add_argument("--method", nargs="+", default=["sdtm", "tokencache"])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    table = memory_table(args.model, args.method, args.steps)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
