"""Wan video (issue 27): merging through diffusers' own WanPipeline, its two guidance calls per step, the frames of a
video stacked into one token grid, plans per image (a video never depends on its batch mates), and merged rows
rotated by the 3-D positions of their tokens."""

import copy

import pytest
import torch
from conftest import quiet_pipeline
from diffusers.hooks import FirstBlockCacheConfig

from benchmarks.models import PRESETS, wan_call_size
from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.schedule import removal_schedule

TOKENS = 3 * 8 * 8  # the tiny preset: 3 latent frames of 8 x 8 tokens


@pytest.fixture()
def wan_pipe(tiny_pipe_dir):
    return quiet_pipeline("tiny-wan", tiny_pipe_dir)


def generate(pipe, prompt="a red cat on a boat", steps=6, **kwargs):
    return pipe(prompt, **wan_call_size(PRESETS["tiny-wan"]), num_inference_steps=steps, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs).frames


def test_ratio_zero_is_bit_identical_and_removal_is_exact(wan_pipe):
    base = generate(wan_pipe)
    assert base.shape[2] == 3
    apply_SDTM(wan_pipe, ratio=0.0)
    assert torch.equal(generate(wan_pipe), base)
    apply_SDTM(wan_pipe)
    assert not torch.equal(generate(wan_pipe), base)
    remove_SDTM(wan_pipe)
    assert torch.equal(generate(wan_pipe), base)
    assert all("forward" not in m.__dict__ for m in wan_pipe.transformer.modules())


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_token_counts_per_call_seen_at_the_projections(wan_pipe, guidance):
    """Two transformer calls per step under classifier-free guidance (one without): each merged call's self-attention
    and feed-forward get the state's merged rows, the cross-attention's queries stay at every token."""
    rows: list[dict[str, list[int]]] = []
    transformer = wan_pipe.transformer
    transformer.register_forward_pre_hook(lambda *_: rows.append({}))
    for name, modules in {"self q": [b.attn1.to_q for b in transformer.blocks],
                          "cross q": [b.attn2.to_q for b in transformer.blocks],
                          "ffn": [b.ffn.net[0].proj for b in transformer.blocks]}.items():
        for module in modules:
            module.register_forward_pre_hook(lambda _, args, name=name: rows[-1].setdefault(name, [])
                                             .append(args[0].shape[1]))
    apply_ToMe(wan_pipe, ratio=0.5, merge_mlp=True)
    generate(wan_pipe, guidance_scale=guidance)
    records = get_merge_state(wan_pipe).records
    calls = 2 if guidance > 1 else 1
    assert len(rows) == len(records) == 6 * calls
    assert [r.call for r in records] == list(range(calls)) * 6
    for seen, record in zip(rows, records):
        assert seen["self q"] == record.tokens["attn"] == [TOKENS // 2] * 2
        assert seen["ffn"] == record.tokens["mlp"] == [TOKENS // 2] * 2
        assert seen["cross q"] == [TOKENS] * 2


def test_a_video_never_depends_on_its_batch_mates(wan_pipe):
    apply_SDTM(wan_pipe)
    noise = torch.randn(2, 16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    one = generate(wan_pipe, prompt=["a red cat", "a blue boat"], latents=noise)
    other = generate(wan_pipe, prompt=["a red cat", "a green tree"], latents=noise)
    torch.testing.assert_close(one[0], other[0], rtol=0, atol=1e-5)  # float batching noise only
    assert not torch.equal(one[1], other[1])
    assert min(n for step in get_merge_state(wan_pipe).token_counts for n in step["attn"]) < TOKENS


def test_composes_with_a_step_cache_in_one_call_and_is_removed_exactly(wan_pipe):
    base = generate(wan_pipe)
    apply_SDTM(wan_pipe, step_cache=FirstBlockCacheConfig(threshold=0.2))
    out = generate(wan_pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    remove_SDTM(wan_pipe)
    assert torch.equal(generate(wan_pipe), base)


@pytest.fixture()
def wan22_pipe(wan_pipe):
    """Wan 2.2 A14B's layout on the tiny preset: a second expert (other weights) for the steps below the boundary."""
    expert = copy.deepcopy(wan_pipe.transformer)
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    wan_pipe.register_modules(transformer_2=expert)
    wan_pipe.register_to_config(boundary_ratio=0.9)
    return wan_pipe


def expert_steps(pipe, steps=6):
    """Which schedule positions Wan 2.2's pipeline gives the high-noise expert (timestep >= boundary)."""
    pipe.scheduler.set_timesteps(steps)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    return [i for i, t in enumerate(pipe.scheduler.timesteps) if t >= boundary]


def test_both_experts_of_wan22_are_merged_on_one_clock_and_removed_exactly(wan22_pipe):
    """Each expert gets its own merge state, both read the step off the pipeline's one scheduler: the low-noise
    expert's first forward is the step after the high-noise expert's last (two guidance calls per step, each expert
    its own guidance scale). Ratio 0 is bit-identical, removal exact on both."""
    high = expert_steps(wan22_pipe)
    assert 0 < len(high) < 6
    base = generate(wan22_pipe, guidance_scale=5.0, guidance_scale_2=3.0)
    apply_SDTM(wan22_pipe, ratio=0.0)
    assert torch.equal(generate(wan22_pipe, guidance_scale=5.0, guidance_scale_2=3.0), base)
    apply_ToMe(wan22_pipe, ratio=0.5, merge_mlp=True)
    out = generate(wan22_pipe, guidance_scale=5.0, guidance_scale_2=3.0)
    assert not torch.equal(out, base)
    first, second = get_merge_state(wan22_pipe), get_merge_state(wan22_pipe, denoiser="transformer_2")
    assert first is not second
    assert [(r.step, r.call) for r in first.records] == [(s, c) for s in high for c in (0, 1)]
    assert [(r.step, r.call) for r in second.records] == [(s, c) for s in range(len(high), 6) for c in (0, 1)]
    assert all(r.tokens["attn"] == [TOKENS // 2] * 2 for r in [*first.records, *second.records])
    remove_SDTM(wan22_pipe)
    assert torch.equal(generate(wan22_pipe, guidance_scale=5.0, guidance_scale_2=3.0), base)
    for expert in (wan22_pipe.transformer, wan22_pipe.transformer_2):
        assert all("forward" not in m.__dict__ for m in expert.modules())


def test_each_expert_takes_its_own_settings_and_frees_its_caches_when_the_other_takes_over(wan22_pipe):
    """`denoiser=` patches one expert: token caching on the high-noise expert, SDTM on the low-noise one. Once the
    low-noise expert runs, the high-noise expert's caches (read by no later step) are freed."""
    from sdtm_plugin import apply_token_cache

    apply_token_cache(wan22_pipe, denoiser="transformer", warmup_steps=1, dense_every=-1)
    apply_SDTM(wan22_pipe, denoiser="transformer_2", protect_steps_frequency=-1)
    held = {"transformer": [], "transformer_2": []}  # the high-noise expert's bytes after each forward of either
    for name in held:
        getattr(wan22_pipe, name).register_forward_hook(
            lambda *_, name=name: held[name].append(get_merge_state(wan22_pipe).held_bytes()))
    generate(wan22_pipe)
    first, second = get_merge_state(wan22_pipe), get_merge_state(wan22_pipe, denoiser="transformer_2")
    assert type(first.config).__name__ == "TokenCacheConfig" and type(second.config).__name__ == "SDTMConfig"
    assert any(r.phase == "cached" for r in first.records)
    assert any(r.tokens["attn"][0] < TOKENS for r in second.records)
    assert min(held["transformer"]) > 0
    assert held["transformer_2"] == [0] * (2 * (6 - len(expert_steps(wan22_pipe))))
    remove_SDTM(wan22_pipe, denoiser="transformer")
    assert get_merge_state(wan22_pipe) is None and get_merge_state(wan22_pipe, denoiser="transformer_2") is second


def test_step_caches_compose_per_expert(wan22_pipe):
    base = generate(wan22_pipe)
    apply_SDTM(wan22_pipe, step_cache=FirstBlockCacheConfig(threshold=0.2))
    out = generate(wan22_pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    for denoiser in ("transformer", "transformer_2"):
        assert get_merge_state(wan22_pipe, denoiser=denoiser).records
    remove_SDTM(wan22_pipe)
    assert torch.equal(generate(wan22_pipe), base)


def test_wan22_image_to_video_merges_both_experts(wan_pipe):
    """Wan 2.2 I2V A14B: WanImageToVideoPipeline with two experts and no image encoder (the image's latents and mask
    are extra channels of the token grid). Both experts merge on one clock; removal is exact."""
    import numpy as np
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image

    from benchmarks.models import wan_temporal_stages

    preset = PRESETS["tiny-wan"]
    channels = 2 * 16 + 2 ** sum(wan_temporal_stages(preset))  # noise, image latents, the first-frame mask

    def expert(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**{**preset.denoiser, "in_channels": channels}).eval()

    parts = wan_pipe.components
    pipe = WanImageToVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                                   scheduler=parts["scheduler"], transformer=expert(0), transformer_2=expert(1),
                                   boundary_ratio=0.9)
    pipe.set_progress_bar_config(disable=True)
    size = wan_call_size(preset)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size["height"], size["width"], 3), np.uint8))
    embeds = torch.randn(1, 16, preset.denoiser["text_dim"], generator=torch.Generator().manual_seed(3))

    def generate_i2v():  # prompt embeddings given: the I2V prompt cleaner needs ftfy
        return pipe(image=image, prompt_embeds=embeds, negative_prompt_embeds=-embeds, **size, num_inference_steps=6,
                    generator=torch.Generator().manual_seed(0), output_type="latent").frames

    high = expert_steps(pipe)  # (sets the scheduler's timesteps: before the patch watches it)
    base = generate_i2v()
    apply_SDTM(pipe, protect_steps_frequency=-1)
    out = generate_i2v()
    first, second = get_merge_state(pipe), get_merge_state(pipe, denoiser="transformer_2")
    assert [r.step for r in first.records] == [s for s in high for _ in (0, 1)]
    assert [r.step for r in second.records] == [s for s in range(len(high), 6) for _ in (0, 1)]
    assert not torch.equal(out, base)
    remove_SDTM(pipe)
    assert torch.equal(generate_i2v(), base)


def test_mag_cache_calibration_refuses_two_experts(wan22_pipe):
    from sdtm_plugin import calibrate_mag_cache

    with pytest.raises(ValueError, match="runs 2 denoisers"):
        calibrate_mag_cache(wan22_pipe, 4, prompt="a cat")


def test_bad_denoiser_names_are_refused(wan22_pipe):
    with pytest.raises(ValueError, match=r"denoiser must be one of \['transformer', 'transformer_2'\]"):
        apply_SDTM(wan22_pipe, denoiser="unet")
    with pytest.raises(ValueError, match="picks a denoiser of a pipeline"):
        apply_SDTM(wan22_pipe.transformer, denoiser="transformer", num_inference_steps=4)


@pytest.mark.parametrize("st", [1, 2])
def test_spatio_temporal_windows_remove_whole_windows(wan_pipe, st):
    """SSM windows of st x 2 x 2 tokens on the (frames, rows, columns) grid: a structure step removes whole windows,
    K - 1 = 4 st - 1 tokens each, as the schedule of that grid says (frames 0-1 form the one window frame at st = 2,
    frame 2 is loose)."""
    config = SDTMConfig(st=st, ratio=0.5, protect_steps_frequency=-1, token_budgets=None)
    apply_SDTM(wan_pipe, config)
    generate(wan_pipe, guidance_scale=1.0)
    state = get_merge_state(wan_pipe)
    assert set(state.token_budgets()) == {(3, 8, 8)}
    expected = removal_schedule(config, 6, (3, 8, 8))
    structure = [(r, removed) for r, removed in zip(state.records, expected) if r.phase == "structure"]
    assert structure and all(removed > 0 and removed % (4 * st - 1) == 0 for _, removed in structure)
    for record, removed in structure:
        assert record.tokens["attn"] == record.tokens["mlp"] == [TOKENS - removed] * 2
    # 16 windows of 8 tokens at st = 2 (cap 112 removed), 48 windows of 4 at st = 1 (cap 144)
    assert max(removed for _, removed in structure) == (112 if st == 2 else 132)


def test_window_depth_is_refused_on_image_models(tiny_pipe):
    with pytest.raises(ValueError, match=r"st=2 makes windows span frames.*st must be 1"):
        apply_SDTM(tiny_pipe, st=2)


def test_non_video_input_is_refused(wan_pipe):
    model = apply_SDTM(wan_pipe.transformer, num_inference_steps=4)
    with pytest.raises(ValueError, match=r"expected video latents \(B, C, F, H, W\)"):
        model(torch.randn(1, 16, 16, 16), torch.tensor([500]), torch.randn(1, 16, model.config.text_dim))


def test_full_size_presets_have_the_published_token_counts():
    assert PRESETS["wan2.1-1.3b-480p"].num_tokens == 32_760
    assert PRESETS["wan2.1-14b-720p"].num_tokens == 75_600
    assert wan_call_size(PRESETS["wan2.1-1.3b-480p"]) == {"height": 480, "width": 832, "num_frames": 81}


def test_image_to_video_conditioning_is_merged_like_text_to_video():
    """Wan 2.1 I2V adds image channels to the latents (same token grid) and CLIP image tokens to the cross-attention's
    keys (`add_k_proj`): the cross-attention keeps every query, so the image conditioning needs no merge of its own.
    Ratio 0 is bit-identical, merged self-attention sees fewer rows, removal is exact."""
    from diffusers import WanTransformer3DModel

    preset = PRESETS["tiny-wan"]
    heads, head_dim = preset.denoiser["num_attention_heads"], preset.denoiser["attention_head_dim"]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**preset.denoiser, "in_channels": 36, "image_dim": 24,
                                     "added_kv_proj_dim": heads * head_dim}).eval()
    inputs = dict(hidden_states=torch.randn(2, 36, *preset.extra["latent"]),
                  timestep=torch.full((2,), 500, dtype=torch.long),
                  encoder_hidden_states=torch.randn(2, preset.text_tokens, preset.denoiser["text_dim"]),
                  encoder_hidden_states_image=torch.randn(2, 5, 24))
    rows = {"self q": [], "cross q": []}
    model.blocks[0].attn1.to_q.register_forward_pre_hook(lambda _, args: rows["self q"].append(args[0].shape[1]))
    model.blocks[0].attn2.to_q.register_forward_pre_hook(lambda _, args: rows["cross q"].append(args[0].shape[1]))

    def forwards():
        with torch.no_grad():
            return [model(**inputs).sample for _ in range(4)]

    base = forwards()
    apply_SDTM(model, ratio=0.0, num_inference_steps=4)
    assert all(torch.equal(a, b) for a, b in zip(forwards(), base))
    remove_SDTM(model)
    for seen in rows.values():
        seen.clear()
    apply_ToMe(model, ratio=0.5, num_inference_steps=4)
    merged = forwards()
    assert rows["self q"] == [TOKENS // 2] * 4 and rows["cross q"] == [TOKENS] * 4
    assert all(torch.isfinite(m).all() for m in merged) and not torch.equal(merged[0], base[0])
    remove_SDTM(model)
    assert all(torch.equal(a, b) for a, b in zip(forwards(), base))
