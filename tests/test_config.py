import pytest
import torch

from sdtm_plugin import SDTMConfig, ToMeConfig, apply_SDTM, apply_ToMe, remove_SDTM


@pytest.mark.parametrize(
    "params, name",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": 0.3, "deviation": 0.4}, "deviation"),
        ({"ratio": 0.3, "deviation": -0.1}, "deviation"),
        ({"ratio": 0.6, "deviation": 0.4}, "ratio \\+ deviation"),
        ({"sx": 0}, "sx"),
        ({"sy": -1}, "sy"),
        ({"sx": 1, "sy": 1}, "st \\* sy \\* sx must be >= 2"),
        ({"sx": 2.0}, "sx"),
        ({"switch_step": -1}, "switch_step"),
        ({"a_s": float("nan")}, "a_s"),
        ({"a_d": float("inf")}, "a_d"),
        ({"mcw": 1.5}, "mcw"),
        ({"protect_steps_frequency": 0}, "protect_steps_frequency"),
        ({"protect_layers_frequency": -2}, "protect_layers_frequency"),
        ({"merge_attn": False, "merge_mlp": False}, "merge_attn"),
        ({"cache_each_step": 1}, "cache_each_step"),
        ({"use_rand": "yes"}, "use_rand"),
        ({"seed": -3}, "seed"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"mcw": 0.1, "cache_each_step": False, "protect_steps_frequency": -1}, "mcw"),
    ],
)
def test_bad_sdtm_parameters_name_the_parameter(params, name):
    with pytest.raises(ValueError, match=name):
        SDTMConfig(**params)


def test_bad_tome_parameters():
    with pytest.raises(ValueError, match="ratio"):
        ToMeConfig(ratio=1.2)
    with pytest.raises(ValueError, match="sx"):
        ToMeConfig(sx=0)


def test_defaults_are_sdtm_star_a():
    cfg = SDTMConfig()
    assert (cfg.ratio, cfg.effective_deviation, cfg.switch_step, cfg.sx, cfg.sy, cfg.a_s, cfg.a_d, cfg.mcw) == (
        0.3, 0.2, 20, 2, 2, 0.05, 0.05, 0.1)
    assert (cfg.protect_steps_frequency, cfg.protect_layers_frequency) == (3, -1)
    assert cfg.use_rand and cfg.merge_attn and cfg.merge_mlp and cfg.cache_each_step
    tome = ToMeConfig()
    assert (tome.ratio, tome.merge_attn, tome.merge_mlp) == (0.5, True, False)


def test_unsupported_models_raise_type_error_listing_supported():
    with pytest.raises(TypeError, match="supported models: PixArt"):
        apply_SDTM(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="supported models"):
        apply_ToMe(object())
    with pytest.raises(TypeError, match="supported models"):
        remove_SDTM("not a model")


def test_remove_on_unpatched_model_is_a_no_op():
    model = torch.nn.Linear(2, 2)
    assert remove_SDTM(model) is model and not hasattr(model, "_diffusers_hook")
