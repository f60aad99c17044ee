"""Host time of merging: what the CPU spends issuing a denoiser forward, the cost a GPU cannot hide when its kernels
are shorter than their launches.

    python -m benchmarks.host --model pixart-xl-2-512 --method tome sdtm "sdtm:ratio=0.35,protect_steps_frequency=-1"

Each preset is measured on its *host twin*: the same denoiser class and depth at width 16 (one head of 16 channels)
on a 16 x 16 token grid, run on the CPU with one thread, where every op takes microseconds, so a forward's wall time
is what the host spends on it (Python, hooks, the dispatcher). A merging method issues the same ops whatever the
weights and token count, so its extra time per block on the twin is its host cost on the real model (on this CPU:
a GPU server's host is usually faster). Baseline and method forwards are interleaved; medians over the repeats.
Step caches are not measured here: what they skip depends on the values. With ``--compile BACKEND`` the twin runs
under ``torch.compile(fullgraph=True)`` (the patch applied to the compiled model, as a user would): what is left is
the per-forward work before the compiled region, the guards and the compiled code's own calls.

With ``--real`` the preset itself is timed instead of its twin (at ``--threads``): the CPU denoiser time at a real
token count, e.g. ``python -m benchmarks.host --real --threads 2 --model qwen-image-cpu --forwards 10 --repeats 2``
(reduced depth and width, the full 4096 + 256 tokens); ``speedup`` is the baseline's time over the method's.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time

import pandas as pd
import torch

from .methods import METHODS, method_label, parse_method
from .models import PRESETS, ModelPreset, build_denoiser, denoiser_inputs

logger = logging.getLogger(__name__)

TWIN_WIDTH = 16
TWIN_GRID = 16  # tokens per side


def host_twin(preset: ModelPreset) -> ModelPreset:
    """The preset at width `TWIN_WIDTH` on a `TWIN_GRID` x `TWIN_GRID` token grid, same family and depth."""
    if preset.family == "sd-unet":
        raise ValueError("model must be a transformer preset (pixart, sd3, dit) for host twins; U-Nets have no single "
                         "width to shrink")
    twin = dict(preset.denoiser, num_attention_heads=1, attention_head_dim=TWIN_WIDTH,
                sample_size=TWIN_GRID * preset.denoiser.get("patch_size", 1))
    if preset.family == "sd3":
        twin.update(caption_projection_dim=TWIN_WIDTH, pos_embed_max_size=max(TWIN_GRID, twin["pos_embed_max_size"]))
    else:
        twin["norm_num_groups"] = TWIN_WIDTH
        if preset.family == "pixart":
            twin["cross_attention_dim"] = TWIN_WIDTH
    return dataclasses.replace(preset, denoiser=twin, full_size=False, weights=None)


def host_time(model: str, methods: list[str], forwards: int = 20, repeats: int = 7,
              compile_backend: str | None = None, real: bool = False, threads: int = 1) -> pd.DataFrame:
    """Per method: host milliseconds per forward of the model's twin (or, `real`, of the preset itself) and the extra
    per block over the baseline, and the baseline's time over the method's (`speedup`).

    Args:
        model: a transformer preset name.
        methods: ``NAME[:KEY=VALUE,...]`` of merging methods (``baseline`` is always measured).
        forwards: forwards per timed run, one generation of that many steps.
        repeats: timed runs per method, interleaved with the baseline's.
        compile_backend: a torch.compile backend to run the twin under (fullgraph), or None for eager.
        real: time the preset at its own width and token count instead of its twin (one image per forward).
        threads: CPU threads for the timed forwards.
    """
    if model not in PRESETS:
        raise ValueError(f"model must be one of the presets {sorted(PRESETS)}, got {model!r}")
    if forwards < 1 or repeats < 1 or threads < 1:
        raise ValueError(f"forwards, repeats and threads must be >= 1, got {forwards}, {repeats} and {threads}")
    settings = [(name, params) for name, params in map(parse_method, methods) if name != "baseline"]
    for name, _ in settings:
        if not METHODS[name].merges or METHODS[name].caches:
            raise ValueError(f"method must be a merging method without a step cache (tome, sdtm), got {name!r}")
    twin = PRESETS[model] if real else host_twin(PRESETS[model])
    if twin.full_size and real:
        raise ValueError(f"model {model!r} is a full-size preset; --real times reduced presets (e.g. qwen-image-cpu)")
    denoiser = build_denoiser(twin, "cpu")
    if compile_backend is not None:
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
        denoiser = torch.compile(denoiser, backend=compile_backend, fullgraph=True)
    inputs = denoiser_inputs(twin, 1 if real else 2)
    depth = twin.denoiser["num_layers"]
    configs = [(name, params, METHODS[name].make_config(params, forwards)) for name, params in settings]

    def generation() -> float:
        with torch.no_grad():
            start = time.perf_counter()
            for _ in range(forwards):
                denoiser(**inputs)
            return time.perf_counter() - start

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generation()  # warm-up
        times: dict[str, list[float]] = {"baseline": []}
        for _ in range(repeats):
            times["baseline"].append(generation())
            for name, params, config in configs:
                METHODS[name].apply(denoiser, config)
                generation()  # the method's first forwards build its tables
                times.setdefault(method_label(name, params), []).append(generation())
                METHODS[name].remove(denoiser)
    finally:
        torch.set_num_threads(previous_threads)
    base = statistics.median(times["baseline"]) / forwards
    rows = []
    for label, samples in times.items():
        per_forward = statistics.median(samples) / forwards
        rows.append(dict(model=model, label=label, compile=compile_backend or "", depth=depth, tokens=twin.num_tokens,
                         host_ms_per_forward=per_forward * 1e3,
                         host_extra_ms_per_block=(per_forward - base) * 1e3 / depth, speedup=base / per_forward))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["pixart-xl-2-512"], help="transformer presets")
    parser.add_argument("--method", nargs="+", default=["tome", "sdtm", "sdtm:ratio=0.35,protect_steps_frequency=-1"])
    parser.add_argument("--forwards", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="run the twins under torch.compile(backend=BACKEND, fullgraph=True), e.g. inductor")
    parser.add_argument("--real", action="store_true", help="time the presets themselves, not their host twins")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the timed forwards")
    parser.add_argument("--csv", help="also write the table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sdtm_plugin").setLevel(logging.WARNING)  # one "applied" line per repeat otherwise
    table = pd.concat([host_time(m, args.method, args.forwards, args.repeats, args.compile, args.real, args.threads)
                       for m in args.model], ignore_index=True)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.csv:
        table.to_csv(args.csv, index=False)
        logger.info("wrote %s", args.csv)


if __name__ == "__main__":
    main()
