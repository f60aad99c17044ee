"""The shipped trained pipeline: loads with `from_pretrained`, reproduces its stored sample, counts MACs on meta."""

import numpy as np
import pytest
import torch

from benchmarks.reference import train
from benchmarks.macs import count_forward_macs
from benchmarks.models import PRESETS, WEIGHTS, build_denoiser, denoiser_inputs, load_pipeline

FOLDER = WEIGHTS / "pixart-shapes"


def test_shipped_weights_are_small_safetensors():
    files = [p for p in FOLDER.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} >= {"transformer", "vae", "text_encoder", "features"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20


def test_preset_loads_through_from_pretrained_with_learned_weights():
    from diffusers import PixArtAlphaPipeline

    preset = PRESETS["pixart-shapes"]
    assert preset.trained and preset.num_tokens == 256 and preset.resolution == 64
    pipe = load_pipeline("pixart-shapes", torch_dtype=torch.float32)
    assert isinstance(pipe, PixArtAlphaPipeline) and pipe.transformer.dtype == torch.float32
    architecture = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    assert architecture == dict(build_denoiser(preset, "meta").config)


def test_a_plain_from_pretrained_of_the_folder_generates():
    """No dtype given, as a user calling it "like any PixArt pipeline" would: every component in one dtype."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    images = pipe("a small red circle at the top left on a plain background", num_inference_steps=2,
                  output_type="np", use_resolution_binning=False, clean_caption=False).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_generates_the_stored_reference_sample():
    from benchmarks.reference.data import DATA_SETS

    stored = np.load(FOLDER / "reference_sample.npz")
    assert list(stored["prompts"]) == list(DATA_SETS["shapes"].reference_prompts)
    images = train.reference_sample(FOLDER, tuple(stored["prompts"]))
    diff = np.abs(images - stored["images"] / 255.0)
    # not bits: other BLAS libraries round differently over the 10 steps
    assert diff.mean() < 0.01 and np.quantile(diff, 0.99) < 0.1, (diff.mean(), diff.max())


def test_macs_of_the_trained_preset_on_meta():
    preset = PRESETS["pixart-shapes"]
    count = count_forward_macs(build_denoiser(preset, "meta"), denoiser_inputs(preset, 2, "meta")).steps[0]
    assert count.total > count.linear > 0 and count.by_label()["merge"] == 0


def test_missing_trained_preset_is_a_clear_error(monkeypatch):
    from benchmarks import models

    monkeypatch.delitem(models.PRESETS, "pixart-shapes")
    with pytest.raises(FileNotFoundError, match="benchmarks.reference.train"):
        load_pipeline("pixart-shapes")
