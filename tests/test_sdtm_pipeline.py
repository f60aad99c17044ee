"""SDTM / ToMe on a tiny offline PixArt pipeline: exactness, per-step token counts, state, determinism."""

import math

import pytest
import torch
from conftest import generate

from sdtm_plugin import SDTMConfig, apply_SDTM, apply_ToMe, get_merge_state, remove_SDTM
from sdtm_plugin.config import DEFAULT_TOKEN_BUDGETS
from sdtm_plugin.methods import SDTM
from sdtm_plugin.schedule import removal_schedule

N = 64  # tiny preset: 8x8 token grid
WINDOWS = 16  # 2x2 windows


def expected_counts(steps, layers=4, ratio=0.3, deviation=0.2, switch_step=20, protect=3, protect_layers=-1,
                    merge_attn=True, merge_mlp=True, k=4, budgets=DEFAULT_TOKEN_BUDGETS):
    """Tokens entering (attn, mlp) of each block at each step: the phases and the paper's exact counts written from
    the method's formulas; with `budgets`, each merged step's count is the budget schedule's (its properties are
    tested in tests/test_schedule.py)."""
    sx, sy = (2, 2) if k == 4 else (k, 1)
    schedule = removal_schedule(SDTMConfig(ratio=ratio, deviation=deviation, switch_step=switch_step, sx=sx, sy=sy,
                                           protect_steps_frequency=protect, token_budgets=budgets), steps, (8, 8))
    out = []
    for i in range(steps):
        p = i / (steps - 1) if steps > 1 else 0.0
        r = (ratio - deviation) + 2 * deviation * math.cos(p * math.pi / 2)
        structure = i * 50 <= switch_step * steps
        full = protect > 0 and i % protect == 0
        if structure:
            removed = min(int(r * N / (k - 1)), WINDOWS) * (k - 1)
        else:
            removed = min(int(r * N), N - WINDOWS)
        if budgets is None:
            assert schedule[i] == (0 if full or r <= 0 else removed), i  # the plugin's exact counts are the paper's
        else:
            removed = schedule[i]
        kept = N - removed
        if structure:
            attn, mlp = (kept if merge_attn else N), (kept if merge_mlp else N)
        else:
            attn, mlp = N, (kept if merge_mlp else N)
        row = []
        for layer in range(layers):
            lp = protect_layers > 0 and (layer % protect_layers == 0 or layer == layers - 1)
            row.append((N, N) if (full or lp or r <= 0) else (attn, mlp))
        out.append(row)
    return out


def record_counts(pipe):
    """Forward hooks on the Linear layers: tokens entering self-attention (to_q) and the MLP (first proj)."""
    seen = []
    handles = []
    for layer, block in enumerate(pipe.transformer.transformer_blocks):
        handles.append(block.attn1.to_q.register_forward_hook(lambda m, a, o, l=layer: seen.append(("attn", l, a[0].shape[1]))))
        handles.append(block.ff.net[0].proj.register_forward_hook(lambda m, a, o, l=layer: seen.append(("mlp", l, a[0].shape[1]))))
    return seen, handles


def per_step(seen, layers=4):
    steps = [seen[i : i + 2 * layers] for i in range(0, len(seen), 2 * layers)]
    return [[(s[2 * l][2], s[2 * l + 1][2]) for l in range(layers)] for s in steps]


def test_ratio_zero_and_removal_are_bit_identical(tiny_pipe):
    base = generate(tiny_pipe)
    apply_SDTM(tiny_pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(tiny_pipe), base)
    apply_SDTM(tiny_pipe)  # re-apply replaces
    merged = generate(tiny_pipe)
    assert not torch.equal(merged, base) and torch.isfinite(merged).all()
    remove_SDTM(tiny_pipe)
    assert torch.equal(generate(tiny_pipe), base)
    for module in tiny_pipe.transformer.modules():
        assert not hasattr(module, "_diffusers_hook") and "forward" not in module.__dict__
    assert "set_timesteps" not in tiny_pipe.scheduler.__dict__ and "step" not in tiny_pipe.scheduler.__dict__


def test_applying_twice_does_not_stack(tiny_pipe):
    """Each application replaces the last: the tokens seen are the last config's alone, one hook per module, and
    one removal restores the unpatched model bit for bit."""
    base = generate(tiny_pipe, steps=6)
    apply_SDTM(tiny_pipe)
    apply_SDTM(tiny_pipe, ratio=0.4)
    apply_ToMe(tiny_pipe, ratio=0.25, merge_mlp=True)
    block = tiny_pipe.transformer.transformer_blocks[0]
    assert list(block.attn1._diffusers_hook.hooks) == ["sdtm_merge"]
    assert list(tiny_pipe.transformer._diffusers_hook.hooks) == ["sdtm_step"]
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=6)
    for h in handles:
        h.remove()
    assert per_step(seen) == [[(48, 48)] * 4] * 6  # ToMe 0.25 of 64 tokens on every step: no SDTM schedule left
    remove_SDTM(tiny_pipe)
    assert torch.equal(generate(tiny_pipe, steps=6), base)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"ratio": 0.4, "deviation": 0.1, "switch_step": 30},
        {"protect_steps_frequency": -1, "switch_step": 0},
        {"protect_layers_frequency": 2},
        {"merge_attn": False},
        {"merge_mlp": False},
        {"sx": 4, "sy": 1},
    ],
)
def test_token_counts_follow_schedule_phases_and_protection(tiny_pipe, params):
    steps = 10
    apply_SDTM(tiny_pipe, **params)
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=steps)
    for h in handles:
        h.remove()
    keys = ("ratio", "deviation", "switch_step", "merge_attn", "merge_mlp")
    expect = expected_counts(
        steps, **{k: v for k, v in params.items() if k in keys},
        protect=params.get("protect_steps_frequency", 3), protect_layers=params.get("protect_layers_frequency", -1),
        k=params.get("sx", 2) * params.get("sy", 2),
    )
    assert per_step(seen) == expect
    assert [[(c["attn"][l], c["mlp"][l]) for l in range(4)] for c in get_merge_state(tiny_pipe).token_counts] == expect


def test_tome_counts_every_step(tiny_pipe):
    apply_ToMe(tiny_pipe, ratio=0.5)
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=4)
    assert per_step(seen) == [[(32, 64)] * 4] * 4
    apply_ToMe(tiny_pipe, ratio=0.25, merge_mlp=True)
    seen.clear()
    generate(tiny_pipe, steps=2)
    assert per_step(seen) == [[(48, 48)] * 4] * 2


@pytest.mark.parametrize("call", ["keyword", "positional", "default"])
def test_step_tracking_however_steps_are_passed(tiny_pipe, call):
    apply_SDTM(tiny_pipe)
    seen, _ = record_counts(tiny_pipe)
    g = torch.Generator().manual_seed(0)
    common = dict(generator=g, use_resolution_binning=False, output_type="latent", clean_caption=False)
    if call == "keyword":
        tiny_pipe("a cat", num_inference_steps=7, **common)
        steps = 7
    elif call == "positional":
        tiny_pipe("a cat", "", 7, **common)  # (prompt, negative_prompt, num_inference_steps)
        steps = 7
    else:
        tiny_pipe("a cat", **common)
        steps = 20  # PixArtAlphaPipeline's default
    assert get_merge_state(tiny_pipe).num_steps == steps
    assert per_step(seen) == expected_counts(steps)


def test_state_resets_each_call_also_after_a_call_that_raised(tiny_pipe):
    apply_SDTM(tiny_pipe)
    first = generate(tiny_pipe, steps=8)
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")

    handle = tiny_pipe.transformer.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        generate(tiny_pipe, steps=8)
    handle.remove()
    assert torch.equal(generate(tiny_pipe, steps=8), first)
    # a different step count in between does not leak into the next call either
    generate(tiny_pipe, steps=5)
    assert torch.equal(generate(tiny_pipe, steps=8), first)


def test_same_seed_identical_and_use_rand_seeds_differ(tiny_pipe):
    cfg = dict(switch_step=10, protect_steps_frequency=-1)  # most steps in IDM, where destinations are drawn
    apply_SDTM(tiny_pipe, seed=1, **cfg)
    a = generate(tiny_pipe)
    assert torch.equal(generate(tiny_pipe), a)
    apply_SDTM(tiny_pipe, seed=2, **cfg)
    assert not torch.equal(generate(tiny_pipe), a)
    apply_SDTM(tiny_pipe, seed=1, use_rand=False, **cfg)
    c = generate(tiny_pipe)
    apply_SDTM(tiny_pipe, seed=2, use_rand=False, **cfg)
    assert torch.equal(generate(tiny_pipe), c)  # no randomness: the seed is irrelevant


@pytest.mark.parametrize(
    "change, moves_merges",
    [({"a_s": 0.0}, True), ({"a_d": 0.0}, True), ({"use_rand": False}, True),
     ({"mcw": 1.0}, False), ({"mcw": 0.5}, False), ({"cache_each_step": False}, False)],
)
def test_every_output_parameter_has_its_effect(tiny_pipe, monkeypatch, change, moves_merges):
    """Each parameter changes the image but not the schedule (the same token counts in every block and step); from
    the same inputs, the staleness priors and the tie-break change *which* tokens merge, while the cache weight and
    the cache cadence leave the merges alone (they act on the blending of merged outputs)."""
    from sdtm_plugin.schedule import Phase

    rows = []
    original = SDTM.build

    def build(self, slot, x, plan):
        merge = original(self, slot, x, plan)
        rows.append(None if merge is None else merge.num_rows)
        return merge

    monkeypatch.setattr(SDTM, "build", build)
    base_cfg = dict(switch_step=20, protect_steps_frequency=4)
    apply_SDTM(tiny_pipe, **base_cfg)
    reference = generate(tiny_pipe, steps=12)
    reference_rows, rows[:] = list(rows), []
    apply_SDTM(tiny_pipe, **{**base_cfg, **change})
    changed = generate(tiny_pipe, steps=12)
    assert torch.isfinite(changed).all() and not torch.equal(changed, reference), f"{change} changed nothing"
    assert rows == reference_rows and any(r is not None for r in rows)
    # from the same inputs: same merges or not
    monkeypatch.undo()
    # near-equal tokens: similarities tie closely, so a prior of weight 0.05 decides between them
    x = 1 + 0.01 * torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(5))
    staleness = torch.randint(0, 4, (2, 64), generator=torch.Generator().manual_seed(6))
    for phase in (Phase.STRUCTURE, Phase.DETAIL):
        ours, _ = _build(SDTMConfig(**{**base_cfg, **change}), phase, x, staleness, 0.3)
        theirs, _ = _build(SDTMConfig(**base_cfg), phase, x, staleness, 0.3)
        moved = not torch.equal(ours.merged, theirs.merged)
        acts_here = (phase is Phase.STRUCTURE) == ("a_s" in change)  # a_s in SSM; a_d, the tie-break in IDM
        assert moved == (moves_merges and acts_here), (change, phase)


def test_cfg_and_batches(tiny_pipe):
    apply_SDTM(tiny_pipe)
    seen, _ = record_counts(tiny_pipe)
    g = torch.Generator().manual_seed(0)
    out = tiny_pipe(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=6, generator=g,
                    use_resolution_binning=False, output_type="latent", clean_caption=False).images
    assert out.shape == (4, 4, 16, 16) and torch.isfinite(out).all()
    assert get_merge_state(tiny_pipe).batch_size == 8  # CFG doubles the 4 images
    assert per_step(seen) == expected_counts(6)
    seen.clear()
    generate(tiny_pipe, steps=6, guidance_scale=1.0)  # no CFG: batch 1
    assert get_merge_state(tiny_pipe).batch_size == 1 and per_step(seen) == expected_counts(6)


def test_batched_elements_are_merged_independently(tiny_pipe):
    """An image's result does not depend on what else is in the batch (selection is per element)."""
    apply_SDTM(tiny_pipe, use_rand=False)
    single = generate(tiny_pipe, prompt="a red cat", steps=6)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=g)
    kw = dict(num_inference_steps=6, use_resolution_binning=False, output_type="latent", clean_caption=False)
    one = tiny_pipe("a red cat", latents=latents, **kw).images
    two = tiny_pipe(["a red cat", "a blue dog"], latents=torch.cat([latents, torch.randn(1, 4, 16, 16)]), **kw).images
    # only float batching noise (the unpatched pipeline shows ~5e-7 too); shared selection would show ~1e-2
    assert ((two[:1] - one).abs().max() / one.abs().max()) < 1e-5
    assert single.shape == one.shape


def test_bare_transformer_needs_and_uses_step_count(tiny_pipe):
    transformer = tiny_pipe.transformer
    latents = torch.randn(2, 4, 16, 16)
    text = torch.randn(2, 120, 32)
    t = torch.tensor([999, 999])
    apply_SDTM(transformer)
    with pytest.raises(RuntimeError, match="num_inference_steps"):
        transformer(latents, encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    apply_SDTM(transformer, num_inference_steps=3)
    kw = dict(encoder_hidden_states=text, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    outs = [transformer(latents, **kw).sample for _ in range(6)]
    state = get_merge_state(transformer)
    assert state.step == 2  # wrapped after 3 forwards: steps 0, 1, 2, 0, 1, 2
    assert torch.equal(outs[1], outs[4]) and not torch.equal(outs[0], outs[1])


def test_scheduler_swapped_after_apply_is_followed(tiny_pipe):
    from diffusers import DDIMScheduler

    apply_SDTM(tiny_pipe)
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    seen, _ = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=6)
    generate(tiny_pipe, steps=9)
    assert get_merge_state(tiny_pipe).num_steps == 9
    assert per_step(seen) == expected_counts(6) + expected_counts(9)


def test_prompt_embeds_path_and_resolution_change(tiny_pipe):
    apply_SDTM(tiny_pipe)
    embeds, mask, neg, neg_mask = tiny_pipe.encode_prompt("a cat", device="cpu")
    out = tiny_pipe(negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                    negative_prompt_attention_mask=neg_mask, num_inference_steps=4, height=48, width=32,
                    use_resolution_binning=False, output_type="latent").images
    assert out.shape == (1, 4, 24, 16) and get_merge_state(tiny_pipe).grid == (12, 8)
    assert generate(tiny_pipe, steps=4).shape == (1, 4, 16, 16)
    assert get_merge_state(tiny_pipe).grid == (8, 8)


def test_config_object_and_errors(tiny_pipe):
    apply_SDTM(tiny_pipe, SDTMConfig(ratio=0.2, deviation=0.1))
    assert get_merge_state(tiny_pipe).config.ratio == 0.2
    with pytest.raises(TypeError, match="either"):
        apply_SDTM(tiny_pipe, SDTMConfig(), ratio=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        apply_SDTM(tiny_pipe, rato=0.1)


# -- each parameter moves the result in its documented direction -------------------------------------------------
def _build(cfg, phase, x, staleness, ratio):
    from sdtm_plugin.grid import WindowGrid
    from sdtm_plugin.methods import StreamBuffers
    from sdtm_plugin.schedule import StepPlan, tokens_removed
    from sdtm_plugin.state import BlockSlot

    buffers = StreamBuffers(1, x.shape[0])
    buffers.staleness(x.shape[0], x.shape[1], x.device)[0] = staleness
    plan = StepPlan(5, 20, phase, ratio, phase.value == "structure", True)
    grid = WindowGrid.build((8, 8), 2, 2, torch.device("cpu"))
    method = SDTM(cfg, 1)
    shape = method.noise_shape(grid, x.shape[0], plan)
    slot = BlockSlot(0, True, None)
    slot.grid, slot.window_grid, slot.buffers = (8, 8), grid, buffers.blocks[0]
    slot.removed = tokens_removed(phase, ratio, (8, 8), (1, 2, 2))
    slot.noise = None if shape is None else torch.rand(shape, generator=torch.Generator().manual_seed(0))[0]
    return method.build(slot, x, plan), grid


def test_larger_a_d_makes_staler_tokens_more_likely_idm_sources():
    from sdtm_plugin.schedule import Phase

    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1))
    staleness = torch.zeros(4, 64, dtype=torch.int32)
    staleness[:, ::2] = 5  # every other token is stale
    stale = staleness.bool()
    merged_stale = []
    for a_d in (0.0, 0.05, 0.3, 2.0):
        merge, grid = _build(SDTMConfig(a_d=a_d, use_rand=False), Phase.DETAIL, x, staleness, 0.25)
        sources = merge.merged.clone()
        sources[:, grid.window_tokens[:, 0]] = False  # destinations: the first (stalest, tied) token of each window
        merged_stale.append(int((sources & stale).sum()))
    assert merged_stale == sorted(merged_stale) and merged_stale[-1] > merged_stale[0], merged_stale


def test_larger_a_s_favours_staler_windows_in_ssm():
    from sdtm_plugin.schedule import Phase

    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(2))
    staleness = torch.zeros(4, 64, dtype=torch.int32)
    stale_windows = torch.arange(16) % 2 == 0
    from sdtm_plugin.grid import WindowGrid

    grid = WindowGrid.build((8, 8), 2, 2, torch.device("cpu"))
    staleness[:, grid.window_tokens[stale_windows].flatten()] = 5
    chosen_stale = []
    for a_s in (0.0, 0.05, 0.3, 2.0):
        merge, grid = _build(SDTMConfig(a_s=a_s), Phase.STRUCTURE, x, staleness, 0.2)
        merged_windows = merge.merged[:, grid.window_tokens].all(-1)  # (B, W)
        chosen_stale.append(int(merged_windows[:, stale_windows].sum()))
    assert chosen_stale == sorted(chosen_stale) and chosen_stale[-1] > chosen_stale[0], chosen_stale


@pytest.mark.parametrize("cache_each_step", [True, False])
def test_cache_refresh_cadence(tiny_pipe, monkeypatch, cache_each_step):
    """cache_each_step=False blends merged tokens with the last *protected* step's output, True with the last step's."""
    from sdtm_plugin.methods import SDTM

    events = []  # (step, protected, storage of the cache blended in, storage of the output returned, output)
    original = SDTM.finish

    def finish(self, slot, name, merge, output, store):
        shape = torch.Size((output.shape[0], merge.num_tokens, output.shape[-1])) if merge is not None else None
        used = slot.buffers.cached_output(name, shape, output.device) if merge is not None else None
        out = original(self, slot, name, merge, output, store)
        if slot.index == 1 and name == "mlp":
            plan = state.plan
            events.append((plan.step, plan.protected, used.data_ptr() if used is not None else None, out.data_ptr(),
                           out))  # the outputs stay referenced, so no storage is reused
        return out

    monkeypatch.setattr(SDTM, "finish", finish)
    apply_SDTM(tiny_pipe, protect_steps_frequency=4, cache_each_step=cache_each_step, switch_step=0)
    state = get_merge_state(tiny_pipe)
    generate(tiny_pipe, steps=12)
    outputs = {step: out_id for step, _, _, out_id, _ in events}
    for step, protected, used, _, _ in events:
        if protected or step == 0:
            continue
        source = step - 1 if cache_each_step else 4 * (step // 4)
        assert used == outputs[source], (step, source)


def test_larger_mcw_moves_merged_outputs_away_from_the_cache():
    from sdtm_plugin.grid import WindowGrid
    from sdtm_plugin.merge import window_merge

    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(3))
    merge = window_merge(x, WindowGrid.build((8, 8), 2, 2, torch.device("cpu")), 6)
    y = merge.merge(x) * 3.0
    cache = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(4))
    merged = merge.merged
    distances = [float((merge.unmerge(y, cache, mcw) - cache)[merged].norm()) for mcw in (0.0, 0.1, 0.5, 1.0)]
    assert distances[0] == 0.0 and distances == sorted(distances) and distances[-1] > distances[1]
    for mcw in (0.0, 0.5):  # tokens computed on their own never see the cache
        assert torch.equal(merge.unmerge(y, cache, mcw)[~merged], merge.unmerge(y)[~merged])


def test_fast_preset_merges_every_step_without_a_cache(tiny_pipe):
    cfg = SDTMConfig.fast()
    assert (cfg.ratio, cfg.protect_steps_frequency, cfg.mcw) == (0.35, -1, 1.0) and not cfg.uses_cache
    assert SDTMConfig.fast(ratio=0.5).ratio == 0.5
    apply_SDTM(tiny_pipe, cfg)
    seen, handles = record_counts(tiny_pipe)
    cached = []

    def count_cached(step, timestep, latents):
        streams = get_merge_state(tiny_pipe)._streams.values()
        cached.append(sum(stream.num_cached for stream in streams))

    generate(tiny_pipe, steps=10, callback=count_cached)
    for h in handles:
        h.remove()
    assert per_step(seen) == expected_counts(10, ratio=0.35, deviation=cfg.effective_deviation, protect=-1)
    # every step merges and nothing is blended, so no merge cache is ever stored
    assert all(all(n < N for n in step["mlp"]) for step in get_merge_state(tiny_pipe).token_counts)
    assert cached == [0] * 10


@pytest.mark.parametrize("overrides", [dict(use_rand=False), dict(use_rand=False, a_d=0.0, a_s=0.0),
                                       dict(use_rand=False, structure_merge="bipartite", prior="bounded"),
                                       dict(idm_destination="random")])
def test_staleness_terms_derived_before_the_forward_equal_each_blocks_own(tiny_pipe, monkeypatch, overrides):
    """SDTM derives P_fre and the destinations of all blocks before the forward (`SDTM.derive`); each block must get
    what it would derive from its own counters and draws at its own merge (they change only after it)."""
    from sdtm_plugin.methods import SDTM
    from sdtm_plugin.schedule import Phase

    checked = []
    original = SDTM.build

    def build(self, slot, x, plan):
        own = slot.buffers.staleness(x.shape[0], x.shape[1], x.device).clone()
        expected = self._staleness_terms(slot.window_grid, plan, own, slot.noise)
        got = slot.derived
        merge = original(self, slot, x, plan)
        if merge is None:
            return merge
        assert slot.derived_batch == x.shape[0]
        for name in ("window_priority", "priority"):
            a, b = getattr(got, name), getattr(expected, name)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
        assert (got.destinations is None) == (expected.destinations is None)
        if got.destinations is not None:
            assert torch.equal(got.destinations.rows, expected.destinations.rows)
            assert torch.equal(got.destinations.source_bias, expected.destinations.source_bias)
        checked.append((plan.phase, bool(own.any())))
        return merge

    monkeypatch.setattr(SDTM, "build", build)
    apply_SDTM(tiny_pipe, **overrides)
    generate(tiny_pipe, steps=10)
    phases = {phase for phase, _ in checked}
    assert phases == {Phase.STRUCTURE, Phase.DETAIL} and any(stale for _, stale in checked)


def test_faithful_preset_only_flips_the_prior():
    paper, faithful = SDTMConfig(), SDTMConfig.faithful()
    assert (faithful.a_s, faithful.a_d) == (-0.5, -0.5)
    assert {k: v for k, v in vars(faithful).items() if k not in ("a_s", "a_d")} == {
        k: v for k, v in vars(paper).items() if k not in ("a_s", "a_d")}
    assert (SDTMConfig().a_s, SDTMConfig().a_d, SDTMConfig().mcw) == (0.05, 0.05, 0.1)  # paper defaults untouched
