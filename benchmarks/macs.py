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
similarities and group sums); SSM's in-window similarity, gathers and scatters are elementwise work and cost no MACs.

The same pass measures the merge path's GPU proxies (`merge_traffic`): while the plugin's own code runs (its step,
grid and merge hooks: plans, merge, unmerge, cache, staleness), every dispatched op that is not a view is counted,
with the bytes of the tensors it outputs. Per merged block, divided by the bytes of the block input (B, N, C), they
say how much memory the merge path writes and how many kernels it launches, on any device, meta included.
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

# seeds/001's MAC table, TMACs of one denoiser forward in the linear convention: SD3-medium at 1024^2 with CFG, by
# (model, job label); the SDTM figure is ratio 0.35 without step protection
PAPER_TMACS = {("sd3-medium", "baseline"): 6.01, ("sd3-medium", "sdtm protect_steps_frequency=-1 ratio=0.35"): 4.13}

LABELS = ("self_attn", "cross_attn", "mlp", "merge", "other")
_CONV = {torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.convolution_overrideable,
         torch.ops.aten._slow_conv2d_forward, torch.ops.aten.cudnn_convolution}
_LINEAR = {torch.ops.aten.mm, torch.ops.aten.addmm}
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class MacCount:
    """MACs by label ("self_attn", ...) and by op kind ("linear", "conv", "attention"); the merge path's op count
    and output bytes (views excluded)."""

    by_label_kind: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    merge_ops: int = 0
    merge_bytes: int = 0

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
        self.merge_ops += other.merge_ops
        self.merge_bytes += other.merge_bytes
        return self


def _module_label(module: nn.Module) -> str | None:
    from diffusers.models.attention import AttentionModuleMixin, FeedForward
    from diffusers.models.attention_processor import Attention

    if isinstance(module, (Attention, AttentionModuleMixin)):  # the mixin: FLUX's and other newer attentions
        return "cross_attn" if getattr(module, "is_cross_attention", False) else "self_attn"
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
        self.enabled = True
        self._labels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.enabled:
            return out
        if self._labels and self._labels[-1] == "merge" and not func.is_view:
            self.count.merge_ops += 1
            self.count.merge_bytes += sum(t.numel() * t.element_size() for t in _tensors(out))
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
        """Label the plugin hooks' own work on `model` (plans, merge, unmerge, cache, staleness) as "merge"."""
        from sdtm_plugin.hooks import GRID_HOOK, MERGE_HOOK, STEP_HOOK

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
            for name in (STEP_HOOK, GRID_HOOK, MERGE_HOOK):
                hook = registry.get_hook(name) if registry is not None else None
                if hook is not None:
                    refs.append((hook.fn_ref, hook.fn_ref.pre_forward, hook.fn_ref.post_forward))
                    hook.fn_ref.pre_forward = labelled(hook.fn_ref.pre_forward)
                    hook.fn_ref.post_forward = labelled(hook.fn_ref.post_forward)
        try:
            yield
        finally:
            for ref, pre, post in refs:
                ref.pre_forward, ref.post_forward = pre, post


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _tensors(item)


@dataclass
class ForwardMacs:
    """MACs of every forward of one generation (one entry per denoising step), with the merge state's records."""

    steps: list[MacCount]
    token_counts: list[dict[str, list[int | None]]] | None = None
    phases: list[str] | None = None
    sublayers_run: list[float] | None = None  # per forward: the share of attention / MLP sub-layers computed
    grid_tokens: list[list[int | None]] | None = None  # per forward and block: the unmerged token count

    @property
    def per_call(self) -> MacCount:
        total = MacCount()
        for step in self.steps:
            total += step
        return total

    def mean_per_forward(self, convention: str) -> float:
        values = [s.total if convention == "total" else s.linear for s in self.steps]
        return sum(values) / len(values)

    def merge_traffic(self, block_input_bytes: int) -> dict[str, dict[str, float]]:
        """Per phase, the merge path's output bytes (in units of the block input's) and ops per merged block.

        A block counts as merged at a step when fewer tokens than the grid enter one of its sub-layers.
        """
        per_phase: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for count, tokens, phase, full in zip(self.steps, self.token_counts or [], self.phases or [],
                                              self.grid_tokens or []):
            merged = sum(any(t is not None and t < n for t in blk) for n, *blk in zip(full, *tokens.values()))
            if merged:
                per_phase[phase].append((count.merge_bytes / (merged * block_input_bytes), count.merge_ops / merged))
        return {
            phase: {"bytes_x": sum(b for b, _ in v) / len(v), "ops": sum(o for _, o in v) / len(v)}
            for phase, v in per_phase.items()
        }


def count_forward_macs(model: nn.Module, inputs: dict[str, Any], num_steps: int = 1) -> ForwardMacs:
    """MACs of `num_steps` consecutive forwards of `model` on `inputs` (patched or not).

    A model patched with `apply_SDTM(model, num_inference_steps=num_steps)` walks its whole schedule, so the list
    holds each step's cost. Runs on whatever device `inputs` live on; use ``meta`` for full-size models.
    """
    from sdtm_plugin import get_merge_state

    steps = []
    state = get_merge_state(model)
    with torch.no_grad():
        for _ in range(num_steps if state is not None else 1):  # an unpatched model costs the same every step
            counter = MacCounter()
            with counter.watch(model), counter.count_merges(model), counter:
                model(**inputs)
            steps.append(counter.count)
    if state is None:
        return ForwardMacs(steps * num_steps)
    records = [r for r in state.records if r.call == 0]
    return ForwardMacs(steps, [r.tokens for r in records], [r.phase for r in records],
                       grid_tokens=[r.grid_tokens for r in records])


def count_call_macs(model: nn.Module, run: Callable[[], Any]) -> ForwardMacs:
    """MACs of every forward of `model` during `run()` (e.g. a pipeline call), on real tensors.

    For methods whose savings depend on the values (step caches skip blocks or sub-layers when outputs change
    little), so they cannot be counted shape-only. Ops outside the model's forwards (text encoder, VAE) are not
    counted. Also records, per forward, the share of the model's attention and MLP sub-layers that ran.
    """
    from sdtm_plugin import get_merge_state
    from sdtm_plugin.adapters import find_adapter

    # a sub-layer ran when its first linear layer did: attention-level caches (PAB, FasterCache, TaylorSeer) return
    # a cached output from the sub-layer's own forward, whose hooks would still fire
    sublayers = [next((m for m in module.modules() if isinstance(m, nn.Linear)), module)
                 for module in find_adapter(model).layout(model).sublayer_modules()]
    counter = MacCounter()
    counter.enabled = False
    steps: list[MacCount] = []
    ran: list[int] = []

    def begin(module, args, kwargs) -> None:
        counter.count, counter.enabled = MacCount(), True
        ran.append(0)

    def end(module, args, kwargs, output) -> None:
        counter.enabled = False
        steps.append(counter.count)

    def count_sublayer(module, args, output) -> None:
        if counter.enabled:
            ran[-1] += 1

    handles = [model.register_forward_pre_hook(begin, with_kwargs=True),
               model.register_forward_hook(end, with_kwargs=True)]
    handles += [m.register_forward_hook(count_sublayer) for m in sublayers]
    try:
        with torch.no_grad(), counter.watch(model), counter.count_merges(model), counter:
            run()
    finally:
        for handle in handles:
            handle.remove()
    state = get_merge_state(model)
    records = [r for r in state.records if r.call == 0] if state is not None else []
    return ForwardMacs(steps, [r.tokens for r in records] or None, [r.phase for r in records] or None,
                       [n / len(sublayers) for n in ran], [r.grid_tokens for r in records] or None)


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
