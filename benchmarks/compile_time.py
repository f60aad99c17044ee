"""Compile cost of merging: time to the first generation and of the next one, per compile mode, merged or not.

    python -m benchmarks.compile_time --model tiny-flux --depth 4 --steps 8 --method baseline sdtm tome

Modes: ``eager``; ``whole`` (``torch.compile(transformer, fullgraph=True)``); ``regional``
(``transformer.compile_repeated_blocks(fullgraph=True)``, diffusers' recommendation for FLUX and Wan). Each row is a
fresh process with an empty inductor cache (what a user's first run pays; a later process with the on-disk cache
pays less): ``first_s`` is the first generation (tracing, compiling, running), ``next_s`` the second (compiled
graphs reused), ``graphs`` the graphs compiled. A bare denoising loop over the preset's inputs (random weights):
compile time does not depend on the weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd
import torch
import torch._dynamo

from sdtm_plugin import apply_SDTM, apply_ToMe, remove_SDTM

from .models import PRESETS, build_denoiser, denoiser_inputs

MODES = ("eager", "whole", "regional")
METHODS = {"baseline": None, "sdtm": apply_SDTM, "tome": lambda model, **kw: apply_ToMe(model, ratio=0.5, **kw)}


class _Counting:
    """The inductor backend, counting the graphs it compiles."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        return compile_fx(gm, example_inputs)


def time_row(model_name: str, depth: int, steps: int, mode: str, method: str) -> dict:
    """One (mode, method) row: seconds of the first and the second generation, graphs compiled."""
    preset = PRESETS[model_name]
    single = {"num_single_layers": depth} if preset.family == "flux" else {}
    preset = dataclasses.replace(preset, denoiser={**preset.denoiser, "num_layers": depth, **single})
    torch.manual_seed(0)
    model = build_denoiser(preset).eval()
    inputs = denoiser_inputs(preset)
    torch._dynamo.reset()
    backend = _Counting()
    runner = model
    if mode == "whole":
        runner = torch.compile(model, backend=backend, fullgraph=True)
    elif mode == "regional":
        model.compile_repeated_blocks(backend=backend, fullgraph=True)
    if METHODS[method] is not None:
        METHODS[method](runner, num_inference_steps=steps)

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(steps):
                runner(**inputs, return_dict=False)
        return time.perf_counter() - start

    first, again = generate(), generate()
    if METHODS[method] is not None:
        remove_SDTM(runner)
    torch._dynamo.reset()
    return dict(model=model_name, depth=depth, steps=steps, mode=mode, method=method, first_s=round(first, 2),
                next_s=round(again, 3), graphs=backend.graphs)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-flux", choices=[n for n, p in PRESETS.items()
                                                                  if p.family in ("flux", "wan") and not p.full_size])
    parser.add_argument("--depth", type=int, default=4, help="blocks of each class (default %(default)s)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--method", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the table to this CSV")
    parser.add_argument("--row", nargs=2, metavar=("MODE", "METHOD"), help=argparse.SUPPRESS)  # one row, this process
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.row:
        print(json.dumps(time_row(args.model, args.depth, args.steps, *args.row)))
        return pd.DataFrame()
    rows = []
    common = ["--model", args.model, "--depth", str(args.depth), "--steps", str(args.steps)]
    common += ["--threads", str(args.threads)] if args.threads else []
    for mode in args.mode:
        for method in args.method:
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                       "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
                done = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", *common, "--row", mode, method],
                                      env=env, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
