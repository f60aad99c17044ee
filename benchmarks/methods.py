"""The methods the harness runs, each a named entry: how its parameters are validated, applied and removed.

A job names a method and its parameters, written on the command line as ``NAME[:KEY=VALUE,...]``, e.g.
``sdtm:ratio=0.35,protect_steps_frequency=-1``. Parameters not given keep the method's defaults.

- ``baseline``, ``tome``, ``sdtm``: this project's merging (`ToMeConfig`, `SDTMConfig` fields);
- ``tokencache``: this project's token caching (`TokenCacheConfig` fields);
- ``fbcache``, ``taylorseer``, ``pab``, ``fastercache``, ``magcache``: diffusers' step caches (their config
  fields), driven through `sdtm_plugin.apply_step_cache` (diffusers' own `apply_*` functions plus the cache context
  and timestep callbacks PixArt lacks); MagCache's `mag_ratios` are calibrated on the model by the harness;
- ``sdtm+<cache>``, ``tome+<cache>``, ``tokencache+<cache>``: merging or token caching composed with a step cache in
  one patch; parameters prefixed ``cache.`` go to the cache, e.g. ``sdtm+fbcache:ratio=0.35,cache.threshold=0.1``;
- ``dbcache``: cache-dit's DBCache (`cache_dit.DBCacheConfig` fields), when cache-dit is installed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import (
    FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
)

from sdtm_plugin import (SDTMConfig, TokenCacheConfig, ToMeConfig, apply_SDTM, apply_step_cache, apply_token_cache,
                         apply_ToMe, remove_SDTM)


@dataclass(frozen=True)
class MethodSpec:
    """One method of the harness.

    Attributes:
        name: the CLI name.
        description: one line for ``--help``.
        make_config: ``(params, num_steps) -> config``; raises `ValueError` for bad parameters.
        apply: ``(pipe, config) -> None``, patches the pipeline in place.
        remove: ``(pipe) -> None``, undoes `apply` exactly.
        sweep_param: the parameter ``--ratios`` sweeps (None: the method has no ratio).
        merges: whether the method merges tokens (its rows get token counts and merge-path traffic).
        caches: whether it skips computation from step to step (its MACs depend on the values: counted on a real
            call, not on the meta device).
        runs_last: its jobs run after a model's others: cache-dit's `disable_cache` leaves state behind on FLUX (its
            patch functor's forwards, and more) that diffusers' FirstBlockCache then fails on in the same process.
    """

    name: str
    description: str
    make_config: Callable[[dict[str, Any], int | None], Any]
    apply: Callable[[Any, Any], None]
    remove: Callable[[Any], None]
    sweep_param: str | None = None
    merges: bool = False
    caches: bool = False
    runs_last: bool = False


def _nothing(*_: Any) -> None:
    return None


def _merge_config(cls: type) -> Callable[[dict[str, Any], int | None], Any]:
    def make(params: dict[str, Any], num_steps: int | None) -> Any:
        extra = {"num_inference_steps": num_steps} if num_steps is not None else {}
        return cls(**params, **extra)

    return make


# diffusers' step caches; MagCache's ratios are model-dependent: `calibrate=True` here, calibrated by the harness
CACHES: dict[str, type] = {
    "fbcache": FirstBlockCacheConfig, "taylorseer": TaylorSeerCacheConfig, "pab": PyramidAttentionBroadcastConfig,
    "fastercache": FasterCacheConfig, "magcache": MagCacheConfig,
}


def _cache_config(cls: type, params: dict[str, Any], num_steps: int | None) -> Any:
    """A diffusers cache config from JSON-typed parameters (lists -> tuples, dtype names -> torch dtypes)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields: {sorted(fields)}")
    values = {}
    for key, value in params.items():
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, str) and key.endswith("dtype"):
            value = getattr(torch, value)
        values[key] = value
    if cls is MagCacheConfig:
        values.setdefault("num_inference_steps", num_steps or 20)
        if "mag_ratios" not in values:
            values["calibrate"] = True  # placeholder: the runner (`ModelSession.resolve`) puts the model's ratios in
    return cls(**values)


@dataclass(frozen=True)
class Composed:
    """A merging config and a step-cache config applied as one patch."""

    merge: SDTMConfig | ToMeConfig
    cache: Any


def _composed_config(merge_cls: type, make_cache: Callable[[dict[str, Any], int | None], Any]
                     ) -> Callable[[dict[str, Any], int | None], Any]:
    def make(params: dict[str, Any], num_steps: int | None) -> Composed:
        cache = {k.removeprefix("cache."): v for k, v in params.items() if k.startswith("cache.")}
        merge = {k: v for k, v in params.items() if not k.startswith("cache.")}
        return Composed(_merge_config(merge_cls)(merge, num_steps), make_cache(cache, num_steps))

    return make


def _apply_composed(apply: Callable) -> Callable[[Any, Composed], None]:
    return lambda pipe, config: apply(pipe, config.merge, step_cache=config.cache)


def _dbcache_config(params: dict[str, Any], num_steps: int | None) -> Any:
    try:
        from cache_dit import DBCacheConfig
    except ImportError as err:
        raise ValueError("method dbcache needs cache-dit: pip install cache-dit (an optional extra)") from err
    # cache-dit's default (8 front + 8 back blocks always computed) exceeds small models; F1B0 is its lightest
    # documented setting and fits any depth
    return DBCacheConfig(**{"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, **params})


def _dbcache_apply(pipe: Any, config: Any) -> None:
    import cache_dit

    cache_dit.enable_cache(pipe, cache_config=config)


def _dbcache_remove(pipe: Any) -> None:
    import cache_dit

    cache_dit.disable_cache(pipe)


def _with_dbcache(apply: Callable) -> Callable[[Any, Composed], None]:
    """cache-dit's DBCache applied first, then merging (or token caching) around it: the patch's step hook is the
    denoiser's outermost (it sees every call), cache-dit's forward runs the blocks, whose sub-layer hooks merge. In
    the other order cache-dit cannot restore the denoiser's forward (it rebinds a function, and a hooked forward is
    none)."""
    def apply_both(pipe: Any, config: Composed) -> None:
        _dbcache_apply(pipe, config.cache)
        apply(pipe, config.merge)

    return apply_both


def _remove_patch_then_dbcache(pipe: Any) -> None:
    remove_SDTM(pipe)
    _dbcache_remove(pipe)


def _specs() -> list[MethodSpec]:
    specs = [
        MethodSpec("baseline", "the unpatched pipeline", lambda params, steps: None, _nothing, _nothing),
        MethodSpec("tome", "ToMe baseline (tomesd semantics), `ToMeConfig` fields", _merge_config(ToMeConfig),
                   apply_ToMe, remove_SDTM, sweep_param="ratio", merges=True),
        MethodSpec("sdtm", "SDTM (paper defaults = SDTM*-a), `SDTMConfig` fields", _merge_config(SDTMConfig),
                   apply_SDTM, remove_SDTM, sweep_param="ratio", merges=True),
        MethodSpec("tokencache", "token caching, `TokenCacheConfig` fields", _merge_config(TokenCacheConfig),
                   apply_token_cache, remove_SDTM, sweep_param="ratio", merges=True),
    ]
    mergers = (("sdtm", SDTMConfig, apply_SDTM), ("tome", ToMeConfig, apply_ToMe),
               ("tokencache", TokenCacheConfig, apply_token_cache))
    for name, cls in CACHES.items():
        specs.append(MethodSpec(name, f"diffusers {cls.__name__} fields",
                                lambda params, steps, cls=cls: _cache_config(cls, params, steps),
                                apply_step_cache, remove_SDTM, caches=True))
        for merge, merge_cls, apply in mergers:
            specs.append(MethodSpec(f"{merge}+{name}", f"{merge} composed with {name} (cache.* fields)",
                                    _composed_config(merge_cls, lambda p, s, cls=cls: _cache_config(cls, p, s)),
                                    _apply_composed(apply), remove_SDTM, sweep_param="ratio", merges=True, caches=True))
    specs.append(MethodSpec("dbcache", "cache-dit DBCacheConfig fields (optional: pip install cache-dit)",
                            _dbcache_config, _dbcache_apply, _dbcache_remove, caches=True, runs_last=True))
    for merge, merge_cls, apply in mergers:
        specs.append(MethodSpec(f"{merge}+dbcache", f"{merge} composed with cache-dit's DBCache (cache.* fields)",
                                _composed_config(merge_cls, _dbcache_config), _with_dbcache(apply),
                                _remove_patch_then_dbcache, sweep_param="ratio", merges=True, caches=True,
                                runs_last=True))
    return specs


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _specs()}


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> (name, params); values are JSON (numbers, true/false, null) or strings."""
    name, _, rest = text.partition(":")
    if name not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r} (from {text!r})")
    params: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method parameters must be KEY=VALUE, got {item!r} in {text!r}")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return name, params


def method_label(name: str, params: dict[str, Any]) -> str:
    """A short human-readable name of a setting, e.g. ``sdtm ratio=0.35 protect_steps_frequency=-1``."""
    return " ".join([name, *(f"{k}={v}" for k, v in sorted(params.items()))])


def config_spec(name: str, config: Any) -> str:
    """The ``NAME[:KEY=VALUE,...]`` spec of a merging config: the fields that differ from the class defaults (so a
    preset such as `SDTMConfig.fast()` is written as the harness parses it)."""
    default = type(config)()
    changed = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(default, f.name)}
    return ":".join([name, ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(changed.items()))]).rstrip(":")
