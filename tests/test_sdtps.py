import pytest
import torch
import torch.nn.functional as F

from token_modules.sdtps import MultiModalSDTPS
from token_modules.selection import minmax_normalize

MODS = ("rgb", "nir", "tir")


def _inputs(b=2, n=16, c=8, mods=MODS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        {m: torch.randn(b, n, c, generator=g) for m in mods},
        {m: torch.randn(b, c, generator=g) for m in mods},
    )


def _model(**kw):
    torch.manual_seed(0)
    kw.setdefault("dim", 8)
    kw.setdefault("num_patches", 16)
    return MultiModalSDTPS(**kw)


def test_default_shapes_128_to_26():
    model = _model(dim=512, num_patches=128)
    p, g = _inputs(b=1, n=128, c=512)
    out = model(p, g)
    assert model.num_aggregated == 25 and model.num_out_tokens == 26
    for m in MODS:
        assert out.tokens[m].shape == (1, 26, 512)
        assert out.masks[m].shape == (1, 128) and out.masks[m].sum() == 64


def test_fused_score_matches_hand_computation_with_cross_modal_globals():
    model = _model()
    p, g = _inputs()
    out = model(p, g)
    cos = lambda x, y: F.cosine_similarity(x, y[:, None], dim=-1)  # noqa: E731
    mm = minmax_normalize
    for m in MODS:
        o1, o2 = (o for o in MODS if o != m)
        sp = torch.sigmoid(model.sparse[m].predictor(p[m])).squeeze(-1)
        expected = 0.5 * sp + 0.25 * (mm(cos(p[m], g[o1])) + mm(cos(p[m], g[o2])) + 2 * mm(cos(p[m], g[m])))
        assert torch.allclose(out.scores[m], expected, atol=1e-5)


def test_cross_modal_guidance_is_live():
    model = _model()
    p, g = _inputs()
    base = model(p, g)
    g2 = dict(g, nir=torch.randn(2, 8, generator=torch.Generator().manual_seed(9)))
    changed = model(p, g2)
    assert not torch.equal(changed.masks["rgb"], base.masks["rgb"])  # NIR's global guides RGB's selection
    assert not torch.equal(changed.masks["tir"], base.masks["tir"])
    assert not torch.allclose(changed.scores["rgb"], base.scores["rgb"])


def test_patch_permutation_permutes_masks_and_keeps_tokens():
    model = _model()
    p, g = _inputs()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    a = model(p, g)
    b = model({m: x[:, perm] for m, x in p.items()}, g)
    for m in MODS:
        assert torch.equal(b.masks[m], a.masks[m][:, perm])
        assert torch.allclose(b.tokens[m], a.tokens[m], atol=1e-5)  # selection + aggregation is a set function


def test_two_modalities_and_batch_equivariance():
    model = _model(modalities=("a", "b"))
    p, g = _inputs(b=4, mods=("a", "b"))
    out = model(p, g)
    rev = model({m: x.flip(0) for m, x in p.items()}, {m: x.flip(0) for m, x in g.items()})
    for m in ("a", "b"):
        assert out.tokens[m].shape == (4, model.num_out_tokens, 8)
        assert torch.allclose(rev.tokens[m], out.tokens[m].flip(0), atol=1e-5)


def test_patches_globals_and_all_modules_get_gradients():
    model = _model()
    p, g = _inputs()
    for x in (*p.values(), *g.values()):
        x.requires_grad_(True)
    out = model(p, g)
    sum(t.pow(2).mean() for t in out.tokens.values()).backward()
    for m in MODS:
        assert p[m].grad.abs().sum() > 0 and g[m].grad.abs().sum() > 0
    for name, prm in model.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name


def test_gumbel_straight_through_trains_predictors_from_masks():
    model = _model(use_gumbel=True, gumbel_tau=0.5).train()
    p, g = _inputs()
    out = model(p, g, generator=torch.Generator().manual_seed(0))
    for m in MODS:
        assert out.masks[m].detach().sum(-1).eq(8).all()
    sum(t.pow(2).mean() for t in out.tokens.values()).backward()
    gn = torch.stack([q.grad.norm() for q in model.parameters()]).norm()
    assert torch.isfinite(gn) and gn < 1e3


def test_validation_errors_name_the_parameter():
    p, g = _inputs()
    model = _model()
    with pytest.raises(ValueError, match="modalities must be >= 2"):
        _model(modalities=("rgb",))
    with pytest.raises(ValueError, match=r"sparse_ratio must be in \(0, 1\]"):
        _model(sparse_ratio=0.0)
    with pytest.raises(ValueError, match=r"aggr_ratio must be in \(0, 1\]"):
        _model(aggr_ratio=1.2)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\]"):
        _model(beta=-0.1)
    with pytest.raises(ValueError, match="N_c >= 1"):
        _model(num_patches=4, sparse_ratio=0.5, aggr_ratio=0.2)
    with pytest.raises(ValueError, match=r"patches\['nir'\] must be \(B, N, C\)"):
        model(dict(p, nir=p["nir"][:, :-1]), g)
    with pytest.raises(ValueError, match=r"globals_\['tir'\] must be \(B, C\)"):
        model(p, dict(g, tir=g["tir"][:1]))
    with pytest.raises(ValueError, match="exactly the modalities"):
        model({"rgb": p["rgb"]}, g)


# --- missing modalities: `present` masks (module docstring) ---


def _absent_nir(b=3):
    """NIR absent in sample 0, NIR and TIR absent in sample 1, all present in sample 2."""
    present = {"nir": torch.tensor([False, False, True][:b]), "tir": torch.tensor([True, False, True][:b])}
    return present


@pytest.mark.parametrize("guidance", ["global", "aligned"])
def test_missing_modality_values_do_not_influence_any_output(guidance):
    model = _model(guidance=guidance)
    p, g = _inputs(b=3)
    present = _absent_nir()
    outs = []
    for fill in (0.0, float("nan"), 1e6):  # absent entries filled with zeros, NaN or huge noise
        pf, gf = dict(p), dict(g)
        pf["nir"], gf["nir"] = p["nir"].clone(), g["nir"].clone()
        pf["nir"][:2], gf["nir"][:2] = fill, fill
        pf["tir"], gf["tir"] = p["tir"].clone(), g["tir"].clone()
        pf["tir"][1], gf["tir"][1] = fill, fill
        outs.append(model(pf, gf, present=present))
    for out in outs:
        for m in MODS:
            assert torch.isfinite(out.tokens[m]).all() and torch.isfinite(out.scores[m]).all()
            assert torch.equal(out.tokens[m], outs[0].tokens[m])
            assert torch.equal(out.masks[m], outs[0].masks[m])
            assert torch.equal(out.scores[m], outs[0].scores[m])
    out = outs[0]
    # absent -> zero tokens, nothing selected, zero score; present rows keep exactly K selected
    assert torch.equal(out.tokens["nir"][:2], torch.zeros(2, model.num_out_tokens, 8))
    assert out.masks["nir"][:2].sum() == 0 and out.scores["nir"][:2].abs().sum() == 0
    assert out.masks["tir"][1].sum() == 0
    assert out.masks["rgb"].sum(-1).eq(8).all() and out.masks["nir"][2].sum() == 8


def test_missing_modality_guidance_uses_present_globals_only():
    model = _model()
    p, g = _inputs(b=3)
    out = model(p, g, present=_absent_nir())
    cos = lambda x, y: F.cosine_similarity(x, y[:, None], dim=-1)  # noqa: E731
    mm = minmax_normalize
    sp = torch.sigmoid(model.sparse["rgb"].predictor(p["rgb"])).squeeze(-1)
    s_im, s_nir, s_tir = mm(cos(p["rgb"], g["rgb"])), mm(cos(p["rgb"], g["nir"])), mm(cos(p["rgb"], g["tir"]))
    # sample 0: NIR absent -> the cross term is TIR's alone, with the full cross weight 2 beta
    assert torch.allclose(out.scores["rgb"][0], 0.5 * sp[0] + 0.5 * s_im[0] + 0.5 * s_tir[0], atol=1e-5)
    # sample 1: no other modality -> the cross weight moves to the own global: (1-2b) s^p + 4b s^im
    assert torch.allclose(out.scores["rgb"][1], 0.5 * sp[1] + 1.0 * s_im[1], atol=1e-5)
    # sample 2: all present -> the seeds' formula
    full = 0.5 * sp[2] + 0.25 * (s_nir[2] + s_tir[2] + 2 * s_im[2])
    assert torch.allclose(out.scores["rgb"][2], full, atol=1e-5)


def test_all_present_equals_no_mask_and_samples_stay_independent():
    model = _model()
    p, g = _inputs(b=3)
    base = model(p, g)
    ones = {m: torch.ones(3, dtype=torch.bool) for m in MODS}
    allp = model(p, g, present=ones)
    for m in MODS:
        assert torch.allclose(allp.tokens[m], base.tokens[m], atol=1e-6) and torch.equal(allp.masks[m], base.masks[m])
    # the all-present sample 2 of a mixed batch equals that sample run alone without masks
    mixed = model(p, g, present=_absent_nir())
    alone = model({m: x[2:] for m, x in p.items()}, {m: x[2:] for m, x in g.items()})
    for m in MODS:
        assert torch.allclose(mixed.tokens[m][2:], alone.tokens[m], atol=1e-5)
        assert torch.equal(mixed.masks[m][2:], alone.masks[m])


def test_missing_modality_gradients_are_finite_and_zero_for_absent_inputs():
    model = _model()
    p, g = _inputs(b=3)
    p["nir"][:2] = float("nan")
    g["nir"][:2] = float("nan")
    for x in (*p.values(), *g.values()):
        x.requires_grad_(True)
    out = model(p, g, present=_absent_nir())
    sum(t.pow(2).mean() for t in out.tokens.values()).backward()
    for x in (*p.values(), *g.values()):
        assert torch.isfinite(x.grad).all()
    assert p["nir"].grad[:2].abs().sum() == 0 and g["nir"].grad[:2].abs().sum() == 0
    assert p["nir"].grad[2].abs().sum() > 0  # the present NIR sample still trains
    for name, prm in model.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all() and prm.grad.abs().sum() > 0, name


def test_present_validation_errors():
    model = _model()
    p, g = _inputs()
    with pytest.raises(ValueError, match=r"present\['nir'\] must be a bool tensor of shape \(B,\) = \(2,\)"):
        model(p, g, present={"nir": torch.tensor([1, 0])})
    with pytest.raises(ValueError, match=r"present\['nir'\] must be a bool tensor of shape \(B,\)"):
        model(p, g, present={"nir": torch.tensor([True, False, True])})
    with pytest.raises(ValueError, match="present has unknown modalities"):
        model(p, g, present={"depth": torch.tensor([True, False])})


def test_demo_class_retrieval_map_and_rank1_hand_computed():
    from token_modules.demos.common import class_retrieval

    # one query (label 0) against a gallery ranked [0, 1, 0] by cosine: AP = (1/1 + 2/3) / 2, R@1 = 100
    feat = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1, 0])
    query = torch.tensor([True, False, False, False])
    r = class_retrieval(feat, labels, query)
    assert abs(r["mAP"] - 100 * (1 + 2 / 3) / 2) < 1e-4 and r["R@1"] == 100.0
    # a gallery ranked [1, 0, 0]: R@1 = 0, AP = (1/2 + 2/3) / 2
    feat2 = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    r = class_retrieval(feat2, torch.tensor([0, 1, 0, 0]), query)
    assert abs(r["mAP"] - 100 * (1 / 2 + 2 / 3) / 2) < 1e-4 and r["R@1"] == 0.0


def test_demo_task_puts_the_identity_at_one_place_in_every_modality_unless_blinded():
    from token_modules.demos.sdtps import TaskConfig, make_data

    task = TaskConfig(test_digits=60, views_per_train_digit=1, blind_prob=0.5)
    train, test = make_data(task)
    for split in (train, test):
        ident, blinded = split.identity, split.blinded  # (M, S, N), (M, S)
        assert ident.shape == (3, len(split.labels), task.num_patches)
        assert blinded.sum(0).le(1).all()  # at most one modality blinded per sample
        assert not ident[blinded].any()  # a blinded modality shows no identity ink
        seen = ~blinded
        # the union over the seeing modalities equals each seeing modality's mask: one place in all of them
        union = (ident & seen[..., None]).any(0)
        assert (ident == union).logical_or(~seen[..., None]).all()
        assert union.sum(-1).gt(0).all()
        # the distractor takes another cell: with the jitter they share at most the patches of one boundary strip
        overlap = (split.identity & split.distractor).sum(-1)
        assert overlap.max() <= 2 * (task.cell // task.patch + 1)
    assert 0.35 < test.blinded.any(0).float().mean() < 0.65


def test_aligned_guidance_keeps_what_every_modality_has_at_the_same_place():
    """Patches 2 and 5 hold the same content in all three modalities, the others each modality's own clutter; the
    globals are orthogonal to every patch, so only the cross-modal term can tell them apart (beta = 0.5: no
    predictor). Aligned guidance keeps exactly the shared patches; global guidance scores every patch alike."""
    b, n, c = 2, 8, 16
    g = torch.Generator().manual_seed(0)
    patches = {m: torch.randn(b, n, c, generator=g) for m in MODS}
    shared = torch.randn(b, 2, c, generator=g)
    for m in MODS:
        patches[m][:, [2, 5]] = shared
        patches[m][:, :, 0] = 0.0  # orthogonal to the globals
    globals_ = {m: torch.zeros(b, c).index_fill_(1, torch.tensor([0]), 1.0) for m in MODS}
    kw = dict(dim=c, num_patches=n, sparse_ratio=0.25, aggr_ratio=0.5, beta=0.5)
    aligned = _model(guidance="aligned", **kw)(patches, globals_)
    pooled = _model(**kw)(patches, globals_)
    for m in MODS:
        assert aligned.masks[m].nonzero()[:, 1].tolist() == [2, 5, 2, 5]
        assert torch.equal(pooled.scores[m], torch.zeros_like(pooled.scores[m]))
    with pytest.raises(ValueError, match="guidance must be one of"):
        _model(guidance="local")
