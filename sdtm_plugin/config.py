"""Configuration dataclasses for SDTM and the ToMe baseline, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .rotary import POSITION_RULES

# `switch_step` is given on the paper's 50-step schedule; see `SDTMConfig`.
SWITCH_STEP_REFERENCE_STEPS = 50
DEFAULT_DEVIATION = 0.2  # the paper's SDTM*-a
DEFAULT_TOKEN_BUDGETS = 4  # distinct merged lengths per sub-layer and generation (static shapes for compilers)
DEFAULT_MATCH_DIM = 128  # SDTM's sketched-matching width: equal quality to exact matching, merge path < 2 % of MACs saved
PRIORS = ("linear", "bounded")
IDM_DESTINATIONS = ("stalest", "random", "similar", "guidance")
STRUCTURE_MERGES = ("window", "bipartite")
SELECTIONS = ("change", "random", "similarity")


def _check_int(name: str, value, low: int, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{extra}, got {value!r}")


def _check_float(name: str, value, low: float, high: float, high_inclusive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be a number in [{low}, {high}{bracket}, got {value!r}")


def _check_offload(value: Any, caches: bool, why_not: str) -> None:
    if value is not None:
        _check_bool("cache_offload", value, " or None (decided per call)")
    if value and not caches:
        raise ValueError(f"cache_offload=True would have no effect: {why_not}; leave cache_offload at None")


def _check_bool(name: str, value, also: str = "") -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False{also}, got {value!r}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_frequency(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value >= 1):
        raise ValueError(f"{name} must be -1 (off) or an integer >= 1, got {value!r}")


@dataclass(kw_only=True)
class _PatchConfig:
    """Fields every token-level method has: how much it reduces, its windows on the token grid, randomness and the
    step count of a bare model and its calls per step.

    `sx` is the window width (along the token grid's columns), `sy` its height, as in tomesd; `st` its depth in
    frames on video models (Wan: 1 keeps windows within a frame, 2 makes spatio-temporal ``2 x sy x sx`` windows;
    image models need 1).
    """

    ratio: float = 0.3
    sx: int = 2
    sy: int = 2
    st: int = 1
    seed: int | None = 0
    num_inference_steps: int | None = None
    calls_per_step: int | None = 1
    max_downsample: int = 1

    def __post_init__(self) -> None:
        _check_float("ratio", self.ratio, 0.0, 1.0, high_inclusive=False)
        _check_int("sx", self.sx, 1)
        _check_int("sy", self.sy, 1)
        _check_int("st", self.st, 1)
        if self.window_size < 2:
            raise ValueError(f"st * sy * sx must be >= 2 (a window of one token cannot merge), got st={self.st}, "
                             f"sy={self.sy}, sx={self.sx}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, " or None")
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1, " or None")
        if self.calls_per_step is not None:
            _check_int("calls_per_step", self.calls_per_step, 1, " or None (one step per timestep)")
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(f"max_downsample must be one of 1, 2, 4, 8, got {self.max_downsample!r}")

    @property
    def window(self) -> tuple[int, int, int]:
        """(st, sy, sx): a window's extent along frames, rows and columns."""
        return self.st, self.sy, self.sx

    @property
    def window_size(self) -> int:
        return self.st * self.sy * self.sx


@dataclass(kw_only=True)
class _WindowedMergeConfig(_PatchConfig):
    """Fields shared by the merging methods (SDTM, ToMe): which sub-layers merge and how tokens are matched.

    `match_radius`: a bipartite merge (IDM, ToMe) compares each source only with the destinations of the windows
    within this many windows of its own, (2r + 1)^2 candidates, so its similarity costs O(N C) instead of O(N^2 C);
    None compares with every destination (the paper's and tomesd's global matching). `match_dim`: a bipartite merge
    compares signed count sketches of the tokens with this many channels (`sdtm_plugin.merge.channel_sketch`), so its
    similarity costs dim / C of the exact one; None compares the tokens themselves (ToMe's default; SDTM's is 128).
    `rotary_positions`: on rotary models (FLUX, Wan), the position a merged token is rotated to
    (`sdtm_plugin.rotary`): "mean" (the circular mean of its tokens' angles; chosen on the trained FLUX-architecture
    reference, docs/compatibility.md) or "destination" (its group's first token's).
    `proportional_attention`: a merged self-attention adds the log of each merged key's group size to its logits
    (ToMe's proportional attention), so a group weighs in the softmax as its tokens together would; the attention
    then runs with an additive mask (diffusers' fused dispatch takes it, but not the mask-free flash kernels).
    """

    use_rand: bool = True
    merge_attn: bool = True
    merge_mlp: bool = True
    match_radius: int | None = None
    match_dim: int | None = None
    rotary_positions: str = "mean"
    proportional_attention: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool("use_rand", self.use_rand)
        _check_bool("proportional_attention", self.proportional_attention)
        if self.proportional_attention and not self.merge_attn:
            raise ValueError("proportional_attention weighs merged keys in a merged self-attention, but "
                             "merge_attn=False merges none; set merge_attn=True or proportional_attention=False")
        _check_bool("merge_attn", self.merge_attn)
        _check_bool("merge_mlp", self.merge_mlp)
        if not (self.merge_attn or self.merge_mlp):
            raise ValueError("merge_attn and merge_mlp are both False: nothing would be merged; enable at least one")
        if self.match_radius is not None:
            _check_int("match_radius", self.match_radius, 1, " or None (every destination)")
        if self.match_dim is not None:
            _check_int("match_dim", self.match_dim, 8, " or None (every channel)")
        if self.rotary_positions not in POSITION_RULES:
            raise ValueError(f"rotary_positions must be one of {POSITION_RULES}, got {self.rotary_positions!r}")


@dataclass(kw_only=True)
class SDTMConfig(_WindowedMergeConfig):
    """Structure-then-Detail Token Merging. Defaults are the paper's SDTM*-a setting, with static token budgets and
    sketched matching (`token_budgets`, `match_dim`: measured equal in image quality to the paper's exact ones).

    Args:
        ratio: mean fraction of tokens removed; the schedule moves it from ``ratio + deviation`` at the first step to
            ``ratio - deviation`` at the last, along a cosine (`sdtm_plugin.schedule.cosine_ratio`).
        deviation: half-width of that schedule, in ``[0, ratio]`` with ``ratio + deviation < 1``. Left unset it is
            the paper's 0.2 where that fits, else ``min(ratio, (1 - ratio) / 2)`` (so ``ratio=0`` needs nothing
            else); an explicit value out of range raises.
        switch_step: last step of the structure phase (SSM), given for a 50-step run. For ``S`` steps the structure
            phase is every step ``i`` with ``i * 50 <= switch_step * S``: steps 0..20 of 50, 0..8 of 20, 0..10 of 25.
            The other steps are the detail phase (IDM, MLP only).
        use_rand: break ties between equally stale tokens at random when picking IDM destinations (else the first,
            top-left one). SSM merges a window into its mean, so where that token sits does not change any value.
        sx, sy: window width and height on the token grid (tokens outside the last full window row/column are never
            merged by SSM and are IDM sources).
        a_s: weight of the staleness prior P_fre in the SSM window score ``P_sim + a_s * P_fre``; positive favours
            merging windows that were merged for longer (the reference code's "stability prior"), negative favours
            computing them again.
        a_d: weight of the staleness prior in the IDM source score ``P_ina + a_d * P_fre`` (sign as for `a_s`).
        prior: the form of P_fre from the steps T since a token was last computed on its own: ``"linear"``
            ``T / mean(T)`` (the paper's, unbounded) or ``"bounded"`` ``T / (T + 1)`` (in [0, 1), the scale of a
            cosine similarity).
        idm_destination: each window's IDM destination: ``"stalest"`` (the reference code's: the token longest
            without its own computation, ties at random with `use_rand`), ``"random"``, ``"similar"`` (the token
            most similar to the rest of its window), or ``"guidance"`` (IBTM: the token whose classifier-free
            guidance difference ``|eps_c - eps_u|`` was largest at the previous step, so the tokens guidance moves
            most stay whole; the first step, with no previous output, takes ``"similar"``). ``"guidance"`` needs the
            unconditional and conditional inputs in one batch (diffusers' pipelines with ``guidance_scale > 1``:
            PixArt, SD3, DiT, SD, Wan; not FLUX.1's distilled guidance).
        structure_merge: SSM's merge in the structure phase: ``"window"`` (whole windows into their mean, the
            paper's) or ``"bipartite"`` (ToMe-style matching of single tokens, destinations as in IDM).
        mcw: merge-cache weight: a merged token's output is ``mcw * merged + (1 - mcw) * cached``; 1 turns the cache
            off.
        protect_steps_frequency: every k-th step (0, k, 2k, ...) runs unmerged and refreshes the cache; -1 = off.
        protect_layers_frequency: blocks with ``index % k == 0`` and the last block never merge; -1 = off.
        protect_first_layers, protect_last_layers: that many blocks at the start / end never merge.
        merge_attn: merge the input of self-attention in the structure phase.
        merge_queries: with `merge_attn`, merge the attention's queries too (the paper's); False merges only its keys
            and values: every token keeps its own query and its own attention output (nothing to unmerge or blend
            there), attending to the merged groups (AsymRnR: queries are far more sensitive than keys and values).
        detail_merge_attn: also merge self-attention in the detail phase (the paper merges only the MLP there).
        merge_mlp: merge the input of the MLP in both phases.
        cache_each_step: refresh the cache from every step's unmerged outputs, not only on protected steps.
        cache_offload: where the merge cache lives between forwards: False on the model's device, True in host
            memory (pinned; copied out when stored and back when read, on the current stream), None decides per call:
            host memory when the cache would exceed `sdtm_plugin.state.DEVICE_SHARE` of a GPU's memory (Wan2.1-14B
            at 720p: 57.7 GiB per call), else the device (`MergeState.cache_estimate`; docs/usage.md#memory).
        plan_blocks: consecutive merged blocks (same token grid) that share one merge plan: the first builds it from
            its own input, the next ``plan_blocks - 1`` reuse its choices (which tokens merge where) with group means
            of their own inputs. 1 (the paper's) plans every block; larger values cut the planning cost by that
            factor (fewer kernels on a GPU), at a measured cost in image quality (README, ablation `plan_sharing`).
        token_budgets: at most this many distinct merged token counts per sub-layer in a generation: the schedule's
            per-step counts are grouped into that many budgets, each a multiple of ``lcm(sx * sy - 1, 8)`` tokens
            (whole windows, GEMM-aligned lengths), so a compiled model (``torch.compile``, CUDA graphs) sees a few
            static shapes instead of a new length almost every step. None keeps the paper's exact per-step counts
            (`sdtm_plugin.schedule.removal_schedule`).
        match_dim: IDM's (and bipartite SSM's) matching compares signed count sketches of the tokens with this many
            channels (`sdtm_plugin.merge.channel_sketch`; a model narrower than it matches exactly). 128 by default:
            equal in image quality to exact matching on the trained model's tune and report sets, and it keeps the
            merge path's matmuls under 2 % of the MACs merging saves at 1024 and 2K px (docs/merge_path.md). None
            compares every channel (the paper's matching).
        seed: seed of the random generator, re-seeded at the start of every generation (so a repeated call with
            the same inputs gives the same output); None draws a fresh seed from torch's global RNG.
        num_inference_steps: only needed for a bare transformer used without a pipeline (a pipeline's scheduler
            tells the step count).
        calls_per_step: a bare transformer's forwards per denoising step (2 for guidance run as two forwards); None:
            forwards at the previous forward's timestep belong to its step (one host sync per forward). Either way a
            timestep above the previous forward's begins a new generation (a new loop). Pipelines ignore it (their
            scheduler's steps count).
        max_downsample: U-Nets only (tomesd's option): merge the transformer blocks whose token grid is at most this
            factor below the latent grid (1: the highest resolution only). Diffusion transformers have a single
            resolution, where every block qualifies.
    """

    deviation: float | None = None
    switch_step: int = 20
    a_s: float = 0.05
    a_d: float = 0.05
    prior: str = "linear"
    idm_destination: str = "stalest"
    structure_merge: str = "window"
    detail_merge_attn: bool = False
    mcw: float = 0.1
    protect_steps_frequency: int = 3
    protect_layers_frequency: int = -1
    protect_first_layers: int = 0
    protect_last_layers: int = 0
    cache_each_step: bool = True
    merge_queries: bool = True
    cache_offload: bool | None = None
    plan_blocks: int = 1
    token_budgets: int | None = DEFAULT_TOKEN_BUDGETS
    match_dim: int | None = DEFAULT_MATCH_DIM

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.deviation is not None:  # None stays None: the schedule then follows the ratio (`effective_deviation`)
            _check_float("deviation", self.deviation, 0.0, self.ratio, high_inclusive=True)
            if self.ratio + self.deviation >= 1.0:
                raise ValueError(
                    f"ratio + deviation must be < 1 (the first step's merge ratio), got {self.ratio} + {self.deviation}"
                )
        _check_int("switch_step", self.switch_step, 0)
        _check_float("a_s", self.a_s, -math.inf, math.inf, high_inclusive=False)
        _check_float("a_d", self.a_d, -math.inf, math.inf, high_inclusive=False)
        _check_choice("prior", self.prior, PRIORS)
        _check_choice("idm_destination", self.idm_destination, IDM_DESTINATIONS)
        _check_choice("structure_merge", self.structure_merge, STRUCTURE_MERGES)
        _check_bool("detail_merge_attn", self.detail_merge_attn)
        _check_int("protect_first_layers", self.protect_first_layers, 0)
        _check_int("protect_last_layers", self.protect_last_layers, 0)
        _check_float("mcw", self.mcw, 0.0, 1.0, high_inclusive=True)
        _check_frequency("protect_steps_frequency", self.protect_steps_frequency)
        _check_frequency("protect_layers_frequency", self.protect_layers_frequency)
        _check_bool("cache_each_step", self.cache_each_step)
        _check_bool("merge_queries", self.merge_queries)
        if self.proportional_attention and not self.merge_queries:
            raise ValueError("proportional_attention adds its key bias to attentions whose queries and keys are the "
                             "same merged rows; with merge_queries=False the processor pads a key mask to the query "
                             "count; set merge_queries=True or proportional_attention=False")
        if not self.merge_queries and not self.merge_attn:
            raise ValueError("merge_queries=False merges only the attention's keys and values, but merge_attn=False "
                             "merges no attention; set merge_attn=True or leave merge_queries at True")
        _check_int("plan_blocks", self.plan_blocks, 1)
        if self.token_budgets is not None:
            _check_int("token_budgets", self.token_budgets, 1, " or None (the paper's exact per-step counts)")
        if self.mcw < 1.0 and not self.cache_each_step and self.protect_steps_frequency == -1:
            raise ValueError(
                f"mcw={self.mcw} would have no effect: with cache_each_step=False and protect_steps_frequency=-1 the "
                "cache is never filled; set mcw=1.0, cache_each_step=True or protect_steps_frequency >= 1"
            )
        _check_offload(self.cache_offload, self.uses_cache, "this setting keeps no merge cache (mcw=1.0 or ratio=0)")

    @classmethod
    def fast(cls, **overrides: Any) -> "SDTMConfig":
        """The paper's fast setting made to hold its image: ratio 0.35, no protected steps, no merge cache
        (MACs 1.36x on PixArt). It is not at equal quality to the unmerged model on the project's trained model (KID,
        shape accuracy; figures with intervals in docs/results.md): use it where speed matters more than a measured
        quality loss.

        Without protected steps the merge cache (``mcw < 1``) only ever holds merged outputs, so a merged token's
        output becomes a long moving average of past steps and lags the denoising: that is the collapse of the
        paper's "ratio 0.35, no protection" setting. Without the cache the same merges keep the image.
        """
        return cls(**{"ratio": 0.35, "protect_steps_frequency": -1, "mcw": 1.0, **overrides})

    @classmethod
    def faithful(cls, **overrides: Any) -> "SDTMConfig":
        """The paper defaults' speed, closer to the unmerged output (higher PSNR against it): a negative staleness
        prior (``a_s = a_d = -0.5``) merges the tokens computed most recently and recomputes the stale ones. Its
        image quality against the data is in docs/results.md."""
        return cls(**{"a_s": -0.5, "a_d": -0.5, **overrides})

    @property
    def effective_deviation(self) -> float:
        """The schedule's half-width: `deviation` when given, else the paper's 0.2 where it fits the ratio, else
        ``min(ratio, (1 - ratio) / 2)``. Derived, not stored, so `dataclasses.replace(config, ratio=...)` of a config
        without an explicit deviation follows the new ratio."""
        if self.deviation is not None:
            return self.deviation
        return min(DEFAULT_DEVIATION, self.ratio, (1.0 - self.ratio) / 2)

    @property
    def uses_cache(self) -> bool:
        """Whether merged outputs are blended with cached ones (and so whether the cache must be kept)."""
        return self.ratio > 0 and self.mcw < 1.0


@dataclass(kw_only=True)
class ToMeConfig(_WindowedMergeConfig):
    """ToMe for diffusion (tomesd semantics): bipartite soft matching at a fixed ratio on every step and block.

    One destination per ``sy x sx`` window (random position when `use_rand`, else top-left), the ``ratio * N``
    sources most similar to a destination are averaged into it, outputs are copied back. tomesd's defaults merge
    self-attention only.
    """

    ratio: float = 0.5
    merge_mlp: bool = False


@dataclass(kw_only=True)
class TokenCacheConfig(_PatchConfig):
    """Token caching: on a *cached* step each block recomputes only a share of the image tokens, chosen per image and
    block; the others keep their own sub-layer outputs from when they were last computed (re-modulated by the current
    step's gates, which the block applies after the sub-layer). The recomputed tokens' queries attend to the keys and
    values of *every* token (projected from the current input), so attention keeps its full context. Dense steps
    (every token computed) fill and refresh the cache: the first `warmup_steps` and then every `dense_every`-th.

    The pattern of ToCa, RAS and CAT pruning (docs/merge_path.md#token-caching); nothing is merged.

    Args:
        ratio: share of the image tokens served from the cache on a cached step, in [0, 1); the recomputed share
            ``1 - ratio`` is rounded to whole multiples of 8 tokens (one static length per token grid). 0 computes
            every token (bit-identical to the unpatched model).
        warmup_steps: the first steps run dense (at least 1: a cached step needs a filled cache).
        dense_every: after the warm-up, every k-th step runs dense (steps ``warmup + k - 1``, ``warmup + 2k - 1``,
            ...); -1: none (only the warm-up and the final steps refresh every token).
        final_dense_steps: the last steps run dense: the fine detail of an image forms there (texture, on the trained
            reference), and a cached token's output goes straight into it. Needs the step count (a pipeline's
            scheduler gives it; a bare model must be told `num_inference_steps`).
        selection: which tokens a cached step recomputes: ``"change"`` (the largest relative change of the block's
            input since the token was last computed, measured on a `sketch_dim`-channel sketch), ``"random"`` (a
            uniform draw), ``"similarity"`` (the tokens least similar to their ``sy x sx`` window, as SDTM ranks
            them). Each plus `staleness_weight` times the steps since the token was last computed.
        staleness_weight: the score added per step a token went without being computed, so that none starves.
        cache_attn, cache_cross, cache_mlp: which sub-layers are token-cached: self-attention (its queries; keys and
            values always cover every token), cross-attention to the text (PixArt, Wan) and the MLP. FLUX's
            single-stream blocks are cached as one (attention and MLP side by side, then the output projection).
        sketch_dim: channels of the sketch a token's change is measured on (`sdtm_plugin.merge.channel_sketch`); None:
            every channel.
        extrapolation: a token not computed in a cached step takes its last output plus this weight times the change
            per step of that output between its last two computations, times the steps since (1: a first-order
            Taylor step as TaylorSeer takes for whole steps; 0: its last output unchanged). Non-zero doubles the
            memory the cache holds.
        cache_keys: the self-attention's keys and values of the tokens not computed on a cached step come from the
            cache (their key and value projections when last computed, as RAS and CAT pruning keep them) instead of
            being projected from the current input: the key and value projections then run on the computed rows
            only. Needs `cache_attn`; holds one more full-length tensor per key and value projection and block.
        cache_offload: where the cached outputs live between forwards, as `SDTMConfig.cache_offload` (None: host
            memory when they would exceed `sdtm_plugin.state.DEVICE_SHARE` of a GPU's memory).
        seed: seed of the random draws of ``selection="random"``, re-seeded at every generation.

    Memory: per cached sub-layer and block, one full-length output (two with `extrapolation`) is kept between
    forwards (docs/usage.md gives the figure per model); `sdtm_plugin.get_merge_state(pipe).held_bytes()` counts it.
    """

    ratio: float = 0.7
    warmup_steps: int = 3
    dense_every: int = 3
    final_dense_steps: int = 2
    selection: str = "change"
    staleness_weight: float = 0.05
    cache_attn: bool = True
    cache_cross: bool = True
    cache_mlp: bool = True
    sketch_dim: int | None = 64
    extrapolation: float = 0.5
    cache_keys: bool = False
    cache_offload: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("warmup_steps", self.warmup_steps, 1, " (a cached step needs a filled cache)")
        if isinstance(self.dense_every, bool) or not isinstance(self.dense_every, int) or not (
                self.dense_every == -1 or self.dense_every >= 2):
            raise ValueError(f"dense_every must be -1 (no dense steps after the warm-up) or an integer >= 2 (1 would "
                             f"run every step dense and cache nothing), got {self.dense_every!r}")
        _check_int("final_dense_steps", self.final_dense_steps, 0)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_float("staleness_weight", self.staleness_weight, 0.0, math.inf, high_inclusive=False)
        for name in ("cache_attn", "cache_cross", "cache_mlp", "cache_keys"):
            _check_bool(name, getattr(self, name))
        if self.cache_keys and not self.cache_attn:
            raise ValueError("cache_keys=True needs cache_attn=True: keys and values come from the cache only where the "
                             "self-attention's queries are token-cached")
        if not (self.cache_attn or self.cache_cross or self.cache_mlp):
            raise ValueError("cache_attn, cache_cross and cache_mlp are all False: nothing would be cached; enable at "
                             "least one")
        if self.sketch_dim is not None:
            _check_int("sketch_dim", self.sketch_dim, 8, " or None (every channel)")
        _check_float("extrapolation", self.extrapolation, 0.0, 1.0, high_inclusive=True)
        _check_offload(self.cache_offload, self.ratio > 0, "ratio=0 caches nothing")
