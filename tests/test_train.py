"""The training command on a tiny configuration: losses fall, an interrupted stage resumes exactly, export loads."""

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.reference import shapes, train
from benchmarks.reference.train import Budget, TrainConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All three stages of the tiny configuration, then the export."""
    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig.tiny()
    train.train_vae(cfg, out, Budget(None))
    train.train_features(cfg, out, Budget(None))
    train.train_denoiser(cfg, out, Budget(None), train.load_stage_vae(cfg, out))
    return cfg, out, train.export(cfg, out, out / "pipeline")


def _losses(out, stage):
    return [r["loss"] for r in train.Checkpoint.load(out / f"{stage}.pt").history]


def test_losses_fall(trained):
    _, out, _ = trained
    for stage in ("vae", "features", "denoiser"):
        losses = _losses(out, stage)
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (stage, losses)


def test_export_loads_with_from_pretrained_and_generates(trained):
    from diffusers import DiffusionPipeline, PixArtAlphaPipeline

    from benchmarks.reference.quality import AttributeNet

    _, _, folder = trained
    pipe = DiffusionPipeline.from_pretrained(folder)  # no dtype: one dtype throughout all the same
    assert isinstance(pipe, PixArtAlphaPipeline)
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    images = pipe("a small red circle at the top left on a plain background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np", use_resolution_binning=False,
                  clean_caption=False).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    net = AttributeNet.from_pretrained(folder / "features")
    assert set(net(torch.rand(2, 3, 64, 64))) == set(shapes.ATTRIBUTES)


def test_interrupted_stage_resumes_to_the_same_weights(tmp_path, trained, monkeypatch):
    cfg, out, _ = trained
    cfg = TrainConfig(**{**cfg.__dict__, "checkpoint_minutes": 1e-9})  # a checkpoint after every step
    vae = train.load_stage_vae(cfg, out)
    straight = train.train_denoiser(cfg, tmp_path / "straight", Budget(None), vae)

    calls = {"n": 0}

    def stop_after_five(self):
        calls["n"] += 1
        return calls["n"] > 5

    with monkeypatch.context() as m:
        m.setattr(Budget, "exhausted", stop_after_five)
        train.train_denoiser(cfg, tmp_path / "resumed", Budget(None), vae)
    assert train.Checkpoint.load(tmp_path / "resumed" / "denoiser.pt").step == 5
    resumed = train.train_denoiser(cfg, tmp_path / "resumed", Budget(None), vae)
    ckpt = train.Checkpoint.load(tmp_path / "resumed" / "denoiser.pt")
    assert ckpt.done and ckpt.step == cfg.steps and len(ckpt.history) == cfg.steps
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_training_text_encoding_equals_the_pipelines(trained):
    """Training pads captions to 16 tokens; with the attention masks that equals the pipeline's 120."""
    from diffusers import DiffusionPipeline

    cfg, _, folder = trained
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    caption = "a large blue square in the center on a dotted background"
    embeds, mask = train.encode_captions(pipe.tokenizer, pipe.text_encoder, [caption], cfg.text_tokens)
    ref, ref_mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, clean_caption=False)
    n = int(mask.sum())
    assert int(ref_mask.sum()) == n and ref.shape[1] == 120
    torch.testing.assert_close(embeds[0, :n], ref[0, :n].float(), rtol=1e-3, atol=1e-3)


def test_shapes128_is_the_shapes_data_at_128_px_started_from_pixart_shapes_with_stretched_positions():
    """``shapes128``: pixart-shapes' scenes and captions rendered at 128 px, every attribute read back by the
    single-shape checker; its config starts from the shipped pipeline's VAE (32 x 32 latents: 1,024 tokens) and
    denoiser, whose 32 x 32 position table spans the 16 x 16 one's range (every other row and column is it)."""
    from benchmarks.reference import shapes_checker
    from benchmarks.reference.data import DATA_SETS

    data = DATA_SETS["shapes128"]
    batch = data.sample(27, torch.Generator().manual_seed(0))
    images = data.render(batch, torch.Generator().manual_seed(1))
    assert images.shape == (27, 3, 128, 128) and data.captions(batch) == DATA_SETS["shapes"].captions(batch)
    prompts = [shapes_checker.Prompt(*map(int, row)) for row in zip(*batch.as_dict().values())]
    assert shapes_checker.adherence(images.permute(0, 2, 3, 1).numpy(), prompts).all()
    assert data.evaluation.references(prompts[:2], 1, 0).shape == (2, 3, 128, 128)

    cfg = TrainConfig.for_data("shapes128")
    assert Path(cfg.init_from).name == "pixart-shapes" and cfg.interpolation_scale == 2.0
    vae, transformer = train.build_vae(cfg), train.build_transformer(cfg)
    train.load_initial(cfg, vae, "vae")
    train.load_initial(cfg, transformer, "transformer")
    with torch.no_grad():
        assert vae.encode(images[:1] * 2 - 1).latent_dist.mode().shape == (1, 8, 32, 32)
    original = train.build_transformer(TrainConfig())
    train.load_initial(TrainConfig(init_from=cfg.init_from), original, "transformer")
    assert all(torch.equal(v, transformer.state_dict()[k]) for k, v in original.state_dict().items())
    stretched = transformer.pos_embed.pos_embed.reshape(32, 32, -1)
    torch.testing.assert_close(stretched[::2, ::2], original.pos_embed.pos_embed.reshape(16, 16, -1))


@pytest.fixture(scope="module")
def scenes_toy(tmp_path_factory):
    """The multi-object data set through every stage on a toy configuration (1,024 tokens at full size: 32 x 32 here
    too, the VAE downsamples 4x), then the export."""
    out = tmp_path_factory.mktemp("scenes")
    cfg = TrainConfig(**{**TrainConfig.tiny().__dict__, "data": "scenes", "text_tokens": 40, "steps": 4,
                         "vae_steps": 4, "feature_steps": 4, "object_loss_weight": 5.0})
    vae = train.train_vae(cfg, out, Budget(None))
    net = train.train_features(cfg, out, Budget(None))
    denoiser = train.train_denoiser(cfg, out, Budget(None), vae)
    return cfg, vae, net, denoiser, train.export(cfg, out, out / "weights" / "toy-scenes")


def test_scenes_data_trains_at_128_px_and_extends_the_shapes_text_encoder(scenes_toy):
    """The text encoder of the larger vocabulary encodes the shared words as the single-shape one does."""
    from benchmarks.reference.data import DATA_SETS

    cfg, vae, net, denoiser, _ = scenes_toy
    assert denoiser.config.sample_size == 32 and set(net.heads) == set(DATA_SETS["scenes"].heads)
    pipe = train.assemble_pipeline(cfg, vae, denoiser)
    pipe.set_progress_bar_config(disable=True)
    caption = DATA_SETS["scenes"].reference_prompts[1]
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(caption).input_ids
    images = pipe(caption, num_inference_steps=2, output_type="np", use_resolution_binning=False,
                  clean_caption=False).images
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()
    shapes_cfg = TrainConfig.tiny()
    small = train.build_text_encoder(shapes_cfg, 3 + len(DATA_SETS["shapes"].words))
    large = train.build_text_encoder(shapes_cfg, 3 + len(DATA_SETS["scenes"].words))
    ids = train.build_tokenizer(shapes_cfg)("a large red circle at the top", return_tensors="pt").input_ids
    torch.testing.assert_close(small(ids)[0], large(ids)[0])


def test_harness_scores_a_scenes_model_on_its_own_protocol(scenes_toy, tmp_path, monkeypatch):
    """A trained preset whose train_config names the scenes data: the harness generates its scenes set's prompts and
    fills the seven attribute columns (the relation only where a prompt asks; the single-shape data's columns stay
    empty for none), with intervals and saved per-prompt scores."""
    import dataclasses

    import pandas as pd

    from benchmarks import models
    from benchmarks.cli import main
    from benchmarks.reference import data, quality, scenes

    folder = scenes_toy[-1]
    monkeypatch.setattr(models, "WEIGHTS", folder.parent)
    preset = models._trained("toy-scenes", "toy scenes model")
    assert preset.data == "scenes" and preset.num_tokens == 1024
    monkeypatch.setitem(models.PRESETS, "toy-scenes", preset)

    def few_renders(seed: int) -> torch.Tensor:  # the shipped feature space fits 2,048 renders; the mechanics need few
        return scenes.render(scenes.sample_scenes(48, torch.Generator().manual_seed(seed)),
                             torch.Generator().manual_seed(seed + 1))

    scenes_data = data.data_set("scenes")
    monkeypatch.setitem(data.DATA_SETS, "scenes", dataclasses.replace(
        scenes_data, evaluation=dataclasses.replace(scenes_data.evaluation, feature_renders=few_renders)))
    quality.feature_space.cache_clear()
    out = tmp_path / "run"
    table = main(["--model", "toy-scenes", "--steps", "2", "--no-latency", "--eval-set", "tune", "--quality-prompts",
                  "6", "--out", str(out), "--method", "baseline", "tome", "--log-level", "WARNING"]).set_index("method")
    quality.feature_space.cache_clear()
    base = table.loc["baseline"]
    assert base["quality_set"] == "tune" and base["quality_images"] == 6
    for name in ("adherence", "adherence_count", "adherence_relation", "adherence_shape", "detail", "kid"):
        assert base[f"{name}_low"] <= base[name] <= base[f"{name}_high"], name
    scores = quality.SetScores.load(out / "scores" / "toy-scenes" / "tune6" / "baseline.npz")
    prompts = quality.evaluation_set("tune", "scenes").prompts[:6]
    assert scores.correct.shape == (6, 7)
    assert np.array_equal(np.isnan(scores.correct[:, -1]), [p.count != 2 for p in prompts])
    assert pd.notna(table.loc["tome", "adherence_relation_diff"])


def test_object_weighted_loss_counts_object_pixels_more():
    """The scenes' denoiser loss: plain MSE at weight 0; an error on an object's latent pixels costs (1 + weight)
    times one on the background; the weights' normalisation keeps a uniform error's loss unchanged."""
    from benchmarks.reference import scenes
    from benchmarks.reference.train import _object_weighted_mse

    batch = scenes.Scenes.from_list([scenes.Scene(((0, 1, 1, 4),), 0)])  # one large red square in the center
    images = scenes.render(batch, torch.Generator().manual_seed(0)) * 2 - 1
    target = torch.zeros(1, 4, 32, 32)
    centre, corner = target.clone(), target.clone()
    centre[..., 16, 16], corner[..., 1, 1] = 1.0, 1.0  # an error inside the square / on the background
    assert _object_weighted_mse(centre, target, images, 0.0) == torch.nn.functional.mse_loss(centre, target)
    assert _object_weighted_mse(centre, target, images, 5.0) / _object_weighted_mse(corner, target, images, 5.0) == \
        pytest.approx(6.0)
    assert _object_weighted_mse(target + 1, target, images, 5.0) == pytest.approx(1.0)
    assert TrainConfig.for_data("scenes").object_loss_weight > 0 and TrainConfig().object_loss_weight == 0


def test_flux_architecture_trains_exports_and_merges(tmp_path):
    """`--arch flux`: the rectified-flow loss falls on a tiny configuration, the export is a FluxPipeline that a plain
    `from_pretrained` loads and that generates at the trained size with true guidance (two transformer calls per
    step), and token merging patches it."""
    from diffusers import DiffusionPipeline, FluxPipeline
    from safetensors import safe_open

    from sdtm_plugin import apply_SDTM, get_merge_state

    cfg = TrainConfig(**{**TrainConfig.tiny().__dict__, "arch": "flux", "single_layers": 1, "steps": 24})
    train.train_vae(cfg, tmp_path, Budget(None))
    train.train_features(cfg, tmp_path, Budget(None))
    train.train_denoiser(cfg, tmp_path, Budget(None), train.load_stage_vae(cfg, tmp_path))
    losses = _losses(tmp_path, "denoiser")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    folder = train.export(cfg, tmp_path, tmp_path / "pipeline", with_judge=False)
    assert not (folder / "features").exists()  # the data set's shared judge scores it
    for part in ("transformer/diffusion_pytorch_model", "text_encoder/model", "text_encoder_2/model"):
        with safe_open(folder / f"{part}.safetensors", "pt") as stored:  # stored in half precision ...
            assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.float16}, part
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.config.guidance_embeds is False
    # ... and loaded in one dtype by a plain from_pretrained
    assert {pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    apply_SDTM(pipe, ratio=0.5, protect_steps_frequency=-1)
    images = pipe("a small red circle at the top left on a plain background", num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0), output_type="np", **train.pipeline_call_kwargs(cfg)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    records = get_merge_state(pipe).records
    assert [r.call for r in records] == [0, 1] * 3  # conditional and unconditional calls
    assert min(n for r in records for role in ("attn", "mlp") for n in r.tokens[role]) < 64
