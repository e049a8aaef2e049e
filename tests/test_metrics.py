"""Quality metrics (SWD, FID, KID) and the sampling helpers of notebook 06, on a CPU, with no network."""

import os

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


def add_noise(images, sigma, seed=1):
    noise = sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


def box_blur(images, radius):
    if radius == 0:
        return images
    k = 2 * radius + 1
    blurred = F.avg_pool2d(F.pad(images.float(), (radius,) * 4, mode="reflect"), k, stride=1)
    return blurred.round().to(torch.uint8)


# --------------------------------------------------------------------------- SWD


def test_swd_of_identical_sets_is_exactly_zero_at_every_level():
    images = smooth_images(8, 64)
    scores = helpers.swd(images, images.clone())
    assert list(scores) == ["swd", "swd_64px", "swd_32px", "swd_16px"]
    assert all(value == 0.0 for value in scores.values())


def test_swd_grows_with_additive_noise():
    real = smooth_images()
    values = [helpers.swd(real, add_noise(real, sigma))["swd"] for sigma in (0, 2, 5, 10, 20, 40)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_swd_grows_with_blur():
    real = smooth_images(8, 32, seed=3)
    real = add_noise(real, 12, seed=4)  # some fine detail for the blur to remove
    values = [helpers.swd(real, box_blur(real, radius))["swd"] for radius in (0, 1, 2, 3)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_swd_ignores_a_constant_brightness_offset_by_design():
    # Descriptors are normalised per set (mean and std of each channel), as in Karras et al.:
    # a constant offset changes only the coarsest level's mean, which the normalisation removes.
    real = smooth_images()
    brighter = real + 20  # stays below 255: no clipping
    assert helpers.swd(real, brighter)["swd"] < 1e-3
    assert helpers.swd(real, add_noise(real, 5))["swd"] > 1.0


def test_swd_is_deterministic_and_takes_float_images_in_minus_one_one():
    real, other = smooth_images(seed=0), smooth_images(seed=5)
    first = helpers.swd(real, other)
    assert helpers.swd(real, other) == first
    as_float = helpers.swd(real.float() / 127.5 - 1, other.float() / 127.5 - 1)
    assert as_float == first
    assert helpers.swd(real, other, seed=1)["swd"] != first["swd"]


def test_laplacian_pyramid_reconstructs_the_image_and_matches_cv2_pyrdown():
    import scipy.ndimage

    images = smooth_images(2, 64).float()
    levels = helpers.laplacian_pyramid(images)
    assert [level.shape[-1] for level in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for level in reversed(levels[:-1]):
        rebuilt = level + helpers.pyr_up(rebuilt, level.shape[-2:])
    assert torch.allclose(rebuilt, images, atol=1e-3)
    # Karras et al.'s pyr_down: scipy convolve with the 5x5 binomial filter, mode="mirror".
    taps = np.float32([1, 4, 6, 4, 1])
    kernel = np.outer(taps, taps)[None, None] / 256
    expected = scipy.ndimage.convolve(images.numpy(), kernel, mode="mirror")[:, :, ::2, ::2]
    assert np.allclose(helpers.pyr_down(images).numpy(), expected, atol=1e-3)


def test_swd_rejects_bad_input_with_a_clear_message():
    images = smooth_images(4, 32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        helpers.swd([image for image in images], images)
    with pytest.raises(ValueError, match=r"N×3×H×W.*permute"):
        helpers.swd(images.permute(0, 2, 3, 1), images.permute(0, 2, 3, 1))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        helpers.swd(images.long(), images)
    with pytest.raises(ValueError, match="looks like 0-255"):
        helpers.swd(images.float(), images)
    with pytest.raises(ValueError, match="at least 2 images"):
        helpers.swd(images[:1], images[:1])
    with pytest.raises(ValueError, match="same size"):
        helpers.swd(images, images[:3])
    with pytest.raises(ValueError, match="at least 16"):
        helpers.swd(images[:, :, :8, :8], images[:, :, :8, :8])
    with pytest.raises(ValueError, match="NaN"):
        helpers.swd(torch.full((2, 3, 32, 32), float("nan")), images[:2])


# --------------------------------------------------------------------------- FID and KID


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: 2×2 average colours (12 features) of a uint8 batch."""

    num_features = 12

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


def test_fid_and_kid_are_near_zero_for_identical_sets_and_positive_for_different_ones():
    real = smooth_images(40)
    fid, kid = helpers.make_fid_kid(TinyFeatures(), kid_subset_size=20)
    helpers.add_real_images(fid, kid, real)
    same = helpers.fid_kid_scores(fid, kid, real)
    assert abs(same["fid"]) < 1e-6
    assert abs(same["kid"]) < 0.01  # unbiased, so near 0 on either side (random subsets)
    darker = helpers.fid_kid_scores(fid, kid, (real.float() * 0.6).round().to(torch.uint8))
    assert darker["fid"] > 0.1 and darker["kid"] > 10 * abs(same["kid"])
    # reset() keeps the real features: scoring the real set again still gives ~0.
    assert helpers.fid_kid_scores(fid, kid, real) == same


def test_kid_is_seeded_and_leaves_the_global_rng_alone():
    real, other = smooth_images(30), smooth_images(30, seed=9)
    fid, kid = helpers.make_fid_kid(TinyFeatures(), kid_subset_size=10)
    helpers.add_real_images(fid, kid, real)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = helpers.fid_kid_scores(fid, kid, other)
    assert torch.equal(torch.rand(1), expected_next)
    assert helpers.fid_kid_scores(fid, kid, other) == first


def test_kid_with_too_few_images_for_its_subsets_says_what_to_do():
    real = smooth_images(30)
    fid, kid = helpers.make_fid_kid(TinyFeatures(), kid_subset_size=20)
    helpers.add_real_images(fid, kid, real)
    with pytest.raises(ValueError, match=r"subsets of 20 images.*10 generated.*kid_subset_size=10"):
        helpers.fid_kid_scores(fid, kid, real[:10])
    with pytest.raises(ValueError, match="N×3×H×W"):
        helpers.fid_kid_scores(fid, kid, real[:, 0])


def test_quality_metrics_reports_swd_alone_or_with_fid_and_kid():
    real, fake = smooth_images(20), smooth_images(20, seed=2)
    assert set(helpers.quality_metrics(real, fake)) == {"swd", "swd_32px", "swd_16px"}
    fid_kid = helpers.make_fid_kid(TinyFeatures(), kid_subset_size=10)
    helpers.add_real_images(*fid_kid, real)
    scores = helpers.quality_metrics(real, fake, fid_kid)
    assert {"swd", "fid", "kid", "kid_std"} <= set(scores)


def test_make_inception_explains_a_missing_or_broken_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid_weights_path="):
        helpers.make_inception(str(tmp_path / "missing.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="fid_weights_path"):
        helpers.make_inception(str(broken))


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


def test_save_figure_adds_the_footer_and_saves_only_where_asked(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    helpers.save_figure(fig, None, "not_saved", "data; hardware; date")  # no figures_dir: nothing written
    assert fig.get_supxlabel() == "data; hardware; date"
    helpers.save_figure(fig, str(tmp_path / "new" / "images"), "02_example", "data; hardware; date")
    assert os.listdir(tmp_path / "new" / "images") == ["02_example.png"]  # the folder is created
    plain, _ = plt.subplots()
    helpers.save_figure(plain, str(tmp_path), "plain")
    assert plain.get_supxlabel() == "" and (tmp_path / "plain.png").is_file()
    plt.close("all")


@pytest.mark.parametrize("name", ["dpm++", "unipc"])
def test_multistep_samplers_clip_their_clean_image_estimate_like_ddpm(name):
    from diffusers import DDPMScheduler

    def bad_noise_estimate(x, t):  # an untrained model: noise estimates unrelated to the sample
        return type("Out", (), {"sample": torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))})()

    scheduler = helpers.make_scheduler(name, DDPMScheduler(num_train_timesteps=1000))
    assert scheduler.config.thresholding and scheduler.config.sample_max_value == 1.0
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = helpers.sample(bad_noise_estimate, scheduler, noise, 10)
    assert images.abs().max() <= 1.0 + 1e-5  # without thresholding this reaches ~100
