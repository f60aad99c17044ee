"""`torch.compile` of the harness's denoisers: the ``--compile BACKEND[:MODE][+fullgraph][+regional]`` spec, whole-model
or regional compilation, and the count of compiled graphs (a timed call must compile none)."""

from __future__ import annotations

import torch


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def parse_compile_spec(spec: str) -> tuple[str, str | None, bool, bool]:
    """``BACKEND[:MODE][+fullgraph][+regional]`` -> (backend, mode or None, fullgraph, regional)."""
    spec, *flags = spec.split("+")
    unknown = set(flags) - {"fullgraph", "regional"}
    if unknown:
        raise ValueError(f"--compile: the options after '+' are 'fullgraph' and 'regional', got {sorted(unknown)}")
    backend, _, mode = spec.partition(":")
    return backend, mode or None, "fullgraph" in flags, "regional" in flags


def compile_denoiser(denoiser: torch.nn.Module, spec: str) -> torch.nn.Module:
    """`torch.compile(denoiser, backend=..., mode=..., fullgraph=...)` from ``BACKEND[:MODE][+fullgraph][+regional]``
    (mode: inductor's, e.g. ``inductor:reduce-overhead`` for CUDA graphs; fullgraph: a graph break raises; regional:
    `denoiser.compile_repeated_blocks(...)` in place, diffusers' regional compilation of the repeated block classes).
    Each method and each token budget adds graphs: the recompile limit is raised so that a run of several methods
    stays compiled, and hitting it raises instead of quietly running eagerly."""
    import torch._dynamo

    backend, mode, fullgraph, regional = parse_compile_spec(spec)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    if regional:
        for module in denoiser.modules():  # a deep copy of a compiled denoiser would call the original's blocks
            module.__dict__.pop("_compiled_call_impl", None)
        denoiser.compile_repeated_blocks(backend=backend, mode=mode, fullgraph=fullgraph)
        return denoiser
    return torch.compile(denoiser, backend=backend, mode=mode, fullgraph=fullgraph)
