import pytest
import torch
import torch.nn.functional as F

from token_modules.demos.common import count_macs
from token_modules.selection import aggregated_count, minmax_normalize
from token_modules.seps import SEPS, PatchWordAlignment, masked_mean

C, N = 8, 12


def _data(v=3, t=4, l=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(v, N, C, generator=g)
    caps = torch.randn(t, l, C, generator=g)
    cmask = torch.ones(t, l, dtype=torch.bool)
    cmask[0, 2:] = False
    cmask[-1, 4:] = False
    dense = torch.randn(v, 6, C, generator=g)
    return patches, caps, cmask, dense


def _model(**kw):
    torch.manual_seed(0)
    return SEPS(dim=C, num_patches=N, **kw)


def test_alignment_code_form_hand_computation():
    align = PatchWordAlignment(paper_form=False)
    tokens = torch.randn(2, 4, C)
    words = torch.randn(3, 5, C)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    s = align(tokens, words, mask)
    assert s.shape == (2, 3)
    for i in range(2):  # test-side reference
        for j in range(3):
            w = F.normalize(words[j][mask[j]], dim=-1)
            a = F.leaky_relu(w @ F.normalize(tokens[i], dim=-1).T, 0.1)
            assert torch.allclose(s[i, j], a.amax(1).mean() + a.amax(0).mean(), atol=1e-6)


def test_alignment_identical_single_token_gives_two_and_leaky_rescales_negatives():
    align = PatchWordAlignment()
    x = torch.randn(1, 1, C)
    assert torch.allclose(align(x, x.clone()), torch.tensor([[2.0]]))  # A = 1, both terms 1, summed
    assert torch.allclose(align(x, -x), torch.tensor([[-0.2]]))  # A = -1 -> -0.1 per term


def test_alignment_ignores_padded_words_and_is_permutation_invariant():
    for paper in (False, True):
        torch.manual_seed(0)
        align = PatchWordAlignment(paper_form=paper)
        tokens = torch.randn(2, 6, C)
        words = torch.randn(3, 5, C)
        mask = torch.ones(3, 5, dtype=torch.bool)
        mask[1, 3:] = False
        s = align(tokens, words, mask)
        words2 = words.clone()
        words2[1, 3:] = 100 * torch.randn(2, C)
        assert torch.allclose(align(tokens, words2, mask), s, atol=1e-6)
        shuffled = align(tokens[:, torch.randperm(6)], words[:, torch.randperm(5)], None)
        assert torch.allclose(shuffled, align(tokens, words, None), atol=1e-5)
        assert torch.allclose(align(tokens[:, torch.randperm(6)], words, mask), s, atol=1e-5)


def test_paper_scoring_hand_computation():
    model = _model(beta=0.25)
    patches, caps, cmask, dense = _data(v=3, t=3)
    _, sel = model.slim(patches, caps, cmask, dense)
    cos = lambda x, y: F.cosine_similarity(x, y[:, None], dim=-1)  # noqa: E731
    mm = minmax_normalize
    s_im = mm(cos(patches, patches.mean(1)))
    s_st = mm(cos(patches, masked_mean(caps, cmask)))
    s_dt = mm(cos(patches, dense.mean(1)))
    sp = torch.sigmoid(model.sparse.predictor(patches)).squeeze(-1)
    assert torch.allclose(sel.score, 0.5 * sp + 0.25 * (s_st + s_dt + 2 * s_im), atol=1e-5)


def test_code_scoring_is_raw_sum():
    model = _model(use_paper_version=False)
    assert model.sparse.predictor is None
    patches, caps, cmask, _ = _data(v=2, t=2)
    _, sel = model.slim(patches, caps, cmask)
    cos = lambda x, y: F.cosine_similarity(x, y[:, None], dim=-1)  # noqa: E731
    expected = cos(patches, patches.mean(1)) + cos(patches, masked_mean(caps, cmask))
    assert torch.allclose(sel.score, expected, atol=1e-5)


@pytest.mark.parametrize("paper", [True, False])
def test_similarity_shape_mask_and_caption_guided_selection(paper):
    model = _model(use_paper_version=paper)
    patches, caps, cmask, dense = _data()
    s = model(patches, caps, cmask, dense)
    assert s.shape == (3, 4) and torch.isfinite(s).all()
    # pairwise slimming: each entry equals slimming that one pair alone
    tok, sel = model.slim(patches[1:2], caps[2:3], cmask[2:3], dense[1:2])
    assert torch.allclose(s[1, 2], model.align(tok, caps[2:3], cmask[2:3])[0, 0], atol=1e-5)
    assert sel.mask.sum() == 6
    # padded words change neither selection nor similarity
    caps2 = caps.clone()
    caps2[0, 2:] = 50 * torch.randn(3, C)
    assert torch.allclose(model(patches, caps2, cmask, dense), s, atol=1e-5)


def test_caption_changes_selection():
    model = _model()
    patches, caps, cmask, dense = _data()
    pair = patches[:1].expand(2, -1, -1)
    _, a = model.slim(pair, torch.stack([caps[1], -caps[1]]), None, dense[:1].expand(2, -1, -1))
    assert not torch.equal(a.mask[0], a.mask[1])  # opposite captions guide to different patches


def test_dense_text_is_image_side_no_leakage():
    # S[i, j] may depend on image i's description only: changing image 0's description changes row 0 alone.
    model = _model()
    patches, caps, cmask, dense = _data()
    s = model(patches, caps, cmask, dense)
    dense2 = dense.clone()
    dense2[0] = torch.randn(6, C)
    s2 = model(patches, caps, cmask, dense2)
    assert not torch.allclose(s2[0], s[0])
    assert torch.allclose(s2[1:], s[1:], atol=1e-6)
    with pytest.raises(ValueError, match=r"dense must be \(3, L, C=8\)"):
        model(patches, caps, cmask, dense[:1].expand(4, -1, -1))  # one description per caption is refused


@pytest.mark.parametrize("paper", [True, False])
def test_patches_get_gradient(paper):
    model = _model(use_paper_version=paper)
    patches, caps, cmask, dense = _data()
    patches.requires_grad_(True)
    model(patches, caps, cmask, dense).sum().backward()
    assert patches.grad is not None and patches.grad.abs().sum() > 0  # the released code selects under no_grad
    if paper:
        for p in model.sparse.predictor.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_validation():
    model = _model()
    patches, caps, cmask, dense = _data()
    with pytest.raises(ValueError, match="patches must be"):
        model.slim(patches[:, :-1], caps[:3], cmask[:3])
    with pytest.raises(ValueError, match="captions_mask must be"):
        model(patches, caps, cmask[:, :-1])
    bad = cmask.clone()
    bad[1] = False
    with pytest.raises(ValueError, match="at least one real word"):
        model(patches, caps, bad)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        PatchWordAlignment(topk=0)


@pytest.mark.parametrize("paper", [True, False])
@pytest.mark.parametrize("with_dense", [True, False])
@pytest.mark.parametrize("gumbel", [False, True])
def test_batched_pairs_equal_the_per_pair_reference(paper, with_dense, gumbel):
    model = _model(use_paper_version=paper, use_gumbel=gumbel)
    patches, caps, cmask, dense = _data(v=3, t=5, seed=1)
    dense = dense if with_dense else None
    dmask = None
    if with_dense:
        dmask = torch.ones(3, 6, dtype=torch.bool)
        dmask[2, 3:] = False
    patches.requires_grad_(True)
    for training in (False, True):  # in training, Gumbel noise is drawn for the same (pairs, N) logits
        model.train(training)
        torch.manual_seed(3)
        s = model(patches, caps, cmask, dense, dmask)
        (grad,) = torch.autograd.grad(s.square().sum(), patches)
        torch.manual_seed(3)
        ref = model.reference_forward(patches, caps, cmask, dense, dmask)
        (ref_grad,) = torch.autograd.grad(ref.square().sum(), patches)
        torch.testing.assert_close(s, ref)
        torch.testing.assert_close(grad, ref_grad)


def test_batched_slim_pairs_equal_slim_of_each_pair():
    model = _model()
    patches, caps, cmask, dense = _data(v=2, t=3)
    tokens = model.slim_pairs(patches, caps, cmask, dense)
    assert tokens.shape == (2, 3, aggregated_count(N, 0.5, 0.4) + 1, C)
    for i, j in ((0, 0), (1, 2)):
        ref, _ = model.slim(patches[i:i + 1], caps[j:j + 1], cmask[j:j + 1], dense[i:i + 1])
        torch.testing.assert_close(tokens[i, j], ref[0])


@pytest.mark.parametrize("paper", [True, False])
def test_batched_pairs_cost_fewer_macs_per_pair_than_the_per_pair_path(paper):
    model = _model(use_paper_version=paper).eval()
    patches, caps, cmask, dense = _data(v=2, t=8)
    batched = count_macs(lambda: model(patches, caps, cmask, dense))
    per_pair = count_macs(lambda: model.reference_forward(patches, caps, cmask, dense))
    assert 0 < batched < per_pair


def test_slim_pairs_rejects_bad_shapes():
    model = _model()
    patches, caps, cmask, dense = _data()
    with pytest.raises(ValueError, match=r"patches must be \(B_v, N, C\) = \(B_v, 12, 8\)"):
        model.slim_pairs(patches[:, :-1], caps, cmask)
    with pytest.raises(ValueError, match=r"dense must be \(3, L, C=8\)"):
        model.reference_forward(patches, caps, cmask, dense[:2])


# --- demo helpers: retrieval metrics and caption relevance (token_modules.demos) ---


def test_recall_at_k_hand_made_matrices():
    from token_modules.demos.common import recall_at_k

    # 3 images, 2 captions each (caption t belongs to image t // 2)
    rel = torch.arange(3)[:, None] == (torch.arange(6) // 2)[None]
    perfect = rel.float() + 0.01 * torch.arange(6.0)  # every caption scores highest on its own image
    r = recall_at_k(perfect, rel)
    assert all(v == 100.0 for k, v in r.items() if k != "rsum") and r["rsum"] == 600.0
    worst = recall_at_k(-rel.float(), rel, ks=(1, 2))
    assert worst["i2t R@1"] == 0.0 and worst["t2i R@1"] == 0.0 and worst["t2i R@2"] == 0.0
    # i2t: image 0 ranks its caption 1 third (behind captions 2 and 3) -> a hit at K=3, not at K=2
    sim = torch.tensor([[0.0, 0.5, 0.9, 0.8, 0.1, 0.1]]).expand(3, -1).clone()
    r = recall_at_k(sim, rel, ks=(2, 3))
    assert r["i2t R@2"] == pytest.approx(100 / 3) and r["i2t R@3"] == pytest.approx(200 / 3)  # image 2: never
    # ties count against the query: every score equal -> no hit at K=1 in either direction
    tied = recall_at_k(torch.zeros(3, 6), rel, ks=(1,))
    assert tied["i2t R@1"] == 0.0 and tied["t2i R@1"] == 0.0
    assert recall_at_k(perfect, rel, ks=(1,))["rsum"] == 200.0
    with pytest.raises(ValueError, match="relevant must be a bool"):
        recall_at_k(perfect, rel.float())
    with pytest.raises(ValueError, match="at least one match in every row"):
        recall_at_k(perfect, rel & (torch.arange(6) < 4))


def test_demo_caption_relevance_ignores_fillers_and_needs_every_named_object():
    from token_modules.demos.seps import relevance

    cells = 16
    filler = 10 * cells
    objects = torch.tensor([[3, 20, 50, 70], [3, 21, 50, 99]])
    captions = torch.tensor([[filler, 3, filler + 1, 50], [filler, 20, filler + 1, 70], [filler, 3, filler + 1, 99]])
    expected = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.equal(relevance(objects, captions, cells), expected)


def test_demo_sweep_expands_to_valid_settings():
    from token_modules.demos.seps import BUDGETED, TASKS, VARIANTS, Setting, SweepConfig

    sweep = SweepConfig(budgets=((0.5, 0.4), (0.25, 0.4), (0.5, 0.4)), no_dense_budgets=((0.25, 0.4),))
    settings = sweep.expand(196)
    assert len(settings) == len(set(settings)) == 2 + 2 + 2 * 3  # the repeated budget runs once
    assert {s.variant for s in settings} == set(VARIANTS)
    for s in settings:
        assert not s.budgeted or aggregated_count(196, s.sparse_ratio, s.aggr_ratio) >= 1
        assert s.dense or s.variant.startswith("SEPS")  # the dense term is only switched for SEPS
    assert {(s.sparse_ratio, s.aggr_ratio, s.dense) for s in settings if s.variant == "SEPS paper"} == {
        (0.5, 0.4, True), (0.25, 0.4, True), (0.25, 0.4, False)}
    assert [s for s in settings if not s.budgeted] == [Setting("no slimming"), Setting("mean")]
    for name, spec in TASKS.items():  # the demo's own sweeps are valid, and grid196 has >= 196 patches
        assert all(s.variant in VARIANTS for s in spec.sweep.expand(spec.task.num_patches)), name
        assert any(s.variant in BUDGETED for s in spec.sweep.expand(spec.task.num_patches)), name
    assert TASKS["grid196"].task.num_patches >= 196 and TASKS["grid64"].task.num_patches == 64
    with pytest.raises(ValueError, match="N_c >= 1"):
        SweepConfig(budgets=((0.05, 0.1),), no_dense_budgets=()).expand(64)
    with pytest.raises(ValueError, match=r"sparse_ratio must be in \(0, 1\]"):
        SweepConfig(budgets=((1.5, 0.4),), no_dense_budgets=()).expand(64)
    with pytest.raises(ValueError, match="no_dense_budgets must be among budgets"):
        SweepConfig(budgets=((0.5, 0.4),), no_dense_budgets=((0.25, 0.4),)).expand(64)
    with pytest.raises(ValueError, match="variants must be among"):
        SweepConfig(variants=("SEPS",)).expand(64)
    with pytest.raises(ValueError, match="variant must be one of"):
        Setting("median")
