"""What FLUX and Wan users run beyond the plain text-to-image call (issue 39): pipelines that pass other timestep units,
pipelines that share a scheduler, settings under which nothing can merge."""

import pytest
import torch
from conftest import generate, quiet_pipeline
from test_flux import generate as generate_flux
from test_sdtm_pipeline import expected_counts, per_step, record_counts

from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, apply_token_cache, get_merge_state, remove_SDTM


@pytest.fixture()
def flux_pipe(tiny_pipe_dir):
    return quiet_pipeline("tiny-flux", tiny_pipe_dir)


def test_a_pipeline_without_begin_index_starts_at_the_first_step_whatever_its_timestep_units(flux_pipe, monkeypatch):
    """FluxControlPipeline calls the model with t / 1000 and sets no `begin_index`: the nearest schedule entry of
    0.98 is the last step, and the generation used to end after one forward."""
    apply_SDTM(flux_pipe)
    reference = generate_flux(flux_pipe)
    state = get_merge_state(flux_pipe)
    steps_seen = []
    monkeypatch.setattr(state.clock, "advance", lambda *args, advance=state.clock.advance: (
        advance(*args), steps_seen.append(state.clock.step))[0])
    monkeypatch.setattr(type(flux_pipe.scheduler), "set_begin_index", lambda self, begin_index=0: None)
    assert torch.equal(generate_flux(flux_pipe), reference)
    assert steps_seen == list(range(8))


def test_a_timestep_is_placed_only_on_an_entry_it_equals(tiny_pipe):
    apply_SDTM(tiny_pipe)
    hook = tiny_pipe.transformer._diffusers_hook.get_hook("sdtm_step")
    scheduler = tiny_pipe.scheduler
    scheduler.set_timesteps(10)
    scheduler._begin_index = None
    timesteps = scheduler.timesteps
    assert hook._start_index(timesteps[4:5]) == 4
    assert hook._start_index(timesteps[4:5].to(torch.bfloat16)) == 4  # rounded to the model's dtype
    assert hook._start_index(timesteps[4:5].float() / 1000) == 0  # other units
    per_token = torch.full((1, 6), float(timesteps[2]))
    per_token[:, :2] = 0  # Wan 2.2 TI2V: the conditioning frame's tokens at timestep 0
    assert hook._start_index(per_token) == 2
    assert hook._start_index(timesteps[4:5].float() + 0.5) == 0


def test_a_scheduler_wrapped_again_by_another_patch_passes_through_once_ours_is_removed(tiny_pipe, tiny_pipe_dir):
    """Two patched models on one scheduler (Wan 2.2's two experts): removing the first patch, whose wrapper lies
    under the second's, leaves the first's wrapper calling nothing of its removed state."""
    from diffusers import PixArtAlphaPipeline

    second = quiet_pipeline("tiny", tiny_pipe_dir)
    other = PixArtAlphaPipeline(**{**second.components, "scheduler": tiny_pipe.scheduler})
    other.set_progress_bar_config(disable=True)
    apply_SDTM(tiny_pipe)
    apply_SDTM(other)  # wraps the scheduler's methods over the first patch's wrappers
    removed = get_merge_state(tiny_pipe)
    remove_SDTM(tiny_pipe)
    completed = removed.clock.completed
    seen, handles = record_counts(other)
    generate(other, steps=6)
    for h in handles:
        h.remove()
    assert per_step(seen) == expected_counts(6)
    assert removed.clock.completed == completed  # the removed patch's wrappers passed through
    generate(tiny_pipe, steps=6)  # the unpatched model runs under both wrappers, untouched by the removed patch
    remove_SDTM(other)
    assert "step" not in tiny_pipe.scheduler.__dict__


@pytest.mark.parametrize("fields", [dict(protect_layers_frequency=1), dict(protect_first_layers=4),
                                    dict(protect_first_layers=2, protect_last_layers=2)])
def test_settings_under_which_no_block_merges_are_refused(tiny_pipe, fields):
    with pytest.raises(ValueError, match="|".join(fields)):
        apply_SDTM(tiny_pipe, SDTMConfig(**fields))
    assert get_merge_state(tiny_pipe) is None


def _with_ip_adapter(pipe) -> torch.Tensor:
    """FLUX's IP-Adapter processors on the double-stream blocks; returns image-prompt states (1, 4, C)."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model = pipe.transformer
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    torch.manual_seed(0)
    model.set_attn_processor({
        name: FluxIPAdapterAttnProcessor(dim, dim, num_tokens=(4,), scale=1.0) if name.startswith("transformer_")
        else processor for name, processor in model.attn_processors.items()})
    return torch.randn(1, 4, dim, generator=torch.Generator().manual_seed(1))


def test_flux_ip_adapter_output_is_unmerged_on_the_image_rows(flux_pipe):
    ip = _with_ip_adapter(flux_pipe)
    call = dict(joint_attention_kwargs={"ip_hidden_states": [ip]})
    base = generate_flux(flux_pipe, **call)
    other = generate_flux(flux_pipe, joint_attention_kwargs={"ip_hidden_states": [-ip]})
    assert not torch.equal(base, other)  # the adapter's output reaches the image
    apply_SDTM(flux_pipe, ratio=0.0)
    assert torch.equal(generate_flux(flux_pipe, **call), base)
    for apply in (apply_SDTM, apply_ToMe):
        apply(flux_pipe)
        merged = generate_flux(flux_pipe, **call)
        assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    apply_SDTM(flux_pipe, merge_queries=False)
    assert torch.isfinite(generate_flux(flux_pipe, **call)).all()
    apply_token_cache(flux_pipe)
    with pytest.raises(TypeError, match="IP-Adapter"):
        generate_flux(flux_pipe, **call)


def _bare_loop(transformer, timesteps, calls=1):
    """A user's own loop on the bare tiny PixArt transformer: per timestep `calls` forwards (guidance as separate
    forwards); returns every forward's output."""
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 120, 32, generator=generator)
    kw = dict(encoder_hidden_states=text, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    outs = []
    for t in timesteps:
        for _ in range(calls):
            outs.append(transformer(latents, timestep=torch.tensor([t]), **kw).sample)
            latents = latents - 0.1 * outs[-1][:, :4]
    return outs


@pytest.mark.parametrize("calls_per_step", [2, None])
def test_a_bare_loop_with_two_forwards_per_step_steps_once_per_timestep(tiny_pipe, calls_per_step):
    transformer = tiny_pipe.transformer
    apply_SDTM(transformer, num_inference_steps=6, calls_per_step=calls_per_step)
    _bare_loop(transformer, [999, 833, 666, 500, 333, 166], calls=2)
    records = get_merge_state(transformer).records
    assert [(r.step, r.call) for r in records] == [(s, c) for s in range(6) for c in range(2)]


def test_a_new_bare_loop_starts_a_new_generation_when_the_timestep_goes_back_up(tiny_pipe):
    transformer = tiny_pipe.transformer
    schedule = [999, 833, 666, 500, 333, 166]
    apply_SDTM(transformer, num_inference_steps=6)
    fresh = _bare_loop(transformer, schedule)
    _bare_loop(transformer, schedule[:3])  # a loop stopped early
    assert all(torch.equal(a, b) for a, b in zip(_bare_loop(transformer, schedule), fresh))
    assert [r.step for r in get_merge_state(transformer).records] == list(range(6))


def test_calls_per_step_is_checked():
    with pytest.raises(ValueError, match="calls_per_step"):
        SDTMConfig(calls_per_step=0)
