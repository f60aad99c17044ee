"""The step counter follows the real denoising loop in every pipeline variant; the one-liners keep their promises.

Token counts are observed from the outside (forward hooks on the Linear layers that first see each sub-layer's
tokens, and on the transformer for each call's batch) and compared with the schedule written in the tests.
"""

import warnings

import pytest
import torch
from conftest import generate as generate_pixart
from test_architectures import Recorder, expected_sdtm, merged_modules, pipes  # noqa: F401 (fixture)
from test_sdtm_pipeline import expected_counts, per_step, record_counts

from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM


class CallRecorder(Recorder):
    """`Recorder` that also keeps each transformer call's batch size."""

    def __init__(self, model, modules):
        super().__init__(model, modules)
        self.batches = []
        self.handles.append(model.register_forward_pre_hook(
            lambda m, a, kw: self.batches.append((a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True))


def _sd3_call(pipe, steps=10, **kwargs):
    return pipe("a red cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="latent", guidance_scale=5.0, **kwargs).images


# -- the one-liners -------------------------------------------------------------------------------------------------
def test_ratio_zero_needs_no_deviation_and_is_bit_identical(tiny_pipe):
    base = generate_pixart(tiny_pipe)
    apply_SDTM(tiny_pipe, ratio=0)
    assert get_merge_state(tiny_pipe).config.effective_deviation == 0
    assert torch.equal(generate_pixart(tiny_pipe), base)
    apply_SDTM(tiny_pipe, ratio=0.1)  # below the paper's deviation: the default follows the ratio
    assert get_merge_state(tiny_pipe).config.effective_deviation == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"deviation must be a number in \[0.0, 0.1\]"):
        apply_SDTM(tiny_pipe, ratio=0.1, deviation=0.2)  # an explicit conflicting value is still an error
    assert SDTMConfig().effective_deviation == 0.2  # the paper default is unchanged


def test_tome_on_a_bare_transformer_needs_no_step_count(tiny_pipe):
    transformer = tiny_pipe.transformer
    rec = Recorder(transformer, merged_modules("tiny", transformer))
    apply_ToMe(transformer)
    kw = dict(encoder_hidden_states=torch.randn(2, 120, 32), timestep=torch.tensor([999, 999]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    for _ in range(3):
        transformer(torch.randn(2, 4, 16, 16), **kw)
    rec.remove()
    assert [row[(0, "attn")] for row in rec.steps] == [32, 32, 32]  # 64 tokens, ratio 0.5: merged every time
    remove_SDTM(transformer)


# -- pipeline variants -------------------------------------------------------------------------------------------------
def test_sd3_skip_layer_guidance_merges_both_calls_of_a_step(pipes):
    pipe = pipes("tiny-sd3")
    apply_SDTM(pipe)
    rec = CallRecorder(pipe.transformer, merged_modules("tiny-sd3", pipe.transformer))
    _sd3_call(pipe, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)
    rec.remove()
    expected = expected_sdtm("tiny-sd3", 10)
    # step 0 has one call (CFG batch 2); steps 1..9 a second one (batch 1, block 1 skipped)
    assert rec.batches == [2] + [2, 1] * 9
    calls = iter(zip(rec.batches, rec.steps))
    for i in range(10):
        batch, seen = next(calls)
        assert seen == expected[i], i
        if i:
            batch, seen = next(calls)
            assert batch == 1 and seen == {k: v for k, v in expected[i].items() if k[0] != 1}, i
    assert any(v < 64 for row in rec.steps[1:] for v in row.values())  # merging is on in the extra calls too
    state = get_merge_state(pipe)
    assert [(r.step, r.call) for r in state.records] == [(0, 0)] + [(i, c) for i in range(1, 10) for c in (0, 1)]


def test_sd3_img2img_follows_the_sliced_schedule(pipes):
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image

    base = pipes("tiny-sd3")
    pipe = StableDiffusion3Img2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    apply_SDTM(pipe)
    rec = CallRecorder(pipe.transformer, merged_modules("tiny-sd3", pipe.transformer))
    pipe("a red cat", image=Image.new("RGB", (32, 32), (200, 30, 30)), strength=0.5, num_inference_steps=10,
         generator=torch.Generator().manual_seed(0), output_type="latent", guidance_scale=5.0)
    rec.remove()
    # strength 0.5 of 10 steps runs the last 5: positions 5..9 of the schedule
    assert rec.steps == expected_sdtm("tiny-sd3", 10)[5:]
    assert [r.step for r in get_merge_state(pipe).records] == [5, 6, 7, 8, 9]
    remove_SDTM(pipe)


def test_sd3_custom_sigmas_and_early_stop(pipes):
    pipe = pipes("tiny-sd3")
    apply_SDTM(pipe)
    rec = CallRecorder(pipe.transformer, merged_modules("tiny-sd3", pipe.transformer))
    _sd3_call(pipe, steps=None, sigmas=[1.0, 0.8, 0.6, 0.4, 0.2])
    assert rec.steps == expected_sdtm("tiny-sd3", 5)

    def stop_after_four(p, i, t, tensors):
        if i == 3:
            p._interrupt = True
        return tensors

    rec.steps.clear()
    _sd3_call(pipe, callback_on_step_end=stop_after_four)
    assert rec.steps == expected_sdtm("tiny-sd3", 10)[:4]
    assert len(get_merge_state(pipe).token_counts) == 4
    rec.steps.clear()
    _sd3_call(pipe, steps=6)  # the next call starts afresh
    rec.remove()
    assert rec.steps == expected_sdtm("tiny-sd3", 6)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny"])
def test_telemetry_survives_the_end_of_a_call(pipes, name):
    """The end of a call frees the merge buffers (SD3 and PixArt are not `CacheMixin` models: the patch itself sees
    the loop end); the per-step token counts stay readable and equal what the sub-layers saw."""
    pipe = pipes(name)
    apply_SDTM(pipe)
    rec = CallRecorder(pipe.transformer, merged_modules(name, pipe.transformer))
    if name == "tiny":
        generate_pixart(pipe, steps=6)
    else:
        _sd3_call(pipe, steps=6)
    rec.remove()
    state = get_merge_state(pipe)
    assert state.held_bytes() == 0 and not state.clock.active
    counts = state.token_counts
    assert len(counts) == 6
    assert [counts[i]["mlp"][1] for i in range(6)] == [row[(1, "mlp")] for row in rec.steps]


def test_pixart_custom_timesteps(tiny_pipe):
    apply_SDTM(tiny_pipe)
    seen, handles = record_counts(tiny_pipe)
    tiny_pipe("a cat", timesteps=[999, 800, 600, 400, 200, 50], generator=torch.Generator().manual_seed(0),
              use_resolution_binning=False, output_type="latent", clean_caption=False)
    for h in handles:
        h.remove()
    assert per_step(seen) == expected_counts(6)
    assert get_merge_state(tiny_pipe).num_steps == 6


# -- determinism ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("apply", [
    lambda p: apply_SDTM(p), lambda p: apply_SDTM(p, ratio=0.35, protect_steps_frequency=-1),
    lambda p: apply_ToMe(p, merge_mlp=True),
])
def test_deterministic_algorithms_no_error_no_warning_same_bits(tiny_pipe, apply):
    apply(tiny_pipe)
    torch.use_deterministic_algorithms(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # torch's; diffusers' schedulers raise numpy deprecations
            first = generate_pixart(tiny_pipe, steps=8)
            second = generate_pixart(tiny_pipe, steps=8)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert min(min(c["mlp"]) for c in get_merge_state(tiny_pipe).token_counts) < 64
