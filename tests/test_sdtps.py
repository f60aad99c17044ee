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
