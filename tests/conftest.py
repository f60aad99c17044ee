import logging
import os

import pytest
import torch

from benchmarks.models import load_pipeline

torch.set_num_threads(int(os.environ.get("SDTM_TEST_THREADS", "2")))
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


def quiet_pipeline(name, cache_dir):
    """A fresh preset pipeline (random weights, saved then loaded with from_pretrained), progress bars off."""
    pipe = load_pipeline(name, cache_dir=cache_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture()
def tiny_pipe(tiny_pipe_dir):
    """A fresh tiny PixArt pipeline, 64 tokens, 4 blocks."""
    return quiet_pipeline("tiny", tiny_pipe_dir)


def generate(pipe, prompt="a red cat on a boat", steps=10, seed=0, **kwargs):
    """Final latents of a tiny-pipeline generation (text encoder included)."""
    kwargs.setdefault("num_inference_steps", steps)
    return pipe(
        prompt,
        generator=torch.Generator().manual_seed(seed),
        use_resolution_binning=False,
        output_type="latent",
        clean_caption=False,
        **kwargs,
    ).images
