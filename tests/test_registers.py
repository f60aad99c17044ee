import math

import pytest
import torch
from torch import nn

from token_modules.registers import (
    NestedDropout,
    RegisterTokenConfig,
    RegisterTokenLoss,
    RegisterTokenModule,
    info_nce,
)

MODS = ("vision", "tactile", "text")


def tiny_config(**kw) -> RegisterTokenConfig:
    base = dict(modalities=MODS, num_tokens=4, num_overlapping=3, dim=16, num_heads=2, num_layers=2,
                nested_dropout_rate=0.5)
    base.update(kw)
    return RegisterTokenConfig(**base)


def feats(b=6, n=5, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, n + i, dim, generator=g) for i, m in enumerate(MODS)}


def test_nested_dropout_matches_schedule_and_keeps_a_prefix():
    k, rate, n = 5, 0.6, 40_000
    nd = NestedDropout(k, rate).train()
    keep = nd.sample_keep(n, torch.Generator().manual_seed(0))
    p = torch.linspace(0, rate, k)
    freq = keep.float().mean(0)
    sigma = (p * (1 - p) / n).sqrt()
    assert torch.all((freq - (1 - p)).abs() <= 4 * sigma + 1e-6), (freq, 1 - p)
    assert keep[:, 0].all()
    # prefix: once a token is dropped, every later token is dropped
    assert torch.all(keep[:, 1:] <= keep[:, :-1])
    # the number kept follows the schedule: P(keep exactly j) = p_j - p_{j-1}
    counts = torch.bincount(keep.sum(1), minlength=k + 1)[1:].float() / n
    expected = torch.diff(torch.cat([p, torch.ones(1)]))
    assert torch.allclose(counts, expected, atol=0.01)
    assert nd.eval().sample_keep(7).all()


def test_nested_dropout_rate_validated():
    with pytest.raises(ValueError, match="rate"):
        NestedDropout(4, 1.0)
    with pytest.raises(ValueError, match="nested_dropout_rate"):
        tiny_config(nested_dropout_rate=-0.1)


def test_module_output_dict_and_dropped_tokens_are_the_mask_token():
    torch.manual_seed(0)
    m = RegisterTokenModule(tiny_config(feature_dims={"text": 8}))
    x = feats()
    x["text"] = torch.randn(6, 3, 8)
    m.mask_token.data.normal_()
    out = m(x, generator=torch.Generator().manual_seed(1))
    keep = out["nested_dropout_mask"]
    assert keep.shape == (6, 4) and keep[:, 0].all() and torch.all(keep[:, 1:] <= keep[:, :-1])
    assert not keep.all(), "with rate 0.5 some tokens of 6 samples should be dropped"
    for mod in MODS:
        reg = out["register_tokens"][mod]
        assert reg.shape == (6, 4, 16)
        assert out["overlapping_tokens"][mod].shape == (6, 3, 16)
        assert out["complementary_tokens"][mod].shape == (6, 1, 16)
        assert torch.equal(reg[~keep], m.mask_token.expand(int((~keep).sum()), -1))
        assert not torch.any(reg[keep] == m.mask_token)
    assert out["stage1_features"]["text"] is x["text"]
    m.eval()
    assert m(x)["nested_dropout_mask"].all()


def test_registers_attend_to_sequences_and_differ():
    m = RegisterTokenModule(tiny_config(num_layers=1)).eval()  # one layer: no self-attention to mix them
    out = m(feats())["register_tokens"]["vision"]
    d = torch.cdist(out[0], out[0])
    assert d[~torch.eye(4, dtype=torch.bool)].min() > 1e-3
    with pytest.raises(ValueError, match="token sequence"):
        m({"vision": torch.randn(6, 16)})
    with pytest.raises(ValueError, match="N >= 2"):
        m({"vision": torch.randn(6, 1, 16)})


def test_causal_registers_do_not_see_later_ones():
    m = RegisterTokenModule(tiny_config(num_layers=3)).eval()
    x = feats()
    before = m(x)["register_tokens"]["vision"]
    with torch.no_grad():
        m.registers[2] += torch.randn(16)
    after = m(x)["register_tokens"]["vision"]
    assert torch.allclose(before[:, :2], after[:, :2], atol=1e-6)
    assert not torch.allclose(before[:, 2:], after[:, 2:], atol=1e-3)


def test_batched_modalities_equal_separate_runs_and_padding_is_ignored():
    m = RegisterTokenModule(tiny_config()).eval()
    x = feats()
    joint = m(x)["register_tokens"]
    for mod in MODS:
        assert torch.allclose(joint[mod], m({mod: x[mod]})["register_tokens"][mod], atol=1e-5)
    # user padding: the padded positions' content must not matter
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[:, 3:] = True
    noisy = x["vision"].clone()
    noisy[:, 3:] = torch.randn(6, 2, 16) * 100
    a = m({"vision": x["vision"]}, key_padding_masks={"vision": pad})["register_tokens"]["vision"]
    b = m({"vision": noisy}, key_padding_masks={"vision": pad})["register_tokens"]["vision"]
    assert torch.allclose(a, b, atol=1e-5)


def _hidden_rms(model: RegisterTokenModule, x) -> list[float]:
    rms = []
    hooks = [blk.register_forward_hook(lambda mod, i, o: rms.append(o.pow(2).mean().sqrt().item()))
             for blk in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return rms


def test_activation_scale_bounded_across_depth():
    torch.manual_seed(0)
    depth = 24
    m = RegisterTokenModule(tiny_config(num_layers=depth)).eval()
    rms = _hidden_rms(m, {"vision": torch.randn(4, 8, 16)})
    # one residual per sub-layer: growth is at most additive (linear in depth); a double residual doubles it
    # every block (2^20 from block 4 to block 24)
    assert rms[-1] / rms[3] < depth / 4, rms


def test_info_nce_matches_hand_computation():
    torch.manual_seed(0)
    p, b, d, scale = 2, 5, 8, 7.0
    za = nn.functional.normalize(torch.randn(p, b, d, dtype=torch.float64), dim=-1)
    zb = nn.functional.normalize(torch.randn(p, b, d, dtype=torch.float64), dim=-1)
    loss, _ = info_nce(za, zb, scale)
    for i in range(p):
        s = [[scale * float(za[i, r] @ zb[i, c]) for c in range(b)] for r in range(b)]
        ab = sum(-s[r][r] + math.log(sum(math.exp(v) for v in s[r])) for r in range(b)) / b
        ba = sum(-s[c][c] + math.log(sum(math.exp(s[r][c]) for r in range(b))) for c in range(b)) / b
        assert loss[i].item() == pytest.approx((ab + ba) / 2, rel=1e-10)
    # constant logits give log(B); aligned pairs beat any shuffled pairing
    const = nn.functional.normalize(torch.ones(1, b, d), dim=-1)
    assert info_nce(const, const, 10.0)[0].item() == pytest.approx(math.log(b), rel=1e-5)
    z = nn.functional.normalize(torch.randn(1, b, d), dim=-1)
    aligned = info_nce(z, z, 10.0)[0]
    for shift in range(1, b):
        assert aligned < info_nce(z, z.roll(shift, dims=1), 10.0)[0]


def _outputs(names=MODS, b=8, n_comp=1, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "overlapping_tokens": {m: torch.randn(b, 3, d, generator=g, requires_grad=True) for m in names},
        "complementary_tokens": {m: torch.randn(b, n_comp, d, generator=g, requires_grad=True) for m in names},
        "nested_dropout_mask": torch.ones(b, 3 + n_comp, dtype=torch.bool),
    }


def test_loss_minimal_for_aligned_pairs_and_accuracy():
    loss = RegisterTokenLoss(MODS, 3, complementary_weight=0.0)
    out = _outputs()
    shared = torch.randn(8, 3, 16)
    aligned = {**out, "overlapping_tokens": {m: shared + 0.01 * torch.randn(8, 3, 16) for m in MODS}}
    r_al, r_rand = loss(aligned), loss(out)
    assert r_al["loss"] < r_rand["loss"]
    assert r_al["loss"] < 0.01
    for pair in ("vision-tactile", "vision-text", "tactile-text"):
        assert r_al[f"acc1/{pair}"] == 1.0 and r_al[f"acc5/{pair}"] == 1.0
    assert r_al["overlapping_loss"].item() == pytest.approx(
        (r_al["loss/vision-tactile"] + r_al["loss/vision-text"] + r_al["loss/tactile-text"]).item() / 3)


def test_pair_switches():
    loss = RegisterTokenLoss(MODS, 3, disabled_pairs=[("text", "vision"), ("tactile", "text")])
    r = loss(_outputs())
    assert "loss/vision-tactile" in r and not any("text" in k for k in r)
    with pytest.raises(ValueError, match="disabled_pairs"):
        RegisterTokenLoss(MODS, 3, disabled_pairs=[("vision", "audio")])


def test_pooling_uses_kept_tokens_only():
    loss = RegisterTokenLoss(MODS, 3)
    out = _outputs()
    keep = torch.ones(8, 4, dtype=torch.bool)
    keep[:, 2:] = False
    r1 = loss({**out, "nested_dropout_mask": keep})
    changed = {m: t.detach().clone() for m, t in out["overlapping_tokens"].items()}
    for t in changed.values():
        t[:, 2] = 1e3
    r2 = loss({**out, "overlapping_tokens": changed, "nested_dropout_mask": keep})
    assert torch.allclose(r1["overlapping_loss"], r2["overlapping_loss"])


@pytest.mark.parametrize("n_comp", [0, 1, 3])
def test_complementary_regulariser_finite_with_gradient(n_comp):
    loss = RegisterTokenLoss(MODS, 3, complementary_weight=1.0)
    out = _outputs(n_comp=n_comp)
    r = loss(out)
    assert torch.isfinite(r["complementary_reg"]) and torch.isfinite(r["loss"])
    if n_comp == 0:
        assert r["complementary_reg"] == 0
        return
    r["complementary_reg"].backward()
    g = out["complementary_tokens"]["vision"].grad
    assert g is not None and g.abs().sum() > 0
    assert out["overlapping_tokens"]["vision"].grad.abs().sum() > 0  # diversity with the shared content


def test_frozen_encoders_get_no_gradient_and_stay_in_eval():
    torch.manual_seed(0)
    enc = {m: nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.5)) for m in MODS}
    m = RegisterTokenModule(tiny_config(), encoders=enc).train()
    assert all(not e.training for e in m.encoders.values())
    loss = RegisterTokenLoss(MODS, 3)
    x = {k: torch.randn(6, 5, 4) for k in MODS}
    out = m(x)
    loss(out)["loss"].backward()
    for e in m.encoders.values():
        assert all(p.grad is None and not p.requires_grad for p in e.parameters())
    assert m.registers.grad is not None and m.registers.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.blocks.parameters())
    # frozen features are deterministic (encoder dropout off)
    assert torch.equal(m(x)["stage1_features"]["vision"], out["stage1_features"]["vision"])


def test_bad_inputs_raise_clear_errors():
    m = RegisterTokenModule(tiny_config())
    with pytest.raises(ValueError, match="unknown modalities.*audio"):
        m({"audio": torch.randn(2, 4, 16)})
    with pytest.raises(ValueError, match="feature_dims"):
        m({"vision": torch.randn(2, 4, 8)})
    with pytest.raises(ValueError, match="batch size"):
        m({"vision": torch.randn(2, 4, 16), "tactile": torch.randn(3, 4, 16)})
    with pytest.raises(ValueError, match="num_overlapping"):
        tiny_config(num_overlapping=5)
    with pytest.raises(ValueError, match="num_overlapping"):
        RegisterTokenLoss(MODS, 3)(_outputs() | {"overlapping_tokens": {"vision": torch.randn(2, 2, 16)}})


def test_logit_scale_fixed_or_learnable_and_clamped():
    fixed = RegisterTokenLoss(MODS, 3, temperature=0.07, learnable_scale=False)
    assert list(fixed.parameters()) == [] and fixed.logit_scale.item() == pytest.approx(1 / 0.07)
    learn = RegisterTokenLoss(MODS, 3, temperature=0.001)
    assert learn.logit_scale.item() == 100.0 and len(list(learn.parameters())) == 1
