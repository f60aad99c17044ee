import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from token_modules.hsi_mae import (
    AuxEncoderConfig,
    HSIConditionedMAE,
    HSIMAEConfig,
    masked_info_nce,
    masked_mse,
    random_masking,
)
from token_modules.registers import info_nce

AUX = ("ir", "af", "thickness")


def tiny_config(**kw) -> HSIMAEConfig:
    base = dict(
        img_size=16, bands=6, in_chans=1, patch_size=4, band_patch=3, dim=32, depth=2, num_heads=4,
        decoder_dim=16, decoder_depth=1, decoder_heads=2, contrast_dim=8,
        aux={
            "ir": AuxEncoderConfig(img_size=16, dim=16, depth=1, num_heads=2, patch_size=4),
            "af": AuxEncoderConfig(img_size=16, kind="cnn", dim=16, depth=2),
            "thickness": AuxEncoderConfig(in_chans=2, img_size=8, dim=24, depth=1, num_heads=2, patch_size=4),
        },
    )
    base.update(kw)
    return HSIMAEConfig(**base)


def make_inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hsi = torch.randn(b, 1, 6, 16, 16, generator=g)
    aux = {"ir": torch.randn(b, 1, 16, 16, generator=g), "af": torch.randn(b, 1, 16, 16, generator=g),
           "thickness": torch.randn(b, 2, 8, 8, generator=g)}
    return hsi, aux


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HSIConditionedMAE(tiny_config()).eval()


def test_patchify_roundtrip_and_token_order_match_the_patch_embedding(model):
    hsi, _ = make_inputs()
    patches = model.patchify(hsi)
    assert patches.shape == (4, 2 * 4 * 4, 1 * 3 * 4 * 4)
    assert torch.equal(model.unpatchify(patches), hsi)
    # the conv patch embedding is a linear map of exactly these patches, token for token
    w = model.encoder.patch_embed.weight.flatten(1)
    expected = patches @ w.T + model.encoder.patch_embed.bias
    got = model.encoder.patch_embed(hsi).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("n,ratio", [(32, 0.75), (100, 0.9), (784, 0.75), (10, 0.0)])
def test_masking_ratio_exact_and_restorable(n, ratio):
    x = torch.randn(3, n, 5)
    vis, mask, ids_restore = random_masking(x, ratio, gen())
    keep = round(n * (1 - ratio))
    assert vis.shape == (3, keep, 5)
    assert torch.all(mask.sum(1) == n - keep)
    # visible tokens are exactly the unmasked positions, in the order given by ids_restore
    ids_shuffle = ids_restore.argsort(1)
    assert torch.equal(vis, x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, 5)))
    assert torch.all(mask.gather(1, ids_shuffle[:, :keep]) == 0)


def test_masking_per_sample_and_reproducible():
    x = torch.randn(4, 64, 2)
    _, m1, _ = random_masking(x, 0.75, gen(3))
    _, m2, _ = random_masking(x, 0.75, gen(3))
    _, m3, _ = random_masking(x, 0.75, gen(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert not torch.equal(m1[0], m1[1])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mask_ratio"):
            random_masking(x, bad)


def test_loss_ignores_visible_tokens(model):
    hsi, aux = make_inputs()
    out = model(hsi, aux, generator=gen())
    pred, target, mask = out["pred"], out["target"], out["mask"]
    assert out["recon_loss"] == masked_mse(pred, target, mask)
    visible = mask == 0
    t2, p2 = target.clone(), pred.detach().clone()
    t2[visible] = 1e3
    p2[visible] = -1e3
    assert masked_mse(pred, t2, mask) == out["recon_loss"]
    assert masked_mse(p2, target, mask) == out["recon_loss"]
    t3 = target.clone()
    t3[~visible] += 1.0
    assert masked_mse(pred, t3, mask) != out["recon_loss"]
    assert masked_mse(target, target, mask) == 0


def test_target_is_fixed_normalised_pixels(model):
    hsi, _ = make_inputs()
    target = model(hsi, generator=gen())["target"]
    assert not target.requires_grad
    assert torch.allclose(target.mean(-1), torch.zeros(4, 32), atol=1e-5)
    assert torch.allclose(target.std(-1), torch.ones(4, 32), atol=1e-3)


def test_activation_scale_bounded_across_depth():
    torch.manual_seed(0)
    m = HSIConditionedMAE(tiny_config(depth=16, cond_depth=8)).eval()
    hsi, aux = make_inputs()
    rms = []
    blocks = list(m.cond_blocks) + list(m.encoder.blocks)
    hooks = [b.register_forward_hook(lambda mod, i, o: rms.append(o[:4].pow(2).mean().sqrt().item())) for b in blocks]
    with torch.no_grad():
        m(hsi, aux, generator=gen())
    for h in hooks:
        h.remove()
    rms = rms[: len(blocks)]  # the conditioned pass
    # single residuals: additive growth; the reference's double residual doubled x every block (2^20 here)
    assert max(rms) / rms[3] < len(blocks) / 4, rms


def test_missing_modalities_every_subset(model):
    hsi, aux = make_inputs()
    full = model(hsi, aux, generator=gen())
    plain = model.encoder.forward_tokens(random_masking(model.encoder.embed(hsi), 0.75, gen())[0])
    for r in range(len(AUX) + 1):
        for subset in itertools.combinations(AUX, r):
            out = model(hsi, {m: aux[m] for m in subset}, generator=gen())
            assert torch.isfinite(out["loss"])
            assert set(out["aux_embeddings"]) == set(subset)
            # the contrastive HSI side is unconditioned: a missing modality changes no other modality's term
            for m in subset:
                assert torch.allclose(out["contrastive_per_modality"][m], full["contrastive_per_modality"][m], atol=1e-5)
            if subset:  # rescaled: the mean over the modalities present, not the sum
                expected = sum(full["contrastive_per_modality"][m] for m in subset) / len(subset)
                assert torch.allclose(out["contrastive_loss"], expected, atol=1e-5)
            else:
                assert out["contrastive_loss"] == 0
                assert torch.allclose(out["latent"], plain, atol=1e-5)  # no aux: the plain HSI encoder
            assert torch.equal(out["mask"], full["mask"])


def test_per_sample_absence_ignores_absent_content(model):
    hsi, aux = make_inputs()
    present = {"ir": torch.tensor([True, False, True, True]), "af": torch.tensor([False, False, True, False])}
    out = model(hsi, aux, present, generator=gen())
    noisy = {m: x.clone() for m, x in aux.items()}
    noisy["ir"][1] = torch.randn_like(noisy["ir"][1]) * 50
    noisy["af"][[0, 1, 3]] = torch.randn_like(noisy["af"][[0, 1, 3]]) * 50
    out2 = model(hsi, noisy, present, generator=gen())
    for key in ("loss", "latent", "pred", "contrastive_loss"):
        assert torch.allclose(out[key], out2[key], atol=1e-5), key
    # sample 1 has thickness only; all absent for a modality == not given
    none = {"ir": torch.zeros(4, dtype=torch.bool), "af": torch.zeros(4, dtype=torch.bool),
            "thickness": torch.zeros(4, dtype=torch.bool)}
    a = model(hsi, aux, none, generator=gen())
    b = model(hsi, None, generator=gen())
    assert torch.allclose(a["latent"], b["latent"], atol=1e-5)
    assert a["contrastive_loss"] == 0 and torch.isfinite(a["loss"])


def test_extracted_encoder_matches_the_model(model):
    hsi, aux = make_inputs()
    enc = model.extract_encoder()
    feats = enc(hsi)
    assert feats.shape == (4, 32, 32)
    out = model(hsi, None, mask_ratio=0.0, generator=gen())
    ids_restore = torch.argsort(torch.argsort(torch.rand(4, 32, generator=gen()), 1), 1)
    inside = out["latent"].gather(1, ids_restore[..., None].expand(-1, -1, 32))
    assert torch.allclose(inside, feats, atol=1e-5)
    assert torch.allclose(model.encoder(hsi), feats, atol=1e-6)
    with torch.no_grad():  # an independent copy
        enc.norm.bias += 1
    assert not torch.allclose(model.encoder(hsi), enc(hsi))


def test_contrastive_hand_computation_and_edge_cases():
    torch.manual_seed(0)
    b, e, t = 5, 6, 0.07
    z = F.normalize(torch.randn(b, e, dtype=torch.float64), dim=-1)
    za = F.normalize(torch.randn(2, b, e, dtype=torch.float64), dim=-1)
    valid = torch.ones(2, b, dtype=torch.bool)
    loss, per = masked_info_nce(z, za, valid, t)
    ref = info_nce(z.expand(2, -1, -1), za, 1 / t)[0]
    assert torch.allclose(per, ref)
    s = [[float(z[r] @ za[0, c]) / t for c in range(b)] for r in range(b)]
    ab = sum(-s[r][r] + math.log(sum(math.exp(v) for v in s[r])) for r in range(b)) / b
    ba = sum(-s[c][c] + math.log(sum(math.exp(s[r][c]) for r in range(b))) for c in range(b)) / b
    assert per[0].item() == pytest.approx((ab + ba) / 2, rel=1e-10)
    assert loss.item() == pytest.approx(per.mean().item())
    # constant embeddings: log(B); aligned: lower than shuffled
    const = F.normalize(torch.ones(b, e), dim=-1)
    assert masked_info_nce(const, const[None], valid[:1], t)[0].item() == pytest.approx(math.log(b), rel=1e-5)
    zz = F.normalize(torch.randn(b, e), dim=-1)
    assert masked_info_nce(zz, zz[None], valid[:1], t)[0] < masked_info_nce(zz, zz.roll(1, 0)[None], valid[:1], t)[0]
    # a subset of valid samples equals InfoNCE on that subset; <= 1 valid sample -> no term, no NaN
    sub = torch.tensor([[True, False, True, True, False]])
    l_sub = masked_info_nce(z, za[:1], sub, t)[0]
    keep = sub[0]
    assert torch.allclose(l_sub, info_nce(z[keep][None], za[0, keep][None], 1 / t)[0][0])
    one = torch.tensor([[True, False, False, False, False]])
    assert masked_info_nce(z, za[:1], one, t)[0] == 0


def test_gradients_reach_aux_and_encoder():
    m = HSIConditionedMAE(tiny_config()).train()
    hsi, aux = make_inputs()
    m(hsi, aux, generator=gen())["loss"].backward()
    for name in ("encoder", "aux_encoders", "cond_blocks", "decoder_blocks", "hsi_head", "aux_heads"):
        params = list(getattr(m, name).parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), name


def test_full_seed_configuration_constructible():
    c = HSIMAEConfig()
    assert c.num_tokens == 784 and c.dim == 768 and c.depth == 16 and c.grid == (4, 14, 14)
    with torch.device("meta"):
        m = HSIConditionedMAE(c)
        tokens = m.encoder.embed(torch.empty(1, 1, 12, 224, 224))
    assert tokens.shape == (1, 784, 768)
    assert 130e6 < sum(p.numel() for p in m.parameters()) < 150e6


def test_bad_inputs_raise_clear_errors(model):
    hsi, aux = make_inputs()
    with pytest.raises(ValueError, match="hsi must be"):
        model(torch.randn(2, 1, 5, 16, 16))
    with pytest.raises(ValueError, match="unknown modalities.*oct"):
        model(hsi, {"oct": aux["ir"]})
    with pytest.raises(ValueError, match="auxiliary input"):
        model(hsi, {"ir": torch.randn(4, 1, 8, 8)})
    with pytest.raises(ValueError, match="aux_present"):
        model(hsi, aux, {"ir": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny_config(mask_ratio=1.0)
    with pytest.raises(ValueError, match="band_patch"):
        tiny_config(bands=7)
    with pytest.raises(ValueError, match="kind"):
        AuxEncoderConfig(kind="rnn")
