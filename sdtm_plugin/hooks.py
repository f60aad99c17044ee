"""diffusers `ModelHook`s that drive merging: one on the transformer (step tracking), one per merged sub-layer.

No block forward is copied: a sub-layer hook merges the (B, N, C) input of `attn1` / `ff` in `pre_forward` and
unmerges the output in `post_forward`. The block's per-channel modulation and gate commute with both, so the
block code runs unchanged.

Under `torch.compile` the per-step Python work (the step clock, the plan, the random draws) runs eagerly in
`StepHook.begin`, before the compiled region: `install_compiled_prelude` puts it in front of a compiled model
(`torch.compile(model)` or `model.compile()`), and under regional compilation (`compile_repeated_blocks`) the
transformer's own forward is eager anyway. The sub-layer hooks are traced with the model: they read only values
of a bounded set (phase, budget, flags) and tensors, so `fullgraph=True` holds and a generation compiles one graph
per token budget and phase. U-Nets keep an eager grid hook (their levels' grids are read at run time).
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch._dynamo.eval_frame import OptimizedModule

from .adapters import Adapter, ParallelBlock, RotarySite, SubLayer
from .clock import PipelineWatch
from .merge import TokenMerge
from .rotary import RotaryArg, RowRotary, merged_complex_table
from .state import BlockSlot, MergeState

STEP_HOOK = "sdtm_step"
GRID_HOOK = "sdtm_grid"
MERGE_HOOK = "sdtm_merge"
DENOISERS = ("transformer", "transformer_2", "unet")  # a pipeline's denoisers (Wan 2.2 A14B: two experts)


def image_rows(x: torch.Tensor, num_tokens: int, text_last: bool) -> torch.Tensor:
    """The N image rows of a (B, N + T, C) joint sequence: its prefix when the text comes last, else its suffix."""
    return x[:, :num_tokens] if text_last else x[:, x.shape[1] - num_tokens:]


def merge_image_rows(x: torch.Tensor, merge: Any, text_last: bool) -> torch.Tensor:
    """(B, N + T, C), T >= 0 text rows leading (or trailing, `text_last`) -> (B, N' + T, C): the image rows merged."""
    n = merge.num_tokens
    if x.shape[1] == n:
        return merge.merge(x)
    if text_last:
        return torch.cat([merge.merge(x[:, :n]), x[:, n:]], dim=1)
    return torch.cat([x[:, :x.shape[1] - n], merge.merge(x[:, x.shape[1] - n:])], dim=1)


class StepHook(ModelHook):
    """Transformer-level hook, the model's outermost: tells the state where each forward sits in the generation and
    its token grid.

    Args:
        state: the shared `MergeState`.
        adapter: the model's `Adapter` (its token grid, latent input and the other inputs the grid needs).
        parameters: the names of the model forward's parameters, in order (to find arguments passed positionally).
        others: ``() -> [MergeState]``, the states of the other denoisers patched on the same pipelines (Wan 2.2's
            other expert): their caches are freed when this model takes over, as no later step of theirs reads them.
    """

    _is_stateful = True

    def __init__(self, state: MergeState, adapter: Adapter, parameters: list[str],
                 others: Callable[[], list[MergeState]] = list) -> None:
        super().__init__()
        self.state = state
        self.others = others
        self.adapter = adapter
        self._positions = {name: i for i, name in enumerate(parameters)}
        self.watch = PipelineWatch(state.clock.claim, self._begin, self._stepped, state.end_generation)
        self._scheduler = None  # the scheduler of the running generation
        self._model = None
        self.installed_forward = None  # the model's outermost hooked forward (set by `patch`)
        self._prelude_handles: dict[int, Any] = {}  # id(compiled wrapper) -> its pre-hook handle

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._model = weakref.ref(module)
        return module

    def ensure_wired(self) -> None:
        """Put the patch's hooks back in front of the model's forward if a wrapper outside them reset that forward.

        accelerate's `enable_model_cpu_offload` re-creates its hooks after every pipeline call, restoring the
        forward it had wrapped (the unpatched one when offloading was enabled before patching). A wrapper that calls
        ours (accelerate's `_old_forward`, cache-dit's `_original_forward`) is left in place.
        """
        model = self._model() if self._model is not None else None
        ours = self.installed_forward
        if model is None or ours is None or model.forward is ours or any(
                model.__dict__.get(name) is ours for name in ("_old_forward", "_original_forward")):
            return
        self.fn_ref.forward = model.forward  # ours now calls the new wrapper, which calls the model
        model.forward = ours

    def install_compiled_prelude(self, *wrappers: Any) -> None:
        """Run `begin` eagerly in front of the compiled region of a compiled model, so that the compiled forward holds
        no per-step Python work: a pre-hook on each `torch.compile(model)` wrapper among `wrappers`, and a wrapper of
        the compiled call of an in-place `model.compile()`. Called when applying and whenever a generation begins
        (a model compiled after applying is found then)."""
        model = self._model() if self._model is not None else None
        if model is None:
            return
        for wrapper in wrappers:
            if (isinstance(wrapper, OptimizedModule) and wrapper._orig_mod is model
                    and id(wrapper) not in self._prelude_handles):
                self._prelude_handles[id(wrapper)] = wrapper.register_forward_pre_hook(
                    lambda _, args, kwargs: self.prelude(model, args, kwargs), with_kwargs=True)
        compiled = model.__dict__.get("_compiled_call_impl")
        if compiled is not None and not hasattr(compiled, "sdtm_compiled_call"):
            @functools.wraps(compiled)
            def call(*args, **kwargs):
                self.prelude(model, args, kwargs)
                return compiled(*args, **kwargs)

            call.sdtm_compiled_call = compiled
            model._compiled_call_impl = call

    def remove_compiled_prelude(self) -> None:
        for handle in self._prelude_handles.values():
            handle.remove()
        self._prelude_handles = {}
        model = self._model() if self._model is not None else None
        compiled = model.__dict__.get("_compiled_call_impl") if model is not None else None
        if compiled is not None and hasattr(compiled, "sdtm_compiled_call"):
            model._compiled_call_impl = compiled.sdtm_compiled_call

    def _begin(self, scheduler: Any) -> None:
        """A watched scheduler set its timesteps: a generation begins."""
        self.ensure_wired()
        self.install_compiled_prelude(*(getattr(p, attr, None) for p in self.watch.pipelines for attr in DENOISERS))
        self._scheduler = scheduler
        if self.state.method.observes_output and any(
                getattr(pipe, "do_classifier_free_guidance", True) is False for pipe in self.watch.pipelines):
            raise ValueError("idm_destination='guidance' chooses by the classifier-free guidance difference, and this "
                             "generation runs without classifier-free guidance (guidance_scale <= 1, or a "
                             "guidance-distilled model): use another idm_destination")
        self.state.begin_generation(len(scheduler.timesteps), scheduler.timesteps)

    def _stepped(self) -> None:
        if self.state.clock.scheduler_stepped():  # the schedule's last step: nothing of the call is needed any more
            self.state.end_generation()

    def _start_index(self, timestep: Any) -> int:
        """The schedule position where the generation began, asked at this model's first forward in it: the
        scheduler's `begin_index` (img2img sets it), else the entry of `scheduler.timesteps` that the forward's
        timestep equals (up to its dtype's rounding; one host sync per generation) less the steps already taken
        (Wan 2.2's low-noise expert first runs part-way), else 0: pipelines that pass other units (FLUX Control:
        t / 1000) or per-token timesteps (Wan 2.2 TI2V) start at the first step, never at the nearest value."""
        scheduler = self._scheduler
        begin = getattr(scheduler, "begin_index", None)
        if isinstance(begin, int):
            return begin
        timesteps = getattr(scheduler, "timesteps", None)
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return 0
        timestep = torch.as_tensor(timestep).detach()
        # the largest entry: per-token timesteps (Wan 2.2 TI2V) hold 0 for the conditioning frame's tokens
        t = timestep.flatten().max().cpu().double()  # on the CPU: MPS has no float64
        rounding = torch.finfo(timestep.dtype).eps if timestep.is_floating_point() else 0.0
        distance = (timesteps.detach().cpu().double() - t).abs()
        nearest = int(distance.argmin())
        if float(distance[nearest]) > rounding * max(float(t.abs()), 1.0):
            return 0
        return max(nearest - self.state.clock.completed, 0)

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        """The forward's argument `name`, passed by keyword or position; None if not passed."""
        if name in kwargs:
            return kwargs[name]
        position = self._positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.state.ready:  # `begin` ran already, outside the compiled region of a compiled model
            self.state.ready = False
        else:
            self.begin(module, args, kwargs)
        self.state.open_forward()
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        self.state.observe_output(output)
        self.state.close_forward()
        return output

    @torch.compiler.disable
    def begin(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Everything a forward needs decided before it runs (`MergeState.begin_forward`); never compiled."""
        adapter = self.adapter
        latents = args[0] if len(args) else kwargs[adapter.input_name]
        begun = self.watch.refresh()  # the user swapped pipe.scheduler after applying: this call's timesteps are set
        if begun is not None:
            self._begin(begun)
        clock = self.state.clock
        clock.claim()
        for other in self.others():
            other.release()
        pipelines = self.watch.pipelines
        if pipelines and not clock.active:
            names = ", ".join(type(p).__name__ for p in pipelines)
            raise RuntimeError(
                f"SDTM: the patched {type(module).__name__} was called outside a generation of the pipeline(s) it "
                f"follows ({names}), so its denoising step is unknown. If another pipeline shares this model, apply "
                "the patch to that pipeline too (apply_SDTM(other_pipe): the patch then follows both); to call the "
                "bare model, apply the patch to the model itself with num_inference_steps=..."
            )
        timestep = self._argument(adapter.timestep_name, args, kwargs) if adapter.timestep_name else None
        inputs = {name: self._argument(name, args, kwargs) for name in adapter.grid_inputs}
        batch, device = ((len(latents), latents[0].device) if isinstance(latents, (list, tuple))  # Z-Image: a list
                         else (latents.shape[0], latents.device))
        self.state.begin_forward(adapter.token_grid(module, latents, inputs), batch,
                                 lambda: self._start_index(timestep), timestep, device)

    def prelude(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """`begin` run in front of a compiled model's compiled region; the traced `pre_forward` then skips it."""
        self.begin(model, args, kwargs)
        self.state.ready = True

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # `CacheMixin` pipelines reset stateful hooks after every call: free what the call held, keep the telemetry
        self.state.release()
        return module


class GridHook(ModelHook):
    """On a U-Net's spatial transformer: its (B, C, H, W) input gives the token grid of its blocks."""

    def __init__(self, state: MergeState, layers: list[int]) -> None:
        super().__init__()
        self.state, self.layers = state, layers

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        if hidden_states.dim() == 4:
            self.state.prepare_blocks(self.layers, (hidden_states.shape[-2], hidden_states.shape[-1]),
                                      hidden_states.shape[0], hidden_states.device)
        return args, kwargs


class SubLayerMergeHook(ModelHook):
    """Merges the (B, N, C) input of one attention or feed-forward module and unmerges its output.

    Tuple outputs (SD3's and FLUX's joint attentions return image and text streams) have their first element
    unmerged, and further elements on the image rows (FLUX's IP-Adapter output) too, each token taking its row's.

    A self-attention whose method reduces only one side of it (`MergeMethod.attention_rows`) gets its whole input:
    token caching reduces its query rows (`SideRowsHook` on the query projection; its keys and values cover every
    token), SDTM with ``merge_queries=False`` merges its keys and values (hooks on their projections; every token
    keeps its own query, so the output is whole). On rotary models the queries and keys of a reduced call are rotated
    per row at their norms (`RotarySiteHook`) and the table is withheld from the processor (merges are per image,
    the processor's table is one for the batch).

    Args:
        state: the shared `MergeState`.
        layer: block index.
        sublayer: the adapter's `SubLayer` (cache name and role).
    """

    def __init__(self, state: MergeState, layer: int, sublayer: SubLayer) -> None:
        super().__init__()
        self.state, self.slot = state, state.slots[layer]
        self.name, self.role = sublayer.name, sublayer.role
        self.rotary = sublayer.rotary
        self.joint, self.text_last = sublayer.joint, sublayer.text_last
        self.text_mask = sublayer.text_mask
        self.key_mask = sublayer.key_mask
        self.side = state.method.attention_rows if sublayer.role == "attn" else None
        self.key_bias = (KeyBias(sublayer.module, sublayer.text_last) if sublayer.role == "attn"
                         and getattr(state.config, "proportional_attention", False) else None)
        if self.side is not None and sublayer.text_mask:
            raise TypeError("its attention builds a square mask from the query count, so its queries and keys cannot "
                            "be different rows of its tokens")
        if self.side is not None and sublayer.rotary is not None and sublayer.rotary.per_image:
            raise TypeError("its processor rotates queries and keys with one per-image table, so its queries and keys "
                            "cannot be different rows of its tokens")
        self._merge: TokenMerge | None = None
        self.rows: RowCall | None = None  # the running call's reduced side, when `side` is set

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        from_kwargs = len(args) == 0
        x = kwargs["hidden_states"] if from_kwargs else args[0]
        image = image_rows(x, math.prod(self.slot.grid), self.text_last) if self.joint else x
        merge = self.state.block_merge(self.slot, self.role, image)
        self._merge = merge
        if merge is None:
            return args, kwargs
        if self.role == "attn" and not self.text_mask:
            kwargs = _follow_key_mask(kwargs, merge, self.side, self.key_mask, self.slot)
        if self.side is not None:
            self.rows, args, kwargs = RowCall.begin(merge, self.side, self.rotary, self.state, args, kwargs,
                                                    self.text_last)
            return args, kwargs
        merged = merge_image_rows(x, merge, self.text_last)
        if from_kwargs:
            args, kwargs = args, {**kwargs, "hidden_states": merged}
        else:
            args = (merged, *args[1:])
        if self.key_bias is not None:
            args, kwargs = self.key_bias.apply(args, kwargs, merge, merged, self.joint, self.slot)
        if self.rotary is not None:  # merged queries and keys rotated per image and row at the q/k norms
            self.rows, args, kwargs = RowCall.begin(merge, "both", self.rotary, self.state, args, kwargs,
                                                    self.text_last)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        merge, self._merge, self.rows = self._merge, None, None
        if self.side == "key":  # every query computed: the output is whole
            merge = None
        if isinstance(output, tuple):
            extra = tuple(self._unmerge_extra(merge, y) for y in output[2:])
            return (self.state.finish(self.slot, self.name, self.role, merge, output[0]), output[1], *extra)
        if self.joint:
            return self.state.finish_joint(self.slot, self.name, self.role, merge, output, self.text_last)
        return self.state.finish(self.slot, self.name, self.role, merge, output)

    def _unmerge_extra(self, merge: Any, y: Any) -> Any:
        """A further output on the image rows (FLUX's IP-Adapter attention: (B, N', C)): each token gets its row's."""
        if merge is None or not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[1] != merge.num_rows:
            return y
        if self.side == "query":
            raise TypeError(f"block {self.slot.index}: the attention processor returns a further output on the image rows "
                            "(an IP-Adapter's), which token caching has no cached value for; use apply_SDTM or "
                            "apply_ToMe with IP-Adapters")
        return merge.unmerge(y)


class RowCall:
    """One self-attention call whose rows are not its tokens' own: its query rows a selection (token caching, side
    "query"), its key and value rows merged groups (side "key"), or its whole input merged (side "both", on rotary
    models only: per-image merges need per-row positions); and the per-row rotary tables when the model rotates
    (`rotary.RowRotary`).

    Attributes:
        merge: the selection or merge of the N image tokens (`selection.RowSelection` / `merge.TokenMerge`).
        side: "query", "key" or "both", the side whose rows it reduces.
        rotary: the call's tables, or None (no rotary positions).
    """

    def __init__(self, merge: Any, side: str, rotary: RowRotary | None, text_last: bool = False) -> None:
        self.merge, self.side, self.rotary, self.text_last = merge, side, rotary, text_last

    @classmethod
    def begin(cls, merge: Any, side: str, arg: RotaryArg | None, state: MergeState, args: tuple,
              kwargs: dict, text_last: bool = False) -> tuple["RowCall", tuple, dict]:
        """The call's `RowCall`, and its arguments with the rotary table withheld from the processor."""
        table = arg.find(args, kwargs) if arg is not None else None
        if table is None:
            return cls(merge, side, None, text_last), args, kwargs
        rule = getattr(state.config, "rotary_positions", None)
        if arg.per_image:  # the processor takes one table per image: hand it the merged rows' table
            return cls(merge, side, None, text_last), *arg.replace(args, kwargs, merged_complex_table(table, merge, rule))
        args, kwargs = arg.replace(args, kwargs, None)
        return cls(merge, side, RowRotary(table, arg, merge, side, rule), text_last), args, kwargs

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T + N, C) projection input (T >= 0 text rows, leading, or trailing with `text_last`) ->
        (B, T + N', C): its reduced image rows."""
        return merge_image_rows(x, self.merge, self.text_last)


def _follow_key_mask(kwargs: dict, merge: Any, side: str | None, key_mask: bool, slot: BlockSlot) -> dict:
    """A merged self-attention call's `attention_mask`: none passes; a key mask (B, 1, 1, N + T), or (B, N + T), over
    [image; text] whose image columns are all kept (HunyuanVideo's, Z-Image's, `key_mask`) loses the columns of the
    image rows its keys lose (none when only queries are reduced); any other mask raises."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        return kwargs
    if not key_mask or mask.dim() not in (2, 4) or (mask.dim() == 4 and mask.shape[-2] != 1):
        raise ValueError(
            f"block {slot.index}: self-attention got an attention_mask over the full token sequence, which cannot follow a "
            "token merge; run without a self-attention mask or with merge_attn=False"
        )
    if side == "query":
        return kwargs
    return {**kwargs, "attention_mask": mask[..., merge.num_tokens - merge.num_rows:]}


def _positions(module: torch.nn.Module, *names: str) -> tuple[int | None, ...]:
    """The positional index of each of `names` in `module`'s forward (None where it has no such parameter): read
    from its class, since a hook registered on it before ours installs a ``(*args, **kwargs)`` forward."""
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    return tuple(parameters.index(name) if name in parameters else None for name in names)


class KeyBias:
    """Proportional attention on one self-attention module: its merged call gets, as its additive attention mask,
    (B, 1, 1, T + N'): the log of each merged key's group size on the image columns, 0 on the T text columns of a
    joint attention (its `encoder_hidden_states`' rows, or the text rows of a joint input).

    Args:
        module: the attention module (its forward's parameters locate `attention_mask` passed by position: Wan's
            blocks call ``attn1(x, None, None, rotary)``).
        text_last: the key sequence is [image; text] rather than [text; image].
    """

    def __init__(self, module: torch.nn.Module, text_last: bool = False) -> None:
        self.text_last = text_last
        self.mask_at, self.text_at = _positions(module, "attention_mask", "encoder_hidden_states")

    def apply(self, args: tuple, kwargs: dict, merge: Any, merged: torch.Tensor, joint: bool,
              slot: BlockSlot) -> tuple[tuple, dict]:
        """The call's arguments with the bias as its `attention_mask`; `merged` is its (B, [T +] N', C) input."""
        positional = self.mask_at is not None and self.mask_at < len(args)
        given = args[self.mask_at] if positional else kwargs.get("attention_mask")
        if given is not None:
            raise ValueError(f"block {slot.index}: proportional_attention passes its key bias as the attention's "
                             "mask, but this call has an attention_mask already; run with proportional_attention=False")
        if joint:
            text_rows = merged.shape[1] - merge.num_rows
        else:
            text = (args[self.text_at] if self.text_at is not None and self.text_at < len(args)
                    else kwargs.get("encoder_hidden_states"))
            text_rows = 0 if text is None else text.shape[1]
        bias = merge.key_bias(merged.dtype)
        if text_rows:  # zeros on the text columns, padded in one op (no separate zeros per call)
            bias = torch.nn.functional.pad(bias, (0, text_rows) if self.text_last else (text_rows, 0))
        mask = bias[:, None, None, :]
        if positional:
            return (*args[: self.mask_at], mask, *args[self.mask_at + 1:]), kwargs
        return args, {**kwargs, "attention_mask": mask}


class SideRowsHook(ModelHook):
    """On a self-attention's query projection (side "query") or key or value projection (side "key"): its input
    reduced by the running `RowCall` when the call reduces that side.

    Args:
        owner: ``() -> RowCall | None``, the running call of the attention (None: every row).
        side: the side of this projection.
    """

    def __init__(self, owner: Callable[[], "RowCall | None"], side: str) -> None:
        super().__init__()
        self.owner, self.side = owner, side

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        call = self.owner()
        if call is None or call.side != self.side:
            return args, kwargs
        return _reduced_input(call, args, kwargs)


def _reduced_input(call: "RowCall", args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A projection's arguments with its input (positional or ``input=``) reduced to the call's rows."""
    if args:
        return (call.reduce(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "input": call.reduce(kwargs["input"])}


class KeyCacheHook(ModelHook):
    """On a self-attention's key or value projection under token caching with `TokenCacheConfig.cache_keys`: a
    cached step projects the computed rows only and completes the output (B, T + N, C) from this projection's last
    output of every image token, the computed rows written into it; a dense step keeps its output. The attention
    still sees every key; the rotary and norm sites after the projection run on the whole output as before.

    Args:
        owner: ``() -> RowCall | None``, the running call of the attention (None: every row computed).
        state: the shared `MergeState`.
        layer: block index.
        name: the cache slot of this projection's output.
        text_last: the joint sequence's text rows trail its image rows.
    """

    def __init__(self, owner: Callable[[], "RowCall | None"], state: MergeState, layer: int, name: str,
                 text_last: bool = False) -> None:
        super().__init__()
        self.owner, self.slot, self.name, self.text_last = owner, state.slots[layer], name, text_last
        self._call: RowCall | None = None

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        call = self.owner()
        self._call = call = call if call is not None and call.side == "query" else None
        return (args, kwargs) if call is None else _reduced_input(call, args, kwargs)

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        call, self._call = self._call, None
        slot, buffers = self.slot, self.slot.buffers
        if call is None:  # every row projected: kept for the cached steps (laid out whole, as `finish_joint` keeps)
            if slot.allowed and "attn" in slot.stores:
                image = image_rows(output, math.prod(slot.grid), self.text_last)
                buffers.store_output(self.name, image if image.shape[1] == output.shape[1] else
                                     image.clone(memory_format=torch.contiguous_format))
            return output
        merge = call.merge
        b, a, c = output.shape[0], merge.num_rows, output.shape[-1]
        cache = buffers.cached_output(self.name, torch.Size((b, merge.num_tokens, c)), output.device)
        if cache is None:
            raise RuntimeError(f"block {slot.index} {self.name}: no cached keys to complete a cached step (the block "
                               "did not run at any dense step of this call)")
        computed = image_rows(output, a, self.text_last)
        cache.view(-1, c).index_copy_(0, merge.flat_rows, computed.reshape(-1, c).to(cache.dtype))
        buffers.update_output(self.name, cache)
        if a == output.shape[1]:
            return cache
        text = output[:, a:] if self.text_last else output[:, :output.shape[1] - a]
        return torch.cat([cache, text] if self.text_last else [text, cache], dim=1)


def key_cache_hooks(owner: Callable[[], "RowCall | None"], state: MergeState, layer: int, name: str,
                    keys: tuple[torch.nn.Module, ...], text_last: bool = False
                    ) -> list[tuple[torch.nn.Module, ModelHook]]:
    """`KeyCacheHook`s on a self-attention's key and value projections `keys` (cache slots ``name.k0``, ...) when the
    config caches keys (`TokenCacheConfig.cache_keys`), else none."""
    if not getattr(state.config, "cache_keys", False):
        return []
    if not keys:
        raise TypeError("this attention has no separate key and value projections, so cache_keys cannot project "
                        "them for the computed rows only")
    return [(module, KeyCacheHook(owner, state, layer, f"{name}.k{i}", text_last)) for i, module in enumerate(keys)]


class RotarySiteHook(ModelHook):
    """On a norm whose output the attention would rotate: the running `RowCall`'s per-row rotation applied.

    Args:
        owner: ``() -> RowCall | None``.
        site: the adapter's `RotarySite`.
    """

    def __init__(self, owner: Callable[[], "RowCall | None"], site: RotarySite) -> None:
        super().__init__()
        self.owner, self.side, self.rows = owner, site.side, site.rows

    def post_forward(self, module: torch.nn.Module, output):
        call = self.owner()
        if call is None or call.rotary is None:
            return output
        return call.rotary.rotate(output, self.side, self.rows)


def row_hooks(owner: Callable[[], "RowCall | None"], side: str | None, query: torch.nn.Module | None,
              keys: tuple[torch.nn.Module, ...], sites: tuple[RotarySite, ...]
              ) -> list[tuple[torch.nn.Module, ModelHook]]:
    """The hooks a self-attention needs when its rows are not the tokens' own (`side` "query" / "key": one side
    reduced, "both" or None: its whole input merged): the reduced side's projections' and the rotary sites'."""
    projections = [query] if side == "query" and query is not None else list(keys) if side == "key" else []
    if side in ("query", "key") and not projections:
        raise TypeError(f"this attention has no separate {side} projection, so its queries and keys cannot be "
                        "different rows of its tokens")
    return [*((module, SideRowsHook(owner, side)) for module in projections),
            *((site.module, RotarySiteHook(owner, site)) for site in sites)]


class _CallHook(ModelHook):
    """A hook that hands a module's inputs and output to callbacks (the parts of a `ParallelBlockMerge`)."""

    def __init__(self, pre: Callable | None = None, post: Callable | None = None) -> None:
        super().__init__()
        self._pre, self._post = pre, post

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self._pre(args, kwargs) if self._pre is not None else (args, kwargs)

    def post_forward(self, module: torch.nn.Module, output):
        return self._post(output) if self._post is not None else output


class ParallelBlockMerge:
    """Merging of one `ParallelBlock` (FLUX single-stream): the image suffix of the normalised [text; image]
    sequence is merged at `proj_mlp`'s input and the merged sequence reused at `attn`'s (the same tensor); outputs
    are unmerged where the merged rows end: `proj_out`'s output when both branches merge (cache name "out", kept with
    the attention's outputs), else the merged branch's own output ("attn" / "mlp"). Under a method that reduces one
    side of the attention (`MergeMethod.attention_rows`) the attention gets the whole sequence, as in
    `SubLayerMergeHook`: token caching's attention output has the MLP's rows (unmerged at `proj_out`), SDTM's with
    ``merge_queries=False`` is whole (the MLP is unmerged at its own output).

    Args:
        state: the shared `MergeState`.
        layer: block index.
        block: the adapter's `ParallelBlock`.
    """

    def __init__(self, state: MergeState, layer: int, block: ParallelBlock) -> None:
        self.state, self.slot, self.block = state, state.slots[layer], block
        self.side = state.method.attention_rows
        self.key_bias = (KeyBias(block.attn, block.text_last) if getattr(state.config, "proportional_attention", False)
                         else None)
        self._attn: TokenMerge | None = None
        self._mlp: TokenMerge | None = None
        self._source: torch.Tensor | None = None  # the normalised sequence the block's branches read
        self._merged: torch.Tensor | None = None  # ... with its image suffix merged
        self.rows: RowCall | None = None  # the running attention call's reduced side, when `side` is set

    def hooks(self) -> list[tuple[torch.nn.Module, ModelHook]]:
        block = self.block
        hooks = [(block.proj_mlp, _CallHook(pre=self._mlp_input)), (block.act_mlp, _CallHook(post=self._mlp_output)),
                 (block.attn, _CallHook(pre=self._attn_input, post=self._attn_output)),
                 (block.proj_out, _CallHook(post=self._projected))]
        if self.side is not None or block.sites:
            hooks += row_hooks(lambda: self.rows, self.side, block.query, block.keys, block.sites)
        if self.side == "query":
            hooks += key_cache_hooks(lambda: self.rows, self.state, self.slot.index, "attn", block.keys,
                                     block.text_last)
        return hooks

    def _cached_at_output(self) -> bool:
        """Both branches are kept at `proj_out`'s output only (token caching of the attention and the MLP)."""
        roles = self.state.forward.cache_roles
        return self.side == "query" and "attn" in roles and "mlp" in roles

    def _rows_meet(self) -> bool:
        """Both branches' outputs have the merged rows (so `proj_out` runs on them and unmerges)."""
        return self._mlp is not None and self._attn is not None and self.side != "key"

    def _merge_joint(self, x: torch.Tensor, merge: TokenMerge) -> torch.Tensor:
        """A branch input merged on its image rows: the joint sequence's (text rows kept) or, when the attention reads
        the image rows alone (HunyuanVideo's), all of it."""
        if x is self._source and self._merged is not None:
            return self._merged
        merged = merge_image_rows(x, merge, self.block.text_last)
        self._source, self._merged = x, merged
        return merged

    def _finish(self, name: str, role: str, merge: TokenMerge | None, output: Any) -> Any:
        """A branch or block output unmerged (and kept) on its image rows: a joint tensor's, or the first element of
        an attention's (image, text) pair."""
        if isinstance(output, tuple):
            return (self.state.finish(self.slot, name, role, merge, output[0]), *output[1:])
        return self.state.finish_joint(self.slot, name, role, merge, output, self.block.text_last)

    def _mlp_input(self, args: tuple, kwargs: dict):
        x = args[0] if args else kwargs["input"]
        image = image_rows(x, math.prod(self.slot.grid), self.block.text_last)
        state, slot = self.state, self.slot
        self._mlp = state.block_merge(slot, "mlp", image)
        self._attn = state.block_merge(slot, "attn", image)
        self._source = self._merged = None
        if self._mlp is None:
            return args, kwargs
        merged = self._merge_joint(x, self._mlp)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "input": merged})

    def _mlp_output(self, output: torch.Tensor) -> torch.Tensor:
        if self._rows_meet() or self._cached_at_output():
            return output  # stays merged: proj_out runs on the merged rows
        return self._finish("mlp", "mlp", self._mlp, output)

    def _attn_input(self, args: tuple, kwargs: dict):
        merge = self._attn
        if merge is None:
            return args, kwargs
        kwargs = _follow_key_mask(kwargs, merge, self.side, self.block.key_mask, self.slot)
        if self.side is not None:
            self.rows, args, kwargs = RowCall.begin(merge, self.side, self.block.rotary, self.state, args, kwargs,
                                                    self.block.text_last)
            return args, kwargs
        from_kwargs = "hidden_states" in kwargs
        merged = self._merge_joint(kwargs["hidden_states"] if from_kwargs else args[0], merge)
        if from_kwargs:
            args, kwargs = args, {**kwargs, "hidden_states": merged}
        else:
            args = (merged, *args[1:])
        if self.key_bias is not None:
            args, kwargs = self.key_bias.apply(args, kwargs, merge, merged, True, self.slot)
        if self.block.rotary is not None:
            self.rows, args, kwargs = RowCall.begin(merge, "both", self.block.rotary, self.state, args, kwargs)
        return args, kwargs

    def _attn_output(self, output: Any) -> Any:
        self.rows = None
        if self._rows_meet() or self._cached_at_output():
            return output
        if self._attn is None and not self.state.method.reduces_attention_alone:
            return output  # nothing will read this branch's cache: it is kept at proj_out's output instead
        return self._finish("attn", "attn", None if self.side == "key" else self._attn, output)

    def _projected(self, output: torch.Tensor) -> torch.Tensor:
        merge = self._attn if self._rows_meet() else None
        one_branch = merge is None and (self._attn is not None or self._mlp is not None)
        # nothing of the call outlives it (the last block's merges and rotary tables were kept until the next call)
        self._source = self._merged = self._attn = self._mlp = None
        if one_branch:
            return output  # one branch merged: unmerged at its own output already
        return self._finish("out", "attn", merge, output)
