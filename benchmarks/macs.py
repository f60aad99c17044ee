"""MACs of denoiser forwards, attention included, attributed to self-attention, cross-attention, MLP and merging.

PyTorch's `FlopCounterMode` has no formula for the CPU SDPA kernel (it counts 0) and attributes a sub-layer's merge
ops to the sub-layer. `MacCounter` is a dispatch mode that uses PyTorch's formulas (`flop_registry`) plus the CPU
SDPA kernel, and labels every op by the innermost labelled module (Attention, FeedForward) or by the merge hooks.
On the ``meta`` device SDPA decomposes into two batched matmuls inside the Attention module, which are counted as
attention; so full-size models are counted in seconds, shape-only, through the real merging code paths (the step
schedule, per-step token counts and protection included).

Two conventions are reported, as the literature mixes them:
- ``linear``: linear and convolution layers only (fvcore's and most papers' convention; seeds/001 quotes 6.01T for
  SD3-medium at 1024^2 with CFG in this convention);
- ``total``: linear + convolution + attention score and value products + merge overhead.
One MAC is one multiply-add (FLOPs = 2 x MACs). Merge overhead counts the merge's matmuls (IDM / ToMe
similarities); SSM's in-window similarity, gathers and scatters are elementwise work and cost no MACs (their time is
in the measured latency).
"""

from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

# seeds/001's MAC table, TMACs of one denoiser forward in the linear convention: SD3-medium at 1024^2 with CFG
PAPER_TMACS = {("sd3-medium", "baseline"): 6.01, ("sd3-medium", "sdtm"): 4.13}

LABELS = ("self_attn", "cross_attn", "mlp", "merge", "other")
_CONV = {torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.convolution_overrideable,
         torch.ops.aten._slow_conv2d_forward, torch.ops.aten.cudnn_convolution}
_LINEAR = {torch.ops.aten.mm, torch.ops.aten.addmm}
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class MacCount:
    """MACs by label ("self_attn", ...) and by op kind ("linear", "conv", "attention")."""

    by_label_kind: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def add(self, label: str, kind: str, macs: int) -> None:
        self.by_label_kind[(label, kind)] += macs

    @property
    def total(self) -> int:
        return sum(self.by_label_kind.values())

    @property
    def linear(self) -> int:
        """The linear + conv convention: merge overhead and attention products excluded."""
        return sum(v for (label, kind), v in self.by_label_kind.items() if label != "merge" and kind in ("linear", "conv"))

    def by_label(self) -> dict[str, int]:
        out = dict.fromkeys(LABELS, 0)
        for (label, _), v in self.by_label_kind.items():
            out[label] += v
        return out

    def __iadd__(self, other: "MacCount") -> "MacCount":
        for key, v in other.by_label_kind.items():
            self.by_label_kind[key] += v
        return self


def _module_label(module: nn.Module) -> str | None:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention

    if isinstance(module, Attention):
        return "cross_attn" if module.is_cross_attention else "self_attn"
    if isinstance(module, FeedForward):
        return "mlp"
    return None


class MacCounter(TorchDispatchMode):
    """Counts MACs of every matmul-like op run under it, labelled by the module stack (see module docstring).

    Use `watch(model)` (module labels) and `count_merges()` (merge-hook label) around the forwards.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = MacCount()
        self._labels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is _CPU_SDPA:
            q, k, v = args[:3]
            macs = sdpa_flop_count(q.shape, k.shape, v.shape) // 2
        elif packet in flop_registry:
            macs = flop_registry[packet](*args, **kwargs, out_val=out) // 2
        else:
            return out
        label = self._labels[-1] if self._labels else "other"
        if packet in _CONV:
            kind = "conv"
        elif packet in _LINEAR:
            kind = "linear"
        else:  # bmm / baddbmm / SDPA kernels: the attention products (or the merge's similarity matmuls)
            kind = "attention"
        self.count.add(label, kind, int(macs))
        return out

    @contextlib.contextmanager
    def label(self, name: str) -> Iterator[None]:
        self._labels.append(name)
        try:
            yield
        finally:
            self._labels.pop()

    @contextlib.contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Label ops by the innermost Attention / FeedForward module of `model` they run in."""
        handles = []

        def leave(module, args, output) -> None:  # a forward hook must return None to keep the output
            self._labels.pop()

        for module in model.modules():
            label = _module_label(module)
            if label is None:
                continue
            handles.append(module.register_forward_pre_hook(lambda m, a, label=label: self._labels.append(label)))
            handles.append(module.register_forward_hook(leave))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def count_merges(self, model: nn.Module) -> Iterator[None]:
        """Label the merge hooks' own work on `model` (plans, merge, unmerge, cache blending) as "merge"."""
        from sdtm_plugin.hooks import MERGE_HOOK

        def labelled(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                with self.label("merge"):
                    return fn(*args, **kwargs)

            return wrapper

        # diffusers' registry calls the hook methods it stored at registration (`hook.fn_ref`)
        refs = []
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.get_hook(MERGE_HOOK) if registry is not None else None
            if hook is not None:
                refs.append((hook.fn_ref, hook.fn_ref.pre_forward, hook.fn_ref.post_forward))
                hook.fn_ref.pre_forward = labelled(hook.fn_ref.pre_forward)
                hook.fn_ref.post_forward = labelled(hook.fn_ref.post_forward)
        try:
            yield
        finally:
            for ref, pre, post in refs:
                ref.pre_forward, ref.post_forward = pre, post


@dataclass
class ForwardMacs:
    """MACs of every forward of one generation (one entry per denoising step)."""

    steps: list[MacCount]
    token_counts: list[dict[str, list[int | None]]] | None = None

    @property
    def per_image(self) -> MacCount:
        total = MacCount()
        for step in self.steps:
            total += step
        return total

    def mean_per_forward(self, convention: str) -> float:
        values = [s.total if convention == "total" else s.linear for s in self.steps]
        return sum(values) / len(values)


def count_forward_macs(model: nn.Module, inputs: dict[str, Any], num_steps: int = 1) -> ForwardMacs:
    """MACs of `num_steps` consecutive forwards of `model` on `inputs` (patched or not).

    A model patched with `apply_SDTM(model, num_inference_steps=num_steps)` walks its whole schedule, so the list
    holds each step's cost. Runs on whatever device `inputs` live on; use ``meta`` for full-size models.
    """
    from sdtm_plugin import get_merge_state

    steps = []
    with torch.no_grad():
        for _ in range(num_steps):
            counter = MacCounter()
            with counter.watch(model), counter.count_merges(model), counter:
                model(**inputs)
            steps.append(counter.count)
    state = get_merge_state(model)
    return ForwardMacs(steps, list(state.token_counts) if state is not None else None)


def fvcore_macs(model: nn.Module, inputs: dict[str, Any]) -> int:
    """fvcore's count of one forward (a cross-check; it traces with `torch.jit`, so real tensors on CPU).

    fvcore counts one "flop" per multiply-add and has no handle for `scaled_dot_product_attention`, which it skips:
    its figure matches our ``linear`` convention, not ``total``.
    """
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as err:  # pragma: no cover - bench extra not installed
        raise RuntimeError("fvcore is not installed: pip install 'sdtm-plugin[bench]'") from err

    names = [n for n, v in inputs.items() if isinstance(v, torch.Tensor)]
    fixed = {n: v for n, v in inputs.items() if n not in names}

    class _Positional(nn.Module):  # jit tracing takes positional tensors only
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args):
            return self.model(**dict(zip(names, args)), **fixed, return_dict=False)[0]

    analysis = FlopCountAnalysis(_Positional(), tuple(inputs[n] for n in names))
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())
