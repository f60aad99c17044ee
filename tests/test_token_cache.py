"""Token caching (issue 40): on cached steps a share of the image tokens is recomputed per image and block, their
queries attend to every token's keys and values, and every other token keeps its own cached sub-layer outputs."""

import math

import pytest
import torch
from conftest import generate, quiet_pipeline
from diffusers.hooks import FirstBlockCacheConfig

from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs
from sdtm_plugin import TokenCacheConfig, apply_token_cache, get_merge_state, remove_token_cache
from sdtm_plugin.schedule import cached_tokens, is_dense_step
from sdtm_plugin.selection import RowSelection, change_scores, choose_rows

STEPS = 10


@pytest.mark.parametrize("params, name", [
    ({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"), ({"warmup_steps": 0}, "warmup_steps"),
    ({"dense_every": 1}, "dense_every"), ({"dense_every": 0}, "dense_every"), ({"dense_every": -2}, "dense_every"),
    ({"final_dense_steps": -1}, "final_dense_steps"), ({"selection": "importance"}, "selection"),
    ({"staleness_weight": -0.1}, "staleness_weight"), ({"staleness_weight": float("nan")}, "staleness_weight"),
    ({"cache_attn": False, "cache_cross": False, "cache_mlp": False}, "cache_attn"), ({"cache_mlp": 1}, "cache_mlp"),
    ({"cache_keys": True, "cache_attn": False}, "cache_keys"), ({"cache_keys": 1}, "cache_keys"),
    ({"sketch_dim": 4}, "sketch_dim"), ({"sx": 1, "sy": 1}, "st \\* sy \\* sx"), ({"seed": -1}, "seed"),
])
def test_bad_parameters_name_the_parameter(params, name):
    with pytest.raises(ValueError, match=name):
        TokenCacheConfig(**params)


def test_dense_steps_and_static_budget():
    config = TokenCacheConfig()  # warm-up 3, every 3rd, the last 2
    assert [s for s in range(20) if is_dense_step(config, s, 20)] == [0, 1, 2, 5, 8, 11, 14, 17, 18, 19]
    no_interval = TokenCacheConfig(dense_every=-1, final_dense_steps=0)
    assert [s for s in range(8) if is_dense_step(no_interval, s, 8)] == [0, 1, 2]
    # the recomputed tokens are whole multiples of 8, at least 8
    assert [cached_tokens(r, 256) for r in (0.0, 0.01, 0.5, 0.7, 0.99)] == [0, 0, 128, 176, 248]
    assert cached_tokens(0.9, 8) == 0


def test_ratio_zero_is_bit_identical_and_removal_is_exact(tiny_pipe):
    base = generate(tiny_pipe, steps=STEPS)
    apply_token_cache(tiny_pipe, ratio=0.0)
    assert torch.equal(generate(tiny_pipe, steps=STEPS), base)
    apply_token_cache(tiny_pipe)
    apply_token_cache(tiny_pipe)  # applying again replaces
    cached = generate(tiny_pipe, steps=STEPS)
    assert not torch.equal(cached, base)
    phases = [r.phase for r in get_merge_state(tiny_pipe).records]
    assert phases == ["full" if is_dense_step(TokenCacheConfig(), s, STEPS) else "cached" for s in range(STEPS)]
    remove_token_cache(tiny_pipe)
    assert torch.equal(generate(tiny_pipe, steps=STEPS), base)
    assert not any("forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for m in tiny_pipe.transformer.modules())


@pytest.mark.parametrize("cache_keys", [False, True])
@pytest.mark.parametrize("model", ["tiny", "tiny-dit", "tiny-flux", "tiny-wan", "tiny-sd"])
def test_a_cached_step_on_unchanged_inputs_reproduces_the_dense_output(model, cache_keys):
    """Called again on the same inputs, a cached step's computed tokens see every key (full context, each row rotated
    by its own position on rotary models) and the others' cached outputs are what computing them would give: the
    output equals the unpatched model's, while fewer query rows were computed. With `cache_keys` the uncomputed
    tokens' keys and values come from the cache: on unchanged inputs the same as projected afresh."""
    torch.manual_seed(0)
    preset = PRESETS[model]
    transformer = build_denoiser(preset).eval()
    inputs = denoiser_inputs(preset, batch_size=2)
    rows = []
    query = next(m for m in transformer.modules() if hasattr(m, "to_q") and hasattr(m, "to_k"))
    query.to_q.register_forward_hook(lambda _, args, out: rows.append((out.shape[1], None)))
    query.to_k.register_forward_hook(lambda _, args, out: rows.append((None, out.shape[1])))
    with torch.no_grad():
        base = transformer(**inputs, return_dict=False)[0]
        apply_token_cache(transformer, ratio=0.5, num_inference_steps=STEPS, final_dense_steps=0,
                          cache_keys=cache_keys)
        rows.clear()
        outputs = [transformer(**inputs, return_dict=False)[0] for _ in range(5)]
    assert [r.phase for r in get_merge_state(transformer).records] == ["full"] * 3 + ["cached"] * 2
    for out in outputs:
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    queries = [q for q, _ in rows if q is not None]
    keys = [k for _, k in rows if k is not None]
    assert len(set(keys)) == 1 and min(queries) < max(queries) == keys[0]  # fewer queries on cached steps only
    remove_token_cache(transformer)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_cached_keys_project_only_the_computed_rows(model):
    """With `cache_keys` a cached step runs every self-attention's key and value projections on the computed rows
    only: its linear FLOPs fall by exactly those projections of the uncomputed tokens (FLUX: image rows of the
    double- and single-stream blocks; text rows always projected)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    preset = PRESETS[model]
    transformer = build_denoiser(preset).eval()
    inputs = denoiser_inputs(preset, batch_size=2)
    flops = {}
    for cache_keys in (False, True):
        apply_token_cache(transformer, ratio=0.5, num_inference_steps=STEPS, final_dense_steps=0,
                          cache_keys=cache_keys)
        with torch.no_grad():
            for _ in range(3):
                transformer(**inputs)
            with FlopCounterMode(display=False) as counter:
                transformer(**inputs)
        state = get_merge_state(transformer)
        assert state.records[-1].phase == "cached"
        flops[cache_keys] = counter.get_total_flops()
        keys = [linear for (_, role), linears in state.output_layers.items() if role == "keys" for linear in linears]
        assert bool(keys) == cache_keys
    tokens = math.prod(state.slots[0].grid)
    skipped = cached_tokens(0.5, tokens)
    saved = sum(2 * 2 * skipped * linear.in_features * linear.out_features for linear in keys)
    assert flops[False] - flops[True] == saved
    remove_token_cache(transformer)


class Rows:
    """Rows entering chosen linear layers per transformer call, seen by PyTorch hooks outside the plugin's (on the
    query projection: its output, after the plugin's own hook chose the rows)."""

    def __init__(self, transformer, watched: dict[str, list[torch.nn.Module]], outputs: tuple[str, ...] = ()):
        self.calls: list[dict[str, list[int]]] = []
        transformer.register_forward_pre_hook(lambda *_: self.calls.append({}))
        for name, modules in watched.items():
            for module in modules:
                if name in outputs:
                    module.register_forward_hook(lambda _, args, out, name=name: self.add(name, out))
                else:
                    module.register_forward_pre_hook(lambda _, args, name=name: self.add(name, args[0]))

    def add(self, name, x):
        self.calls[-1].setdefault(name, []).append(x.shape[1])


def test_rows_of_each_sub_layer_on_pixart(tiny_pipe):
    blocks = tiny_pipe.transformer.transformer_blocks
    rows = Rows(tiny_pipe.transformer, {"self q": [b.attn1.to_q for b in blocks], "self k": [b.attn1.to_k for b in blocks],
                                        "cross q": [b.attn2.to_q for b in blocks], "mlp": [b.ff.net[0].proj for b in blocks]},
                outputs=("self q",))
    apply_token_cache(tiny_pipe, ratio=0.6)
    generate(tiny_pipe, steps=STEPS)
    computed = 64 - cached_tokens(0.6, 64)
    for step, seen in enumerate(rows.calls):
        n = 64 if is_dense_step(TokenCacheConfig(), step, STEPS) else computed
        assert seen == {"self q": [n] * 4, "self k": [64] * 4, "cross q": [n] * 4, "mlp": [n] * 4}, step
    assert get_merge_state(tiny_pipe).token_counts[3] == {"attn": [computed] * 4, "cross": [computed] * 4,
                                                          "mlp": [computed] * 4}


def test_rows_on_flux_text_always_computed(tiny_pipe_dir):
    pipe = quiet_pipeline("tiny-flux", tiny_pipe_dir)
    double, single = pipe.transformer.transformer_blocks, pipe.transformer.single_transformer_blocks
    rows = Rows(pipe.transformer, {"image q": [b.attn.norm_q for b in double], "text q": [b.attn.add_q_proj for b in double],
                                   "image k": [b.attn.to_k for b in double], "image mlp": [b.ff.net[0].proj for b in double],
                                   "single q": [b.attn.norm_q for b in single], "single k": [b.attn.to_k for b in single],
                                   "single out": [b.proj_out for b in single]})
    apply_token_cache(pipe, ratio=0.5)
    pipe("a red cat", height=32, width=32, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
         max_sequence_length=16, output_type="latent")
    text, image = 16, 64
    for step, seen in enumerate(rows.calls):
        n = image if is_dense_step(TokenCacheConfig(), step, STEPS) else image - cached_tokens(0.5, image)
        assert seen == {"image q": [n] * 2, "text q": [text] * 2, "image k": [image] * 2, "image mlp": [n] * 2,
                        "single q": [text + n] * 2, "single k": [text + image] * 2, "single out": [text + n] * 2}, step


@pytest.mark.parametrize("extrapolation", [0.0, 0.5])
def test_uncomputed_tokens_keep_their_own_cached_outputs(tiny_pipe, extrapolation):
    """On a cached step, each MLP output row of a token that was not computed is its own row at the step it was last
    computed, moved by `extrapolation` times its change per step between its last two computations; no token takes
    another's output. Computed rows are the sub-layer's exact outputs."""
    ff = tiny_pipe.transformer.transformer_blocks[1].ff
    outputs = []
    ff.register_forward_hook(lambda _, args, out: outputs.append(out.detach().clone()))
    apply_token_cache(tiny_pipe, ratio=0.6, dense_every=-1, final_dense_steps=0, extrapolation=extrapolation)
    generate(tiny_pipe, steps=6)
    # steps 0-2 are the warm-up; step 3 the first cached step (the hook sees the full-length output it returns)
    served = outputs[1] * -extrapolation + outputs[2] * (1 + extrapolation)  # last + w * (last - previous) * 1 step
    kept = torch.isclose(outputs[3], served, rtol=1e-5, atol=1e-6).all(-1)  # (B, N)
    computed = 64 - cached_tokens(0.6, 64)
    assert (kept.sum(1) == 64 - computed).all()  # computed rows differ: their inputs changed since step 2
    if extrapolation == 0:
        assert torch.equal(outputs[3][kept], outputs[2][kept])
    # step 4: a token computed at step 3 and not at step 4 moves along its step-2-to-3 change
    computed_3, kept_4 = ~kept, torch.zeros_like(kept)
    served_4 = outputs[3] * (1 + extrapolation) - outputs[2] * extrapolation
    kept_4 = torch.isclose(outputs[4], served_4, rtol=1e-5, atol=1e-6).all(-1) & computed_3
    assert kept_4.any()


def test_selection_follows_the_change_of_the_input():
    """Tokens whose input moved most since they were last computed are chosen; staleness breaks the tie for the
    others; the chosen rows are ascending and unique."""
    reference = torch.randn(2, 32, 8)
    sketch = reference.clone()
    sketch[0, [3, 17, 30]] += 5.0
    sketch[1, [0, 9]] += 5.0
    score = change_scores(sketch, reference)
    staleness = torch.zeros(2, 32)
    staleness[:, 20] = 2.0
    rows = choose_rows(score + 0.05 * staleness, 4)
    assert rows.tolist() == [[3, 17, 20, 30], [0, 9, 20, rows[1, 3].item()]] and rows[1, 3] not in (0, 9, 20)
    selection = RowSelection(rows, 32)
    x = torch.randn(2, 32, 5)
    assert torch.equal(selection.merge(x), torch.stack([x[0, rows[0]], x[1, rows[1]]]))
    y = torch.randn(2, 4, 5)
    full = selection.unmerge(y, x)
    assert torch.equal(full[0, rows[0]], y[0]) and torch.equal(full[1, rows[1]], y[1])
    assert torch.equal(selection.merged_flags().sum(1), torch.tensor([28.0, 28.0]))
    assert torch.equal(selection.flat_rows, torch.cat([rows[0], rows[1] + 32]))
    with pytest.raises(RuntimeError, match="cached output"):
        selection.unmerge(y)


def test_change_selection_picks_the_perturbed_tokens(tiny_pipe):
    """A bare model called with the same latents except a few perturbed tokens: its first block's cached step
    computes those tokens."""
    transformer = tiny_pipe.transformer
    inputs = denoiser_inputs(PRESETS["tiny"], batch_size=1)
    apply_token_cache(transformer, ratio=0.75, num_inference_steps=STEPS, staleness_weight=0.0)
    with torch.no_grad():
        for _ in range(3):
            transformer(**inputs)
        perturbed = inputs["hidden_states"].clone()
        perturbed[0, :, 4:6, 2:4] += 3.0  # token (2, 1) of the 8 x 8 grid of 2 x 2 patches
        perturbed[0, :, 4:6, 10:12] += 3.0  # token (2, 5)
        transformer(**{**inputs, "hidden_states": perturbed})
    state = get_merge_state(transformer)
    computed_at = next(iter(state._streams.values())).computed_at(1, 64, "cpu")[0, 0]
    assert computed_at[17] == 3 and computed_at[21] == 3  # computed at the cached step 3
    assert int((computed_at == 3).sum()) == 64 - cached_tokens(0.75, 64)


def test_no_token_starves():
    """Without dense steps after the warm-up, the staleness score still computes every token within a bounded
    number of steps."""
    transformer = build_denoiser(PRESETS["tiny"]).eval()
    inputs = denoiser_inputs(PRESETS["tiny"], batch_size=2)
    apply_token_cache(transformer, ratio=0.75, dense_every=-1, final_dense_steps=0, num_inference_steps=40,
                      warmup_steps=1, staleness_weight=1.0)
    with torch.no_grad():
        for _ in range(40):
            transformer(**inputs)
    computed_at = next(iter(get_merge_state(transformer)._streams.values())).computed_at(2, 64, "cpu")
    assert 39 - computed_at.min() <= 8  # 16 computed of 64 per step: each token within a few steps


def test_random_selection_is_seeded(tiny_pipe):
    apply_token_cache(tiny_pipe, selection="random")
    a = generate(tiny_pipe, steps=STEPS)
    assert torch.equal(generate(tiny_pipe, steps=STEPS), a)
    apply_token_cache(tiny_pipe, selection="random", seed=1)
    assert not torch.equal(generate(tiny_pipe, steps=STEPS), a)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux"])
def test_an_image_does_not_depend_on_its_batch_mates(model, tiny_pipe_dir):
    """Rows are chosen per image (rotary models too: each row is rotated by its own position), so an image generated
    beside different prompts is the same."""
    pipe = quiet_pipeline(model, tiny_pipe_dir)
    apply_token_cache(pipe, ratio=0.5)
    kwargs = (dict(height=32, width=32, max_sequence_length=16) if model == "tiny-flux"
              else dict(use_resolution_binning=False, clean_caption=False))

    def first(prompts):
        return pipe(prompts, num_inference_steps=STEPS, output_type="latent", **kwargs,
                    generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]).images[0]

    torch.testing.assert_close(first(["a red cat", "a blue boat"]), first(["a red cat", "a green tree"]),
                               rtol=1e-5, atol=1e-5)


def test_img2img_starting_on_a_cached_step_runs_dense_first(tiny_pipe_dir):
    from diffusers import FluxImg2ImgPipeline
    from PIL import Image

    base = quiet_pipeline("tiny-flux", tiny_pipe_dir)
    pipe = FluxImg2ImgPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    apply_token_cache(pipe)
    pipe("a red cat", image=Image.new("RGB", (32, 32), (200, 30, 30)), strength=0.6, height=32, width=32,
         num_inference_steps=STEPS, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
         output_type="latent")
    records = get_merge_state(pipe).records
    assert records[0].step == 4 and not is_dense_step(TokenCacheConfig(), 4, STEPS)
    expected = ["full" if is_dense_step(TokenCacheConfig(), s, STEPS) else "cached" for s in range(5, STEPS)]
    assert [r.phase for r in records] == ["full", *expected] and "cached" in expected


@pytest.mark.parametrize("extrapolation", [0.0, 0.5])
@pytest.mark.parametrize("cache_keys", [False, True])
def test_held_memory_is_counted_and_freed(tiny_pipe, extrapolation, cache_keys):
    """What a generation keeps: per block, one (B, N, C) output per cached sub-layer (self-attention, cross-attention,
    MLP) and as many slopes with extrapolation, with `cache_keys` the self-attention's keys and values, the step each
    token was computed at, the change sketches and the step; freed when the call ends; the estimate made before the
    first call (`cache_estimate`) counts the same outputs."""
    apply_token_cache(tiny_pipe, extrapolation=extrapolation, cache_keys=cache_keys)
    generate(tiny_pipe, steps=STEPS)
    state = get_merge_state(tiny_pipe)
    width = tiny_pipe.transformer.config.num_attention_heads * tiny_pipe.transformer.config.attention_head_dim
    batch, tokens, blocks = 2, 64, 4
    outputs = (3 * (2 if extrapolation else 1) + (2 if cache_keys else 0)) * blocks * batch * tokens * width * 4
    assert state.cache_estimate((8, 8), batch) == outputs
    computed_at = blocks * batch * tokens * 4
    sketches = blocks * batch * tokens * min(width, 64) * 4
    assert state.peak_held_bytes == outputs + computed_at + sketches + 4
    assert state.held_bytes() == 0


def test_composes_with_a_step_cache_and_removes_exactly(tiny_pipe):
    base = generate(tiny_pipe, steps=STEPS)
    apply_token_cache(tiny_pipe, step_cache=FirstBlockCacheConfig(threshold=0.05))
    composed = generate(tiny_pipe, steps=STEPS)
    assert not torch.equal(composed, base) and torch.isfinite(composed).all()
    remove_token_cache(tiny_pipe)
    assert torch.equal(generate(tiny_pipe, steps=STEPS), base)


def test_unsupported_models_and_fused_projections_raise(tiny_pipe_dir):
    sd3 = quiet_pipeline("tiny-sd3", tiny_pipe_dir)
    with pytest.raises(TypeError, match="TokenCacheConfig does not support SD3Transformer2DModel"):
        apply_token_cache(sd3)
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in sd3.transformer.modules())
    pipe = quiet_pipeline("tiny", tiny_pipe_dir)
    pipe.transformer.fuse_qkv_projections()
    with pytest.raises(ValueError, match="fused QKV projections"):
        apply_token_cache(pipe)
    with pytest.raises(TypeError, match="either a TokenCacheConfig or keyword"):
        apply_token_cache(pipe, TokenCacheConfig(), ratio=0.5)


def test_bare_model_needs_the_step_count_for_its_final_dense_steps():
    transformer = build_denoiser(PRESETS["tiny"]).eval()
    inputs = denoiser_inputs(PRESETS["tiny"], batch_size=2)
    apply_token_cache(transformer)
    with pytest.raises(RuntimeError, match="num_inference_steps"):
        transformer(**inputs)
    apply_token_cache(transformer, final_dense_steps=0)
    with torch.no_grad():
        transformer(**inputs)
    assert math.isclose(get_merge_state(transformer).records[0].batch_size, 2)
