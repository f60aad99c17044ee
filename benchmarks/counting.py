"""MACs of the jobs of one benchmark session (`MacRun`): on the meta device for presets (shape-only methods), on a real
call for step caches (their savings depend on values), on captured inputs for checkpoints without a preset."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils.torch_utils import unwrap_module

from sdtm_plugin.adapters import find_adapter

from .macs import ForwardMacs, count_call_macs, count_forward_macs
from .methods import METHODS
from .models import build_denoiser, denoiser_inputs

if TYPE_CHECKING:
    from .runner import Job, ModelSession


class _Captured(Exception):
    """Stops a pipeline call once the denoiser's inputs are captured."""


class MacRun:
    """MACs of a `ModelSession`'s jobs, each counted once.

    Args:
        session: the session whose model and pipelines are counted.
    """

    def __init__(self, session: ModelSession) -> None:
        self.session = session
        self._macs: dict[Job, ForwardMacs] = {}

    def of(self, job: Job) -> ForwardMacs:
        """MACs of every denoiser forward of one generation: on the meta device for presets (shape-only methods),
        on a real call for methods whose savings depend on the values (step caches), else captured inputs."""
        if job in self._macs:
            return self._macs[job]
        session, spec = self.session, METHODS[job.method]
        if spec.caches:
            pipe = session.method_pipe
            spec.apply(pipe, session.resolve(job.config(session.steps)))
            try:
                result = count_call_macs(unwrap_module(getattr(pipe, session.denoiser_attr)),
                                         lambda: pipe(**session.call_kwargs()))
            finally:
                spec.remove(pipe)
        else:
            model, inputs = self.model
            if spec.merges:
                spec.apply(model, job.config(num_steps=session.steps))
            try:
                result = count_forward_macs(model, inputs, session.steps)
            finally:
                spec.remove(model)
        self._macs[job] = result
        return result

    @functools.cached_property
    def model(self) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The model and inputs MACs are counted on, built once: shapes only on meta for presets."""
        session, dtype = self.session, self.session.settings.torch_dtype
        if session.preset is not None:
            inputs = denoiser_inputs(session.preset, session.denoiser_batch, "meta", dtype)
            return build_denoiser(session.preset, "meta").to(dtype), inputs
        return session.denoiser, self._captured_inputs()

    def block_input_bytes(self) -> int | None:
        """Bytes of one block's (B, N, C) input (transformers; U-Net blocks differ per resolution: None)."""
        session, cfg = self.session, self.model[0].config
        if session.family == "sd-unet" or "num_attention_heads" not in cfg:
            return None
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        tokens = session.preset.num_tokens if session.preset else (cfg["sample_size"] // cfg.get("patch_size", 1)) ** 2
        element = torch.empty((), dtype=session.settings.torch_dtype).element_size()
        return session.denoiser_batch * tokens * width * element

    def _captured_inputs(self) -> dict[str, Any]:
        """The denoiser's keyword inputs at the first step of a real call (checkpoints without a preset)."""
        session, captured = self.session, {}
        denoiser = getattr(session.pipe, session.denoiser_attr)  # the compiled wrapper's hooks run eagerly, before it

        def grab(module, args, kwargs):
            captured.update(kwargs)
            if args:
                captured[find_adapter(session.denoiser).input_name] = args[0]
            raise _Captured

        handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            session.pipe(**{**session.call_kwargs(), "num_inference_steps": 1})
        except _Captured:
            pass
        finally:
            handle.remove()
        captured.pop("return_dict", None)
        return captured
