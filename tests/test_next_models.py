"""The models users run next (issue 43): Qwen-Image, FLUX.2, HunyuanVideo 1.0 and 1.5 and Z-Image on tiny configs, through
the bare transformer in a denoising loop of the user's own (the path every pipeline of theirs ends in). Ratio 0 is bit-identical, removal is
exact, only image rows are reduced (text rows never), an image never depends on its batch mates, a step cache composes
in one call, and what cannot be merged is refused by name."""

import pytest
import torch
from diffusers import (Flux2Transformer2DModel, HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel,
                       QwenImageTransformer2DModel, ZImageTransformer2DModel)
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from sdtm_plugin import apply_SDTM, apply_token_cache, apply_ToMe, get_merge_state, remove_SDTM

GRID = (8, 8)
TOKENS = GRID[0] * GRID[1]
VIDEO = (2, 4, 8)  # HunyuanVideo's (frames, rows, columns): as many tokens as the images'
TEXT = 6
STEPS = 4


def qwen_image():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                        axes_dims_rope=(4, 6, 6)).eval()

    def inputs(x, t, text):
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(x.shape[0]),
                    img_shapes=[[(1, *GRID)]] * x.shape[0],
                    encoder_hidden_states_mask=torch.ones(x.shape[0], TEXT, dtype=torch.bool))

    return model, inputs, (TOKENS, 16), 24


def flux2():
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                    timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)).eval()
    rows, cols = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros(TOKENS, dtype=torch.long), rows.flatten(), cols.flatten(),
                           torch.zeros(TOKENS, dtype=torch.long)], dim=1)
    txt_ids = torch.zeros(TEXT, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(TEXT)

    def inputs(x, t, text):
        return dict(hidden_states=x, encoder_hidden_states=text, timestep=t.expand(x.shape[0]),
                    img_ids=img_ids[None].expand(x.shape[0], -1, -1), txt_ids=txt_ids[None].expand(x.shape[0], -1, -1),
                    guidance=torch.full((x.shape[0],), 3.5))

    return model, inputs, (TOKENS, 16), 24


def hunyuan_video15():
    """Video latents (B, C, F, H, W); the text sequence is the prompt's 6 tokens, 4 ByT5 tokens and 5 image tokens."""
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                             text_embed_dim=24, text_embed_2_dim=12, image_embed_dim=20,
                                             rope_axes_dim=(4, 6, 6)).eval()

    def inputs(x, t, text):
        b, dtype = x.shape[0], x.dtype
        return dict(hidden_states=x, timestep=1000 * t.expand(b), encoder_hidden_states=text,
                    encoder_attention_mask=torch.ones(b, TEXT),
                    encoder_hidden_states_2=torch.ones(b, 4, 12, dtype=dtype), encoder_attention_mask_2=torch.ones(b, 4), image_embeds=torch.ones(b, 5, 20, dtype=dtype))

    return model, inputs, (4, *VIDEO), 24


PADDED_TEXT = torch.tensor([1, 1, 1, 1, 0, 0])  # HunyuanVideo 1.0's text mask: the last two tokens are padding


def hunyuan_video():
    """Video latents; 1 dual- and 2 single-stream blocks; a text mask with padding (a key mask over [video; text] in
    every block)."""
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                           num_layers=1, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                           patch_size=1, text_embed_dim=24, pooled_projection_dim=12,
                                           rope_axes_dim=(4, 6, 6)).eval()

    def inputs(x, t, text):
        b = x.shape[0]
        return dict(hidden_states=x, timestep=1000 * t.expand(b), encoder_hidden_states=text,
                    encoder_attention_mask=PADDED_TEXT.expand(b, -1), pooled_projections=text[:, 0, :12],
                    guidance=torch.full((b,), 6000.0, dtype=x.dtype))

    return model, inputs, (4, *VIDEO), 24


def z_image():
    """A list of (C, 1, H, W) latents in, a list out; each image's caption is its own length: prompt i's 6 tokens
    repeated 1 + 5 i times (6, 36, 66 tokens: padded to 32, 64, 96), so a batch's sequences differ in length and the
    model masks the padding with a (B, S) key mask."""
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=24, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]).eval()

    def inputs(x, t, text):
        captions = [text[i].repeat(1 + 5 * (i % 3), 1) for i in range(x.shape[0])]
        return dict(x=list(x.unsqueeze(2).unbind(0)), t=1 - t.expand(x.shape[0]).to(x.dtype), cap_feats=captions)

    return model, inputs, (4, 2 * GRID[0], 2 * GRID[1]), 24


MODELS = {"qwen-image": qwen_image, "flux2": flux2, "hunyuan-video": hunyuan_video,
          "hunyuan-video-1.5": hunyuan_video15, "z-image": z_image}


@pytest.fixture(params=list(MODELS))
def tiny(request):
    return MODELS[request.param]()


def batched(output):
    """A model's output as one tensor (Z-Image returns one (C, 1, H, W) tensor per image)."""
    return torch.stack(output).squeeze(2) if isinstance(output, list) else output


def denoise(tiny, prompts=(0,), steps=STEPS):
    """A flow-matching Euler loop over `steps` timesteps; prompt i is a fixed random text embedding."""
    model, inputs, latent, text_dim = tiny
    x = torch.randn(1, *latent, generator=torch.Generator().manual_seed(1)).expand(len(prompts), *latent)
    text = torch.stack([torch.randn(TEXT, text_dim, generator=torch.Generator().manual_seed(10 + p)) for p in prompts])
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = batched(model(**inputs(x, sigmas[i:i + 1], text), return_dict=False)[0])
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_ratio_zero_is_bit_identical_and_removal_is_exact(tiny):
    model = tiny[0]
    base = denoise(tiny)
    apply_SDTM(model, ratio=0.0, num_inference_steps=STEPS)
    assert torch.equal(denoise(tiny), base)
    apply_SDTM(model, num_inference_steps=STEPS, protect_steps_frequency=-1)
    assert not torch.equal(denoise(tiny), base)
    remove_SDTM(model)
    assert torch.equal(denoise(tiny), base)
    assert all("forward" not in m.__dict__ and not hasattr(m, "_diffusers_hook") for m in model.modules())


def _row_probes(model):
    """Modules whose input rows are counted: image-stream query projections and MLPs, text-stream query
    projections, and FLUX.2's fused single-stream input projection (text + image rows)."""
    if isinstance(model, QwenImageTransformer2DModel):
        blocks = model.transformer_blocks
        return {"image q": [b.attn.to_q for b in blocks], "text q": [b.attn.add_q_proj for b in blocks],
                "image mlp": [b.img_mlp.net[0].proj for b in blocks],
                "text mlp": [b.txt_mlp.net[0].proj for b in blocks]}
    if isinstance(model, ZImageTransformer2DModel):  # one [image; caption] sequence into every projection
        return {"joint": [m for b in model.layers for m in (b.attention.to_q, b.feed_forward.w1)]}
    if isinstance(model, (HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel)):
        blocks = model.transformer_blocks
        probes = {"image q": [b.attn.to_q for b in blocks], "text q": [b.attn.add_q_proj for b in blocks],
                  "image mlp": [b.ff.net[0].proj for b in blocks],
                  "text mlp": [b.ff_context.net[0].proj for b in blocks]}
        if isinstance(model, HunyuanVideoTransformer3DModel):  # [video; text] rows of the single-stream branches (the
            # MLP's seen past its input projection, whose own forward the patch wraps) and output projection
            probes["joint"] = [m for b in model.single_transformer_blocks for m in (b.attn.to_q, b.act_mlp, b.proj_out)]
        return probes
    blocks = model.transformer_blocks
    return {"image q": [b.attn.to_q for b in blocks], "text q": [b.attn.add_q_proj for b in blocks],
            "image mlp": [b.ff.linear_in for b in blocks],
            "joint": [b.attn.to_qkv_mlp_proj for b in model.single_transformer_blocks]}


def test_only_image_rows_are_reduced(tiny):
    """ToMe at ratio 0.5 on attention and MLP: every image-stream projection sees half the image tokens, every text
    projection all the text tokens, and FLUX.2's single-stream blocks the text rows plus half the image rows."""
    model = tiny[0]
    seen: dict[str, list[int]] = {}
    for name, modules in _row_probes(model).items():
        for module in modules:
            module.register_forward_pre_hook(
                lambda _, args, name=name: seen.setdefault(name, []).append(args[0].shape[1]))
    apply_ToMe(model, ratio=0.5, merge_mlp=True, num_inference_steps=STEPS)
    denoise(tiny, prompts=(0, 1))
    half = TOKENS // 2
    if isinstance(model, ZImageTransformer2DModel):  # captions of 6 and 36 tokens, padded to 32 and 64
        assert set(seen["joint"]) == {half + 64}
        return
    text = 6 + 4 + 5 if isinstance(model, HunyuanVideo15Transformer3DModel) else TEXT
    assert set(seen["image q"]) == {half} and set(seen["image mlp"]) == {half}
    assert set(seen["text q"]) == {text}
    if "text mlp" in seen:
        assert set(seen["text mlp"]) == {text}
    if "joint" in seen:
        assert set(seen["joint"]) == {TEXT + half}
    counts = get_merge_state(model).token_counts
    assert len(counts) == STEPS and all(n == half for step in counts for n in step["attn"])


@pytest.mark.parametrize("method", ["sdtm", "token-cache"])
def test_an_image_never_depends_on_its_batch_mates(tiny, method):
    """Classifier-free guidance batches [conditional; unconditional]: each image's merges are its own."""
    model = tiny[0]
    if method == "sdtm":
        apply_SDTM(model, num_inference_steps=STEPS, protect_steps_frequency=-1)
    elif isinstance(model, (Flux2Transformer2DModel, HunyuanVideo15Transformer3DModel, ZImageTransformer2DModel)):
        # FLUX.2's single-stream blocks project queries, keys and MLP in one linear; HunyuanVideo 1.5 pads its mask
        # to the query count; Z-Image's processor rotates queries and keys with one per-image table
        with pytest.raises(TypeError, match=f"TokenCacheConfig does not support {type(model).__name__}.*quer"):
            apply_token_cache(model, num_inference_steps=STEPS)
        return
    else:
        apply_token_cache(model, num_inference_steps=STEPS, warmup_steps=1, dense_every=-1)
    one, other = denoise(tiny, prompts=(0, 1)), denoise(tiny, prompts=(0, 2))
    torch.testing.assert_close(one[0], other[0], rtol=0, atol=1e-5)
    assert not torch.equal(one[1], other[1])
    remove_SDTM(model)
    alone = denoise(tiny, prompts=(0,))
    assert not torch.equal(alone[0], one[0])  # the method did change the image


def test_composes_with_a_step_cache_in_one_call_and_is_removed_exactly(tiny):
    """FirstBlockCache on Qwen-Image; on FLUX.2 diffusers' first-block cache cannot take the residual of its joint last
    block against its dual-stream first one: refused by name, TaylorSeer composes instead."""
    model = tiny[0]
    base = denoise(tiny)
    cache = FirstBlockCacheConfig(threshold=0.5)
    if isinstance(model, Flux2Transformer2DModel):
        with pytest.raises(ValueError, match="FirstBlockCacheConfig does not work on Flux2Transformer2DModel"):
            apply_SDTM(model, num_inference_steps=STEPS, step_cache=cache)
        assert torch.equal(denoise(tiny), base)  # nothing left behind
        cache = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1)
    apply_SDTM(model, num_inference_steps=STEPS, step_cache=cache)
    out = denoise(tiny)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    remove_SDTM(model)
    assert torch.equal(denoise(tiny), base)


def test_reference_images_are_refused_by_name():
    model, inputs, (_, channels), text_dim = qwen_image()
    apply_SDTM(model, num_inference_steps=STEPS)
    x, text = torch.randn(1, 2 * TOKENS, channels), torch.randn(1, TEXT, text_dim)
    kwargs = {**inputs(x, torch.tensor([1.0]), text), "img_shapes": [[(1, *GRID), (1, *GRID)]]}
    with pytest.raises(ValueError, match=r"one image of one frame per sample.*Qwen-Image-Edit"):
        model(**kwargs)
    model, inputs, (_, channels), text_dim = flux2()
    apply_SDTM(model, num_inference_steps=STEPS)
    x, text = torch.randn(1, TOKENS, channels), torch.randn(1, TEXT, text_dim)
    with pytest.raises(ValueError, match=r"kv_cache_mode='cached'"):
        model(**inputs(x, torch.tensor([1.0]), text), kv_cache_mode="cached")
    shifted = inputs(x, torch.tensor([1.0]), text)
    shifted["img_ids"] = shifted["img_ids"].clone()
    shifted["img_ids"][..., 0] = 10  # a reference image's time id
    with pytest.raises(ValueError, match="FLUX.2 image tokens on one row-major grid"):
        model(**shifted)


@pytest.mark.parametrize("regional", [False, True])
def test_compiles_fullgraph_and_a_second_generation_compiles_nothing(tiny, regional):
    """`torch.compile(transformer, fullgraph=True)` or regional compilation (`compile_repeated_blocks`, each block
    compiled, the model's own forward eager), then the patch: no graph break, no new graph in a second generation,
    and the latents of eager merging. HunyuanVideo 1.5's own forward branches on its image embeddings' values (a graph
    break without any patch): it is compiled regionally only."""
    if not regional and isinstance(tiny[0], HunyuanVideo15Transformer3DModel):
        pytest.skip("HunyuanVideo 1.5's forward breaks the graph itself (torch.all(image_embeds == 0) branch)")
    import torch._dynamo
    from test_compile import GraphCounter
    from torch._dynamo.utils import counters

    model = tiny[0]
    apply_SDTM(model, num_inference_steps=STEPS, protect_steps_frequency=-1)
    eager = denoise(tiny)
    remove_SDTM(model)
    torch._dynamo.reset()
    counters.clear()
    backend = GraphCounter()
    if regional:
        compiled = model
        model.compile_repeated_blocks(backend=backend, fullgraph=True)
    else:
        compiled = torch.compile(model, backend=backend, fullgraph=True)
    apply_SDTM(compiled, num_inference_steps=STEPS, protect_steps_frequency=-1)
    first_run = denoise((compiled, *tiny[1:]))
    graphs = backend.graphs
    again = denoise((compiled, *tiny[1:]))
    assert sum(counters["graph_break"].values()) == 0
    assert 1 <= graphs and backend.graphs == graphs
    torch.testing.assert_close(first_run, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, first_run)
    remove_SDTM(compiled)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_merges_in_the_model_dtype(tiny, dtype):
    """bf16 / fp16 weights: merged latents stay finite and in the model's dtype, close to its unmerged output."""
    model = tiny[0].to(dtype)
    model_inputs = tiny[1]

    def run():
        x = torch.randn(1, *tiny[2], generator=torch.Generator().manual_seed(1)).to(dtype)
        text = torch.randn(1, TEXT, tiny[3], generator=torch.Generator().manual_seed(10)).to(dtype)
        with torch.no_grad():
            return batched(model(**model_inputs(x, torch.tensor([0.7], dtype=dtype), text), return_dict=False)[0])

    base = run()
    apply_ToMe(model, ratio=0.5, merge_mlp=True, num_inference_steps=1)
    out = run()
    assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base)
    assert (out.float() - base.float()).abs().mean() < base.float().abs().mean()


def test_hunyuan_video_merged_attention_never_sees_padded_text():
    """HunyuanVideo 1.0 masks padded text keys with a (B, 1, 1, N + T) mask over [video; text]: a merged call keeps
    the mask's columns aligned with its merged keys, so what the padding holds cannot change the video (SDTM, ToMe and
    token caching; the test fails if a merge drops the wrong columns)."""
    tiny = hunyuan_video()
    model, inputs, latent, text_dim = tiny
    for apply in (lambda: apply_SDTM(model, num_inference_steps=STEPS, protect_steps_frequency=-1),
                  lambda: apply_ToMe(model, ratio=0.5, merge_mlp=True, num_inference_steps=STEPS),
                  lambda: apply_token_cache(model, num_inference_steps=STEPS, warmup_steps=1, dense_every=-1)):
        outs = []
        for pad in (0.0, 5.0):
            def padded(x, t, text, pad=pad):
                text = text.clone()
                text[:, 4:] = pad
                return inputs(x, t, text)

            apply()
            outs.append(denoise((model, padded, latent, text_dim)))
            assert min(n for step in get_merge_state(model).token_counts[1:] for n in step["attn"] if n) < TOKENS
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
        remove_SDTM(model)


@pytest.mark.parametrize("name", ["flux2-dev", "qwen-image", "hunyuan-video-720p", "wan2.2-ti2v-5b-720p",
                                  "z-image-turbo"])
def test_full_size_presets_count_macs_on_meta(name):
    """The MAC presets of the new models, at their published token counts, built on the meta device at one block of
    each kind (the full depth only multiplies): ToMe 0.5 lowers the counted MACs, attention included."""
    import dataclasses

    from benchmarks.macs import count_forward_macs
    from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs

    preset = PRESETS[name]
    assert preset.num_tokens == {"flux2-dev": 4096, "qwen-image": 4096, "hunyuan-video-720p": 118_800,
                                 "wan2.2-ti2v-5b-720p": 27_280, "z-image-turbo": 4096}[name]
    shallow = dict(preset.denoiser)
    shallow.update({key: 1 for key in ("num_layers", "num_single_layers", "num_refiner_layers", "n_layers",
                                       "n_refiner_layers") if key in shallow})
    preset = dataclasses.replace(preset, denoiser=shallow)
    model, inputs = build_denoiser(preset, "meta"), denoiser_inputs(preset, 1, "meta")
    base = count_forward_macs(model, inputs).mean_per_forward("total")
    apply_ToMe(model, ratio=0.5, num_inference_steps=1)
    merged = count_forward_macs(model, inputs).mean_per_forward("total")
    assert 0 < merged < base


def test_z_image_inputs_it_cannot_merge_are_refused_by_name():
    """Images of several sizes in one call, and a token count Z-Image pads (not a multiple of 32), raise."""
    model, _, _, _ = z_image()
    apply_SDTM(model, num_inference_steps=STEPS)
    caption = [torch.randn(6, 24), torch.randn(6, 24)]
    with pytest.raises(ValueError, match="every image of a call at one size"):
        model([torch.randn(4, 1, 16, 16), torch.randn(4, 1, 16, 24)], torch.zeros(2), caption)
    with pytest.raises(ValueError, match=r"pads 5 x 5 = 25 image tokens to a multiple of 32"):
        model([torch.randn(4, 1, 10, 10)] * 2, torch.zeros(2), caption)
