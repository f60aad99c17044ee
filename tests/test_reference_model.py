"""The shipped trained pipelines: load with `from_pretrained`, reproduce their stored samples, count MACs on meta."""

import numpy as np
import pytest
import torch

from benchmarks.macs import count_forward_macs
from benchmarks.models import PRESETS, TRAINED_PRESETS, WEIGHTS, build_denoiser, denoiser_inputs, load_pipeline
from benchmarks.reference import quality, train
from benchmarks.reference.data import DATA_SETS

SHIPPED = [name for name in TRAINED_PRESETS if name in PRESETS]
PIPELINES = {"pixart": "PixArtAlphaPipeline", "flux": "FluxPipeline"}


def _call_kwargs(folder) -> dict:
    return train.pipeline_call_kwargs(train.TrainConfig.from_json(folder / "train_config.json"))


def test_the_references_and_their_judge_are_shipped():
    assert {"pixart-shapes", "pixart-shapes128", "flux-shapes"} <= set(SHIPPED)
    for data, owner in (("shapes", "pixart-shapes"), ("shapes128", "pixart-shapes128")):
        assert quality.judge(data) == WEIGHTS / owner / "features"
        assert (quality.judge(data) / "model.safetensors").exists()
    with pytest.raises(ValueError, match="data must be one of"):
        quality.judge("faces")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_small_safetensors(name):
    files = [p for p in (WEIGHTS / name).rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"transformer", "vae", "text_encoder"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 20e6


@pytest.mark.parametrize("name", SHIPPED)
def test_preset_loads_through_from_pretrained_with_learned_weights(name):
    preset = PRESETS[name]
    resolution = DATA_SETS[preset.data].resolution
    assert preset.trained and preset.resolution == resolution and preset.num_tokens == (resolution // 4) ** 2
    pipe = load_pipeline(name, dtype=torch.float32)
    assert type(pipe).__name__ == PIPELINES[preset.family] and pipe.transformer.dtype == torch.float32
    architecture = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    assert architecture == dict(build_denoiser(preset, "meta").config)


@pytest.mark.parametrize("name", SHIPPED)
def test_a_plain_from_pretrained_of_the_folder_generates(name):
    """No dtype given, as a user calling it "like any PixArt / FLUX pipeline" would: every component in one dtype."""
    from diffusers import DiffusionPipeline

    folder = WEIGHTS / name
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    assert {pipe.transformer.dtype, pipe.vae.dtype, *(e.dtype for e in encoders)} == {torch.float32}
    images = pipe("a small red circle at the top left on a plain background", num_inference_steps=2,
                  output_type="np", **_call_kwargs(folder)).images
    resolution = DATA_SETS[PRESETS[name].data].resolution
    assert images.shape == (1, resolution, resolution, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("name", SHIPPED)
def test_generates_the_stored_reference_sample(name):
    folder = WEIGHTS / name
    stored = np.load(folder / "reference_sample.npz")
    assert list(stored["prompts"]) == list(DATA_SETS[PRESETS[name].data].reference_prompts)
    images = train.reference_sample(folder, tuple(stored["prompts"]))
    diff = np.abs(images - stored["images"] / 255.0)
    # not bits: other BLAS libraries round differently over the 10 steps
    assert diff.mean() < 0.01 and np.quantile(diff, 0.99) < 0.1, (diff.mean(), diff.max())


@pytest.mark.parametrize("name", SHIPPED)
def test_macs_of_the_trained_preset_on_meta(name):
    preset = PRESETS[name]
    count = count_forward_macs(build_denoiser(preset, "meta"), denoiser_inputs(preset, 2, "meta")).steps[0]
    assert count.total > count.linear > 0 and count.by_label()["merge"] == 0


def test_missing_trained_preset_is_a_clear_error(monkeypatch):
    from benchmarks import models

    monkeypatch.delitem(models.PRESETS, "pixart-shapes")
    with pytest.raises(FileNotFoundError, match="benchmarks.reference.train"):
        load_pipeline("pixart-shapes")
