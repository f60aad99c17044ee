"""SDTM options beyond the paper (signed / bounded staleness prior, destination rule, structure merge, attention in
the detail phase, protected first / last blocks, plans shared over blocks): each moves the result in its documented
direction."""

import dataclasses
import math

import pytest
import torch
from conftest import generate, quiet_pipeline
from test_sdtm_pipeline import _build, expected_counts, per_step, record_counts

from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs
from sdtm_plugin import SDTMConfig, ToMeConfig, apply_SDTM
from sdtm_plugin.grid import WindowGrid
from sdtm_plugin.merge import staleness_priority, window_medoid_scores
from sdtm_plugin.methods import SDTM
from sdtm_plugin.schedule import Phase
from sdtm_plugin.selection import guidance_energy, guidance_scores

CPU = torch.device("cpu")


def test_paper_defaults_are_unchanged():
    paper = dict(ratio=0.3, deviation=None, switch_step=20, use_rand=True, sx=2, sy=2, a_s=0.05, a_d=0.05,
                 prior="linear", idm_destination="stalest", structure_merge="window", detail_merge_attn=False,
                 mcw=0.1, protect_steps_frequency=3, protect_layers_frequency=-1, protect_first_layers=0,
                 protect_last_layers=0, merge_attn=True, merge_mlp=True, cache_each_step=True, seed=0, plan_blocks=1)
    assert {k: v for k, v in dataclasses.asdict(SDTMConfig()).items() if k in paper} == paper
    assert SDTMConfig().effective_deviation == 0.2  # unset: the paper's 0.2 where it fits the ratio
    # the defaults that are not the paper's: a few static token budgets (None: the paper's per-step counts) and
    # matching on 128-channel sketches (None: every channel); ToMe keeps tomesd's exact matching
    assert SDTMConfig().token_budgets == 4 and SDTMConfig().match_dim == 128 and ToMeConfig().match_dim is None


@pytest.mark.parametrize("channels", [64, 128, 256])
def test_default_matching_is_exact_up_to_128_channels_and_sketched_beyond(channels):
    x = torch.randn(2, 64, channels, generator=torch.Generator().manual_seed(3))
    staleness = torch.zeros(2, 64, dtype=torch.int32)

    def plan(**fields):
        return _build(SDTMConfig(use_rand=False, **fields), Phase.DETAIL, x, staleness, 0.4)[0].merged

    assert torch.equal(plan(), plan(match_dim=128))
    assert torch.equal(plan(), plan(match_dim=None)) == (channels <= 128)

@pytest.mark.parametrize("field, value, match", [
    ("prior", "log", "prior must be one of"), ("idm_destination", "first", "idm_destination must be one of"),
    ("structure_merge", "tile", "structure_merge must be one of"), ("a_s", float("nan"), "a_s must be"),
    ("protect_first_layers", -1, "protect_first_layers must be"), ("detail_merge_attn", 1, "detail_merge_attn"),
    ("plan_blocks", 0, "plan_blocks must be"), ("token_budgets", 0, r"token_budgets must be an integer >= 1 or None"),
    ("token_budgets", 2.5, "token_budgets must be"), ("match_dim", 4, r"match_dim must be an integer >= 8"),
    ("match_dim", 64.0, "match_dim must be"), ("match_radius", 0, r"match_radius must be an integer >= 1"),
    ("st", 0, r"st must be an integer >= 1"),
])
def test_option_errors_name_the_field_and_its_range(field, value, match):
    with pytest.raises(ValueError, match=match):
        SDTMConfig(**{field: value})


def _idm_merged_stale(a_d, prior="linear"):
    x = torch.randn(4, 64, 16, generator=torch.Generator().manual_seed(1))
    staleness = torch.zeros(4, 64, dtype=torch.int32)
    staleness[:, ::2] = 5
    merge, grid = _build(SDTMConfig(a_d=a_d, prior=prior, use_rand=False), Phase.DETAIL, x, staleness, 0.25)
    sources = merge.merged.clone()
    sources[:, grid.window_tokens[:, 0]] = False
    return int((sources & staleness.bool()).sum())


def test_a_negative_prior_makes_stale_tokens_less_likely_to_merge():
    assert _idm_merged_stale(-2.0) < _idm_merged_stale(0.0) < _idm_merged_stale(2.0)
    assert _idm_merged_stale(-2.0, "bounded") < _idm_merged_stale(0.0, "bounded") < _idm_merged_stale(2.0, "bounded")


def test_bounded_prior_saturates_below_one():
    t = torch.tensor([[0, 1, 3, 100]], dtype=torch.int32)
    bounded = staleness_priority(t, "bounded")
    assert bounded[0, 0] == 0 and (bounded < 1).all() and (bounded.diff() > 0).all()
    assert staleness_priority(t)[0, -1] > 3  # the linear form is unbounded


def test_destination_rules():
    grid = WindowGrid.build((4, 4), 2, 2, CPU)
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(5))
    for w, tokens in enumerate(grid.window_tokens.tolist()):  # in each window, token w % 4 is an outlier
        base = torch.randn(8, generator=torch.Generator().manual_seed(w))
        for p, t in enumerate(tokens):
            x[0, t] = -base if p == w % 4 else base + 0.05 * torch.randn(8)
    staleness = torch.zeros(1, 16, dtype=torch.int32)
    staleness[0, grid.window_tokens[:, 2]] = 4  # position 2 is the stalest everywhere

    def chosen(rule, seed=0):
        method = SDTM(SDTMConfig(idm_destination=rule, use_rand=True), 1)
        noise = torch.rand(1, grid.num_windows, grid.window_size, generator=torch.Generator().manual_seed(seed))
        choice = method.destination_choice(grid, staleness.float(), noise)
        return choice.argmax(-1)[0].tolist()

    assert chosen("stalest") == [2, 2, 2, 2]
    assert SDTM(SDTMConfig(idm_destination="similar"), 1).destination_choice(grid, staleness.float(), None) is None
    similar = window_medoid_scores(x, grid).argmax(-1)[0].tolist()  # what each block derives from its input
    assert all(pos != w % 4 for w, pos in enumerate(similar))  # never the outlier
    draws = {tuple(chosen("random", seed)) for seed in range(6)}
    assert len(draws) > 1  # random destinations follow the generator


def test_guidance_scores_measure_the_guidance_difference_per_token():
    """IBTM's score of a token: |eps_c - eps_u|^2 over channels, averaged over its patch; spatial and token layouts
    agree; the halves' order does not matter; an odd batch (no unconditional half) and an output off the grid raise."""
    torch.manual_seed(0)
    uncond = torch.randn(2, 4, 8, 8)
    cond = uncond.clone()
    cond[0, :, 2:4, 6:8] += 3.0  # image 0: the token at grid (1, 3) of a 4x4 grid with 2x2 patches
    cond[1, 1, 0, 0] += 1.0  # image 1: token (0, 0), one pixel of its patch
    energy = guidance_energy(torch.cat([uncond, cond]), (4, 4))
    assert energy.shape == (2, 1, 8, 8)
    scores = guidance_scores(energy, (4, 4))
    assert scores.shape == (2, 16) and scores[0].argmax() == 1 * 4 + 3 and scores[1].argmax() == 0
    torch.testing.assert_close(scores[0, 7], torch.tensor(4 * 9.0))  # every pixel of the patch, 4 channels
    torch.testing.assert_close(scores[1, 0], torch.tensor(1.0 / 4))
    torch.testing.assert_close(guidance_scores(guidance_energy(torch.cat([cond, uncond]), (4, 4)), (4, 4)), scores)
    tokens = lambda x: x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 16)  # (B, N, C·4)
    torch.testing.assert_close(guidance_scores(guidance_energy(torch.cat([tokens(uncond), tokens(cond)]), (4, 4)),
                                               (4, 4)), scores * 4)
    with pytest.raises(ValueError, match="idm_destination='guidance'"):
        guidance_energy(torch.randn(3, 4, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="does not lie on the 4x4 token grid"):  # 15 tokens, not 16
        guidance_energy(torch.randn(2, 15, 8), (4, 4))
    with pytest.raises(ValueError, match="does not lie on the 2x4x4 token grid"):  # a spatial output of an image
        guidance_energy(torch.randn(2, 4, 8, 8), (2, 4, 4))


def test_guidance_destinations_follow_the_previous_steps_guidance(tiny_pipe):
    """IBTM on a pipeline: each forward after the first chooses, in every window, the token with the largest
    guidance score of the previous forward's output (the unconditional and conditional images of a prompt alike);
    the first forward, with no output yet, chooses as "similar" does."""
    outputs, chosen = [], []
    tiny_pipe.transformer.register_forward_hook(lambda _, args, out: outputs.append(out[0].detach().clone()))
    derive = SDTM.derive

    def spy(self, grid, plan, buffers, batch, noise):
        terms = derive(self, grid, plan, buffers, batch, noise)
        chosen.append((plan.step, grid, terms[0].destinations))
        return terms

    SDTM.derive = spy
    try:
        apply_SDTM(tiny_pipe, idm_destination="guidance", protect_steps_frequency=-1)
        merged = generate(tiny_pipe)
    finally:
        SDTM.derive = derive
    bipartite = [(step, grid, d) for step, grid, d in chosen if d is not None or step == 0]
    assert bipartite and all(d is None for step, _, d in bipartite if step == 0)
    checked = 0
    for step, grid, destinations in bipartite:
        if step == 0:
            continue
        scores = guidance_scores(guidance_energy(outputs[step - 1], grid.grid), grid.grid)
        scores = torch.cat([scores, scores])
        best = grid.per_window(scores).amax(-1).flatten()
        torch.testing.assert_close(scores.flatten()[destinations.rows], best)
        checked += 1
    assert checked >= 3
    apply_SDTM(tiny_pipe, protect_steps_frequency=-1)  # the default rule ("stalest") merges other tokens
    assert not torch.equal(merged, generate(tiny_pipe))


def test_guidance_destinations_need_classifier_free_guidance(tiny_pipe_dir):
    """Without an unconditional half there is no guidance difference: a pipeline that says so (FLUX's distilled
    guidance, SD3 at guidance_scale 1) and an odd batch both raise, naming the option."""
    pipe = quiet_pipeline("tiny-sd3", tiny_pipe_dir)
    apply_SDTM(pipe, idm_destination="guidance")
    with pytest.raises(ValueError, match="idm_destination='guidance'"):
        pipe("a red cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0, output_type="latent",
             max_sequence_length=16)
    pipe("a red cat", height=64, width=64, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
         max_sequence_length=16)  # with guidance it runs
    transformer = build_denoiser(PRESETS["tiny"]).eval()
    apply_SDTM(transformer, idm_destination="guidance", num_inference_steps=4)
    inputs = denoiser_inputs(PRESETS["tiny"], batch_size=3)
    with pytest.raises(ValueError, match="idm_destination='guidance'"), torch.no_grad():
        transformer(**inputs)


def test_bipartite_structure_merge_removes_as_many_tokens_but_not_whole_windows():
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(7))
    staleness = torch.zeros(2, 64, dtype=torch.int32)
    window, grid = _build(SDTMConfig(), Phase.STRUCTURE, x, staleness, 0.3)
    bipartite, _ = _build(SDTMConfig(structure_merge="bipartite"), Phase.STRUCTURE, x, staleness, 0.3)
    assert window.num_rows == bipartite.num_rows  # matched token counts, so matched MACs
    whole = lambda m: bool(((m.merged[:, grid.window_tokens].sum(-1) % 4) == 0).all())  # noqa: E731
    assert whole(window) and not whole(bipartite)


def test_detail_phase_attention_and_protected_first_and_last_blocks(tiny_pipe):
    steps = 10
    apply_SDTM(tiny_pipe, detail_merge_attn=True, protect_first_layers=1, protect_last_layers=1)
    seen, handles = record_counts(tiny_pipe)
    generate(tiny_pipe, steps=steps)
    for h in handles:
        h.remove()
    paper = expected_counts(steps)
    for i, row in enumerate(per_step(seen)):
        assert row[0] == row[3] == (64, 64)  # protected blocks
        for layer in (1, 2):
            attn, mlp = row[layer]
            assert mlp == paper[i][layer][1]
            assert attn == (mlp if i * 50 > 20 * steps else paper[i][layer][0]), (i, layer)  # detail: shared merge


def _merges_per_block(pipe, steps=10, **params):
    """Per step, the merge (TokenMerge) each block's sub-layers used, seen from the outside: the merge hook passes
    the same object to every sub-layer of a block, so one forward hook per block reads the last one used."""
    from sdtm_plugin.merge import TokenMerge

    used, order = [], []
    original = TokenMerge.merge

    def spy(self, x):
        used.append(self)
        return original(self, x)

    apply_SDTM(pipe, **params)
    blocks = pipe.transformer.transformer_blocks
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: order.append((i, len(used)))) for i, b in enumerate(blocks)]
    TokenMerge.merge = spy
    try:
        latents = generate(pipe, steps=steps)
    finally:
        TokenMerge.merge = original
        for h in handles:
            h.remove()
    ends = [start for _, start in order[1:]] + [len(used)]
    per_forward = [{} for _ in range(len(order) // len(blocks))]
    for k, ((block, start), end) in enumerate(zip(order, ends)):
        per_forward[k // len(blocks)][block] = used[start:end]
    return per_forward, latents


def test_plan_blocks_share_one_plan_over_consecutive_merged_blocks(tiny_pipe):
    builds = []
    original = SDTM.build
    SDTM.build = lambda self, *a, **k: builds.append(1) or original(self, *a, **k)
    try:
        shared, latents = _merges_per_block(tiny_pipe, plan_blocks=2, protect_first_layers=1)
        own, reference = _merges_per_block(tiny_pipe, plan_blocks=1, protect_first_layers=1)
    finally:
        SDTM.build = original
    merged_forwards = 0
    for forward in shared:
        assert forward[0] == []  # protected
        if not forward[1]:
            assert forward[2] == forward[3] == []  # a protected step
            continue
        merged_forwards += 1
        # blocks 1 and 2 (consecutive merged blocks) use one merge; block 3 starts a new plan
        assert all(m is forward[1][0] for m in forward[1] + forward[2])
        assert all(m is forward[3][0] for m in forward[3]) and forward[3][0] is not forward[1][0]
    for forward in own:
        if forward[1]:
            assert len({id(forward[b][0]) for b in (1, 2, 3)}) == 3
    assert merged_forwards > 0 and len(builds) == 2 * merged_forwards + 3 * merged_forwards
    assert not torch.equal(latents, reference)


@pytest.mark.parametrize("model", ["tiny", "tiny-flux", "tiny-wan"])
def test_keys_only_merging_keeps_every_query(model):
    """merge_queries=False: in the structure phase the attention's key and value projections see the merged rows,
    its query projection every token, and its output is whole (nothing unmerged or blended there); the MLP still
    merges. Removal is exact."""
    from benchmarks.models import PRESETS, build_denoiser, denoiser_inputs
    from sdtm_plugin import get_merge_state, remove_SDTM

    torch.manual_seed(0)
    transformer = build_denoiser(PRESETS[model]).eval()
    inputs = denoiser_inputs(PRESETS[model], batch_size=2)
    rows: dict[str, list[int]] = {}
    attn = next(m for m in transformer.modules() if hasattr(m, "to_q") and hasattr(m, "to_k"))
    for name in ("to_q", "to_k", "to_v"):
        getattr(attn, name).register_forward_hook(lambda _, a, out, name=name: rows.setdefault(name, []).append(
            out.shape[1]))
    outputs = []
    attn.register_forward_hook(lambda _, a, out: outputs.append((out[0] if isinstance(out, tuple) else out).shape[1]))
    with torch.no_grad():
        base = transformer(**inputs, return_dict=False)[0]
        apply_SDTM(transformer, merge_queries=False, num_inference_steps=10)
        for _ in range(3):
            transformer(**inputs)
    tokens = math.prod(get_merge_state(transformer).grid)
    phases = [r.phase for r in get_merge_state(transformer).records]
    assert phases == ["full", "structure", "structure"]
    assert rows["to_q"][1:] == [tokens] * 3 and rows["to_k"][1] == tokens and rows["to_k"][2] < tokens
    assert rows["to_v"] == rows["to_k"] and set(outputs[1:]) == {tokens}
    assert get_merge_state(transformer).method.cache_roles(
        dataclasses.replace(get_merge_state(transformer).plan, protected=True)) == ("mlp",)
    remove_SDTM(transformer)
    with torch.no_grad():
        assert torch.equal(transformer(**inputs, return_dict=False)[0], base)


def test_keys_only_merging_needs_attention_merging():
    with pytest.raises(ValueError, match="merge_queries"):
        SDTMConfig(merge_queries=False, merge_attn=False)
    with pytest.raises(ValueError, match="merge_queries"):
        SDTMConfig(merge_queries=0)
