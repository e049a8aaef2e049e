"""Bad input: Hub ids, folders, odd image files and modes, sizes, and config settings that cannot work.

Every test checks the message a learner would read, not only the exception type. No test touches the network.
"""

import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import helpers

OFFLINE_WORDS = "Could not reach the Hugging Face Hub"
NOT_FOUND_WORDS = "The Hub has no dataset"


@pytest.fixture(autouse=True)
def offline_and_private_cache(tmp_path, monkeypatch):
    """No Hub access in any test, and datasets' Arrow cache in the test's own folder."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read the variables once, at import: set the values they already hold too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets-cache"))


def save(folder, name, image, **kwargs):
    """Save a PIL image into folder/name and return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    image.save(path, **kwargs)
    return path


def load_folder(folder, image_size):
    """The course's path from a folder to the cached uint8 tensor, plus the file name of each row."""
    from datasets import Image as ImageFeature

    dataset = helpers.load_image_dataset(str(folder))
    paths = [r["path"] for r in dataset.cast_column("image", ImageFeature(decode=False))["image"]]
    return helpers.images_to_tensor(dataset, image_size), [os.path.basename(p) for p in paths]


def gradient(width, height):
    """An RGB image with some structure, so resizing has something to do."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    return Image.fromarray(array.astype(np.uint8))


# --------------------------------------------------------------------------- the Hub


def test_offline_hub_id_fails_fast_saying_the_hub_cannot_be_reached():
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as info:
        helpers.load_image_dataset("huggan/smithsonian_butterflies_subset")
    assert time.perf_counter() - start < 15
    message = str(info.value)
    assert OFFLINE_WORDS in message and "'huggan/smithsonian_butterflies_subset'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local folder" in message and "dataset_name=" in message
    assert NOT_FOUND_WORDS not in message


def test_missing_hub_id_says_not_found_and_how_to_use_a_local_folder(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def missing(path, *args, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(RuntimeError) as info:
        helpers.load_image_dataset("someone/no-such-dataset")
    message = str(info.value)
    assert NOT_FOUND_WORDS in message and "'someone/no-such-dataset'" in message
    assert "huggingface.co/datasets" in message
    assert "local folder" in message and "dataset_name=" in message
    assert OFFLINE_WORDS not in message
    assert isinstance(info.value.__cause__, DatasetNotFoundError)


def test_not_found_is_not_mistaken_for_offline_when_the_name_contains_network_words():
    from datasets.exceptions import DatasetNotFoundError

    name = "offline-lab/network-reach-images"
    err = DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
    assert NOT_FOUND_WORDS in helpers.hub_error_message(name, err)


@pytest.mark.parametrize(
    "make_error",
    [
        lambda: ConnectionError("Couldn't reach 'a/b' on the Hub (OfflineModeIsEnabled)"),
        lambda: __import__("huggingface_hub").errors.LocalEntryNotFoundError(
            "Cannot find the requested files in the local cache."
        ),
        lambda: FileNotFoundError("Dataset a/b is not cached in /somewhere and HF_HUB_OFFLINE is set"),
        lambda: TimeoutError("The read operation timed out"),
    ],
    ids=["connection", "local-cache", "not-cached", "timeout"],
)
def test_offline_and_cache_misses_are_reported_as_cannot_reach(make_error):
    message = helpers.hub_error_message("a/b", make_error())
    assert OFFLINE_WORDS in message and "local folder" in message
    assert NOT_FOUND_WORDS not in message


def test_other_hub_failures_are_not_called_missing():
    message = helpers.hub_error_message("a/b", ValueError('Unknown split "train". Should be one of [\'test\'].'))
    assert NOT_FOUND_WORDS not in message and OFFLINE_WORDS not in message
    assert "'a/b'" in message and "Unknown split" in message and "local folder" in message


def test_a_relative_folder_that_does_not_exist_is_named_in_the_hub_message():
    # "data/butterflies" has one slash, so it reads as a Hub id; the message must say no such folder exists.
    with pytest.raises(RuntimeError) as info:
        helpers.load_image_dataset("data/butterflies")
    message = str(info.value)
    assert "no folder" in message and "'data/butterflies'" in message
    assert f"in {helpers.shown_path(os.getcwd())!r}" in message  # the folder it looked in, from the course's root


# --------------------------------------------------------------------------- local folders


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        helpers.load_image_dataset(str(tmp_path / "nowhere" / "images"))
    message = str(info.value)
    assert "no such folder exists" in message and "nowhere" in message and "Check the path" in message


def test_empty_local_folder(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError) as info:
        helpers.load_image_dataset(str(tmp_path / "empty"))
    assert "is empty" in str(info.value) and "put your images" in str(info.value)


def test_folder_without_images(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    (folder / "photo.heic").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError) as info:
        helpers.load_image_dataset(str(folder))
    message = str(info.value)
    assert "holds 2 files but no images" in message and ".jpg" in message and ".png" in message


def test_unreadable_files_are_skipped_with_a_warning_naming_each_and_the_rest_load(tmp_path):
    folder = tmp_path / "mixed"
    for i in range(3):
        save(folder, f"good_{i}.png", gradient(40, 30))
    save(folder, "big.jpg", gradient(120, 90), quality=90)
    png = (folder / "good_0.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    jpg = (folder / "big.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "text_named.jpg").write_text("this is not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = helpers.load_image_dataset(str(folder))
        images = helpers.images_to_tensor(dataset, 16)
    text = "\n".join(str(w.message) for w in caught)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    for bad in ("truncated.png", "truncated.jpg", "text_named.jpg", "empty.png", "notes.txt"):
        assert bad in text, f"{bad} is not named in the warnings:\n{text}"
    for good in ("good_0.png", "good_1.png", "good_2.png", "big.jpg"):
        assert good not in text
    assert "Skipped 4 unreadable image(s)" in text
    # The cache is decoded once: training only ever sees this tensor, so nothing can fail later.
    batch = next(iter(helpers.make_dataloader(images, helpers.TrainingConfig(train_batch_size=4))))[0]
    assert batch.shape == (4, 3, 16, 16)


def test_a_folder_where_no_image_can_be_read_says_so(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_text("nope")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n")
    with pytest.warns(UserWarning, match="Skipped 2 unreadable"), pytest.raises(ValueError) as info:
        helpers.images_to_tensor(helpers.load_image_dataset(str(folder)), 16)
    assert "None of the 2 images could be read" in str(info.value)


# --------------------------------------------------------------------------- image modes


def make_mode_images():
    """(file name, PIL image, save kwargs, expected RGB of the top-left pixel, of the bottom-right pixel)."""
    l_image = Image.new("L", (8, 8), 100)
    l_image.putpixel((7, 7), 250)
    la = Image.new("LA", (8, 8), (100, 0))  # fully transparent
    la.putpixel((7, 7), (100, 255))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparent red -> white
    rgba.putpixel((7, 7), (10, 20, 30, 255))
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((7, 7), 1)
    palette_t = palette.copy()
    one_bit = Image.new("1", (8, 8), 1)
    one_bit.putpixel((7, 7), 0)
    i16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    i16.putpixel((7, 7), 0)
    f_unit = Image.fromarray(np.full((8, 8), 1.0, dtype=np.float32), "F")
    f_unit.putpixel((7, 7), 0.5)
    f_bytes = Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32), "F")
    f_bytes.putpixel((7, 7), 0.0)
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
    for xy in [(x, y) for x in range(4, 8) for y in range(4, 8)]:
        cmyk.putpixel(xy, (0, 0, 0, 255))  # full black ink (a block: JPEG is lossy)
    return [
        ("l.png", l_image, {}, (100,) * 3, (250,) * 3),
        ("la.png", la, {}, (255,) * 3, (100,) * 3),
        ("rgba.png", rgba, {}, (255,) * 3, (10, 20, 30)),
        ("p.png", palette, {}, (255, 0, 0), (0, 0, 255)),
        ("p_transparent.png", palette_t, {"transparency": 0}, (255,) * 3, (0, 0, 255)),
        ("one_bit.png", one_bit, {}, (255,) * 3, (0,) * 3),
        ("i16.png", i16, {}, (255,) * 3, (0,) * 3),
        ("f_unit.tif", f_unit, {}, (255,) * 3, (128,) * 3),
        ("f_bytes.tif", f_bytes, {}, (200,) * 3, (0,) * 3),
        ("cmyk.jpg", cmyk, {"quality": 95}, (255,) * 3, (0,) * 3),
    ]


@pytest.mark.parametrize("case", make_mode_images(), ids=lambda case: case[0])
def test_image_to_rgb_gives_8_bit_rgb_with_sensible_values(tmp_path, case):
    name, image, kwargs, first, last = case
    path = save(tmp_path, name, image, **kwargs)
    with Image.open(path) as reopened:
        rgb = helpers.image_to_rgb(reopened)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    array = np.asarray(rgb)
    assert array.dtype == np.uint8
    tolerance = 8 if name.endswith(".jpg") else 1
    assert np.abs(array[0, 0].astype(int) - first).max() <= tolerance, (name, array[0, 0])
    assert np.abs(array[7, 7].astype(int) - last).max() <= tolerance, (name, array[7, 7])


def test_every_mode_goes_through_the_folder_loader(tmp_path):
    folder = tmp_path / "modes"
    cases = make_mode_images()
    for name, image, kwargs, _, _ in cases:
        save(folder, name, image, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, names = load_folder(folder, 8)
    assert not [w for w in caught if "Skip" in str(w.message)]  # every mode is read, none skipped
    assert images.shape == (len(cases), 3, 8, 8) and images.dtype == torch.uint8
    expected = {name: first for name, _, _, first, _ in cases}
    for row, name in zip(images, names):
        tolerance = 8 if name.endswith(".jpg") else 2
        assert (row[:, 0, 0].int() - torch.tensor(expected[name])).abs().max() <= tolerance, (name, row[:, 0, 0])


def test_16_bit_values_scale_instead_of_clipping(tmp_path):
    array = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = save(tmp_path, "ramp16.png", Image.fromarray(array))
    with Image.open(path) as image:
        assert image.mode.startswith("I")
        values = np.asarray(helpers.image_to_rgb(image))[0, :, 0]
    assert values.tolist() == [0, 1, 128, 255]


# --------------------------------------------------------------------------- sizes


def test_small_images_are_upscaled_to_exactly_image_size(tmp_path):
    save(tmp_path / "small", "tiny.png", gradient(10, 7))
    save(tmp_path / "small", "tiny_tall.jpg", gradient(5, 12))
    images, _ = load_folder(tmp_path / "small", 32)
    assert images.shape == (2, 3, 32, 32)


def test_very_large_jpeg_is_decoded_in_draft_mode_to_the_right_shape(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    save(tmp_path / "big", "huge.jpg", gradient(3000, 2000), quality=85)
    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        drafts.append((mode, size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    images, _ = load_folder(tmp_path / "big", 64)
    assert images.shape == (1, 3, 64, 64) and images.dtype == torch.uint8
    assert drafts == [("RGB", (64, 64), (375, 250))]  # decoded at 1/8 scale, still larger than 64


def test_non_square_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30] = (255, 0, 0)  # red | green | blue thirds: only green survives a centre crop
    wide[:, 30:60] = (0, 255, 0)
    wide[:, 60:] = (0, 0, 255)
    save(tmp_path / "shapes", "a_wide.png", Image.fromarray(wide))
    save(tmp_path / "shapes", "b_tall.png", Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))))
    images, names = load_folder(tmp_path / "shapes", 16)
    assert names == ["a_wide.png", "b_tall.png"]
    assert images.shape == (2, 3, 16, 16)
    for image in images:
        inner = image[:, 2:-2, 2:-2].int()  # away from the crop edge, where bicubic blends the bands
        assert inner[1].min() >= 240 and inner[0].max() <= 15 and inner[2].max() <= 15
    assert images[0, 1].float().mean() > 200 and images[1, 1].float().mean() > 200


def test_make_decode_transform_output_is_square_uint8():
    out = helpers.make_decode_transform(24)(gradient(50, 31))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


# --------------------------------------------------------------------------- config


def test_training_config_accepts_keywords_unlike_the_tutorials_unannotated_dataclass():
    from dataclasses import dataclass

    @dataclass
    class TutorialConfig:  # the tutorial's pattern: class attributes without annotations are no fields
        image_size = 128

    with pytest.raises(TypeError):
        TutorialConfig(image_size=64)
    config = helpers.TrainingConfig(image_size=64)
    assert config.image_size == 64
    helpers.check_config(config)


def test_preset_keeps_its_block_types_when_given_its_own_channels_and_derives_them_for_others():
    quick = helpers.preset_config("quick")
    same = helpers.preset_config("quick", block_out_channels=[32, 64, 128])  # the value the notebook's comment shows
    assert same.down_block_types == quick.down_block_types == ("DownBlock2D",) * 3
    other = helpers.preset_config("quick", block_out_channels=(32, 64, 128, 128))
    assert other.down_block_types == helpers.default_down_block_types(4)


def test_derived_block_types_for_six_levels_are_the_tutorials():
    config = helpers.TrainingConfig()
    assert config.down_block_types == (
        "DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
    )
    assert config.up_block_types == (
        "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D",
    )


def test_the_tutorial_model_has_113_673_219_parameters():
    assert helpers.count_parameters(helpers.make_model(helpers.TrainingConfig())) == 113_673_219


@pytest.mark.parametrize(
    "image_size, channels, multiple, example",
    [(100, (128, 128, 256, 256, 512, 512), 32, 96), (16, (128, 128, 256, 256, 512, 512), 32, 32), (31, (32, 64), 2, 30)],
)
def test_image_size_the_unet_cannot_halve_names_the_multiple(image_size, channels, multiple, example):
    config = helpers.TrainingConfig(image_size=image_size, block_out_channels=channels)
    for call in (helpers.check_config, helpers.make_model):
        with pytest.raises(ValueError) as info:
            call(config)
        message = str(info.value)
        assert f"image_size={image_size}" in message
        assert f"use a multiple of {multiple} (e.g. {example})" in message
        assert "fewer block_out_channels" in message


def test_image_size_not_divisible_by_a_small_unet():
    config = helpers.TrainingConfig(image_size=30, block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match=r"use a multiple of 4 \(e\.g\. 28\)"):
        helpers.make_model(config)


@pytest.mark.parametrize("field", ["down_block_types", "up_block_types"])
def test_block_types_whose_length_does_not_match_block_out_channels(field):
    config = helpers.TrainingConfig(block_out_channels=(32, 64), **{field: ("DownBlock2D",) * 3})
    with pytest.raises(ValueError) as info:
        helpers.check_config(config)
    message = str(info.value)
    assert f"{field} has 3 entries but block_out_channels has 2" in message
    assert f"{field}=None" in message


def test_changing_block_out_channels_after_creation_explains_the_derived_block_types():
    config = helpers.TrainingConfig()
    config.block_out_channels = (32, 64)
    with pytest.raises(ValueError) as info:
        helpers.check_config(config)
    assert "new TrainingConfig" in str(info.value)


def test_batch_size_larger_than_the_dataset():
    images = torch.zeros(5, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError) as info:
        helpers.make_dataloader(images, helpers.TrainingConfig(train_batch_size=16))
    message = str(info.value)
    assert "train_batch_size=16 is larger than the dataset (5 images)" in message
    assert "at most 5" in message
    assert len(helpers.make_dataloader(images, helpers.TrainingConfig(train_batch_size=5))) == 1


def fake_machine(monkeypatch, gpu=None, cpu_bf16=False, mps=False):
    """Fake the hardware: gpu None (no GPU), "t4" (bf16 only emulated) or "h100" (bf16 tensor cores); mps: Apple's GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu is not None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    def is_bf16_supported(including_emulation=True):
        return gpu == "h100" or (gpu == "t4" and including_emulation)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(helpers, "cpu_has_native_bf16", lambda: cpu_bf16)


@pytest.mark.parametrize("gpu, cpu_bf16, expected", [
    ("t4", False, "fp16"),  # a T4 (or V100) emulates bf16: torch.cuda.is_bf16_supported() alone says True
    ("h100", False, "bf16"),
    (None, True, "bf16"),  # a CPU with AVX512-BF16 or AMX
    (None, False, "no"),  # a CPU without: bf16 would be emulated, many times slower
])
def test_auto_precision_is_native_bf16_else_fp16_on_a_gpu_else_float32(monkeypatch, gpu, cpu_bf16, expected):
    fake_machine(monkeypatch, gpu, cpu_bf16)
    assert helpers.resolve_mixed_precision("auto") == expected
    assert helpers.resolve_mixed_precision("no") == "no"


def test_fp16_without_a_gpu(monkeypatch):
    fake_machine(monkeypatch, gpu=None, cpu_bf16=True)
    with pytest.raises(ValueError) as info:
        helpers.check_config(helpers.TrainingConfig(mixed_precision="fp16"))
    message = str(info.value)
    assert "mixed_precision='fp16' needs a GPU" in message and "'auto'" in message


def test_bf16_on_a_cpu_only_where_it_is_native(monkeypatch):
    fake_machine(monkeypatch, gpu=None, cpu_bf16=True)
    helpers.check_config(helpers.TrainingConfig(mixed_precision="bf16"))  # accepted
    fake_machine(monkeypatch, gpu=None, cpu_bf16=False)
    with pytest.raises(ValueError) as info:
        helpers.check_config(helpers.TrainingConfig(mixed_precision="bf16"))
    assert "computes bf16 natively" in str(info.value) and "'no'" in str(info.value)


def test_cpu_has_native_bf16_reads_the_cpu_flags_on_old_torch(monkeypatch, tmp_path):
    """Where torch cannot say (before torch.cpu._is_avx512_bf16_supported), the flags Linux lists decide."""
    import builtins

    import torch.cpu

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)  # absent on the oldest torch
    real_open = builtins.open
    for flags, expected in [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True),
                            ("fpu sse avx2 fma", False)]:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p, *a, **k))
        assert helpers.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("accelerate_version, torch_version, num_processes, refused", [
    ("1.12.0", "2.10.0+cu128", 2, True),  # accelerate #3925: the launcher's fork fails
    ("1.9.0", "2.11.0", 8, True),
    ("1.14.0", "2.10.0+cu128", 2, False),  # fixed by accelerate PR #4059
    ("1.12.0", "2.9.1", 2, False),  # torch before 2.10 did not touch CUDA in the parent
    ("1.8.1", "2.10.0", 2, False),
    ("1.12.0", "2.10.0+cu128", 1, False),  # one process: no fork
])
def test_launcher_versions_that_cannot_fork_are_refused_with_the_fix(monkeypatch, accelerate_version, torch_version,
                                                                     num_processes, refused):
    import accelerate

    fake_machine(monkeypatch, gpu="h100")
    monkeypatch.setattr(accelerate, "__version__", accelerate_version)
    monkeypatch.setattr(torch, "__version__", torch_version)
    if not refused:
        helpers.check_launcher(num_processes)
        return
    with pytest.raises(RuntimeError) as info:
        helpers.check_launcher(num_processes)
    message = str(info.value)
    assert f"accelerate {accelerate_version}" in message and f"torch {torch_version}" in message
    assert 'pip install -U "accelerate>=1.14"' in message and "num_processes=1" in message


def test_unknown_noise_schedule_and_prediction_type():
    with pytest.raises(ValueError, match="beta_schedule='cosine'.*'squaredcos_cap_v2'"):
        helpers.check_config(helpers.TrainingConfig(beta_schedule="cosine"))
    with pytest.raises(ValueError, match="prediction_type='sample'.*'v_prediction'"):
        helpers.check_config(helpers.TrainingConfig(prediction_type="sample"))


def test_unknown_mixed_precision():
    with pytest.raises(ValueError) as info:
        helpers.check_config(helpers.TrainingConfig(mixed_precision="float16"))
    assert "mixed_precision='float16'" in str(info.value) and "'bf16'" in str(info.value)


def test_unknown_eval_sampler():
    with pytest.raises(ValueError) as info:
        helpers.check_config(helpers.TrainingConfig(eval_sampler="dpm-solver"))
    message = str(info.value)
    assert "eval_sampler='dpm-solver'" in message
    for name in ("ddpm", "ddim", "dpm++"):
        assert name in message


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_samplers_that_ddpm_pipeline_cannot_drive_are_refused_for_evaluation(sampler):
    with pytest.raises(ValueError, match="cannot drive the evaluation grids.*notebook 06"):
        helpers.check_config(helpers.TrainingConfig(eval_sampler=sampler))


def test_channels_that_groupnorm_cannot_split_are_refused():
    with pytest.raises(ValueError, match=r"\[48\] not a multiple of 32.*GroupNorm"):
        helpers.check_config(helpers.TrainingConfig(image_size=32, block_out_channels=(32, 48)))


@pytest.mark.parametrize("field", ["image_size", "train_batch_size", "num_epochs"])
def test_sizes_below_one(field):
    with pytest.raises(ValueError, match=f"{field}=0 must be at least 1"):
        helpers.check_config(helpers.TrainingConfig(**{field: 0}))


# --------------------------------------------------------------------------- output folder and resuming


def make_run_folder(root):
    """An output_dir as a finished run leaves it, plus a file of the learner's own."""
    out = root / "ddpm-run"
    for name in ("checkpoint-10", "checkpoint-20", "unet", "scheduler", "samples", "logs", "checkpoint-30.tmp"):
        (out / name).mkdir(parents=True)
        (out / name / "x.bin").write_bytes(b"0")
    (out / "model_index.json").write_text("{}")
    (out / "my_notes.md").write_text("keep me")
    (out / "data").mkdir()
    (out / "data" / "keep.png").write_bytes(b"0")
    return out


def test_resume_from_a_missing_checkpoint_names_the_available_ones(tmp_path):
    out = make_run_folder(tmp_path)
    config = helpers.TrainingConfig(output_dir=str(out), resume_from_checkpoint="checkpoint-25")
    with pytest.raises(FileNotFoundError) as info:
        helpers.find_resume_checkpoint(config)
    message = str(info.value)
    assert "resume_from_checkpoint='checkpoint-25'" in message
    assert "checkpoint-10" in message and "checkpoint-20" in message and "checkpoint-30.tmp" not in message
    assert "'latest'" in message


def test_resume_with_no_checkpoints_at_all_says_none(tmp_path):
    config = helpers.TrainingConfig(output_dir=str(tmp_path / "fresh"), resume_from_checkpoint="checkpoint-5")
    with pytest.raises(FileNotFoundError, match="none"):
        helpers.find_resume_checkpoint(config)


def test_resume_latest_picks_the_newest_finished_checkpoint(tmp_path):
    out = make_run_folder(tmp_path)
    config = helpers.TrainingConfig(output_dir=str(out), resume_from_checkpoint="latest")
    assert helpers.find_resume_checkpoint(config) == str(out / "checkpoint-20")


@pytest.mark.parametrize("marker", ["model_index.json", "checkpoint-7"])
def test_refuses_to_train_over_an_earlier_run(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).mkdir() if marker.startswith("checkpoint") else (out / marker).write_text("{}")
    with pytest.raises(FileExistsError) as info:
        helpers.prepare_output_dir(helpers.TrainingConfig(output_dir=str(out)))
    message = str(info.value)
    assert "resume_from_checkpoint='latest'" in message and "overwrite_output_dir=True" in message
    assert (out / marker).exists()


def test_overwrite_clears_the_earlier_run_but_keeps_unrelated_files(tmp_path):
    out = make_run_folder(tmp_path)
    helpers.prepare_output_dir(helpers.TrainingConfig(output_dir=str(out), overwrite_output_dir=True))
    assert sorted(os.listdir(out)) == ["data", "my_notes.md"]
    assert (out / "my_notes.md").read_text() == "keep me" and (out / "data" / "keep.png").exists()


# --------------------------------------------------------------------------- augmentation


def test_augment_batch_scales_to_minus_one_one_and_flips_about_half():
    torch.manual_seed(0)
    batch = torch.zeros(2000, 3, 2, 2, dtype=torch.uint8)
    batch[..., 1] = 255  # left column 0, right column 255
    out = helpers.augment_batch(batch)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert set(out.unique().tolist()) == {-1.0, 1.0}
    flipped = out[:, 0, 0, 0] == 1.0
    assert torch.equal(out[flipped][..., 1], torch.full_like(out[flipped][..., 1], -1.0))
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert torch.equal(out[~flipped], batch[~flipped].float() / 127.5 - 1)


def test_bf16_detection_needs_no_proc_cpuinfo(monkeypatch):
    """macOS and Windows have no /proc/cpuinfo: the answer comes from torch's own CPU query, unchanged without it."""
    import builtins

    answer = helpers.cpu_has_native_bf16()
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        assert answer == ("avx512_bf16" in flags or "amx_bf16" in flags)  # the same answer as the CPU's own flags
    except OSError:
        pass
    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path).startswith("/proc/cpuinfo"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    assert helpers.cpu_has_native_bf16() is answer


def test_the_device_is_cuda_then_mps_then_cpu(monkeypatch):
    fake_machine(monkeypatch, gpu="h100", mps=True)
    assert helpers.pick_device() == "cuda"
    fake_machine(monkeypatch, gpu=None, mps=True)
    assert helpers.pick_device() == "mps"
    fake_machine(monkeypatch, gpu=None, mps=False)
    assert helpers.pick_device() == "cpu"


@pytest.mark.parametrize("accelerate_version, torch_version, macos_14, auto, accepted", [
    ("1.16.0", "2.14.1", True, "fp16", {"fp16", "bf16"}),  # accelerate >= 1.11 (PR #3373), torch >= 2.8
    ("1.16.0", "2.7.1", True, "bf16", {"bf16"}),  # fp16 on MPS needs torch 2.8's GradScaler
    ("1.16.0", "2.7.1", False, "no", set()),  # bf16 on MPS needs macOS 14
    ("1.10.1", "2.14.1", True, "no", set()),  # before accelerate 1.11 neither was allowed on MPS
])
def test_mixed_precision_on_mps_follows_the_installed_versions(monkeypatch, accelerate_version, torch_version,
                                                               macos_14, auto, accepted):
    import accelerate

    fake_machine(monkeypatch, gpu=None, cpu_bf16=True, mps=True)
    monkeypatch.setattr(accelerate, "__version__", accelerate_version)
    monkeypatch.setattr(torch, "__version__", torch_version)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos_14, raising=False)
    assert helpers.resolve_mixed_precision("auto") == auto
    helpers.check_config(helpers.TrainingConfig(mixed_precision="auto"))
    helpers.check_config(helpers.TrainingConfig(mixed_precision="no"))
    for precision in ("fp16", "bf16"):
        if precision in accepted:
            helpers.check_config(helpers.TrainingConfig(mixed_precision=precision))
            continue
        with pytest.raises(ValueError) as info:
            helpers.check_config(helpers.TrainingConfig(mixed_precision=precision))
        message = str(info.value)
        assert f"mixed_precision={precision!r} on Apple's MPS" in message and "accelerate >= 1.11" in message
        assert f"accelerate {accelerate_version}" in message and f"it picks {auto!r} here" in message


def test_several_processes_are_refused_on_windows_naming_accelerate_launch(monkeypatch):
    fake_machine(monkeypatch, gpu="h100")
    monkeypatch.setattr(helpers.sys, "platform", "win32")
    with pytest.raises(RuntimeError) as info:
        helpers.check_launcher(2)
    message = str(info.value)
    assert "num_processes=2" in message and "Windows" in message and "fork" in message
    assert "num_processes=1" in message and "accelerate launch --multi_gpu --num_processes 2 helpers.py" in message
    helpers.check_launcher(1)  # one process: nothing forks


@pytest.mark.parametrize("mps, words", [(True, "Apple's MPS, a single device"), (False, "its CPU")])
def test_several_processes_are_refused_without_cuda(monkeypatch, mps, words):
    """On MPS or a CPU, notebook_launcher's processes would be unsynchronised copies of the same run."""
    fake_machine(monkeypatch, gpu=None, mps=mps)
    with pytest.raises(RuntimeError) as info:
        helpers.check_launcher(2)
    assert words in str(info.value) and "Set num_processes=1" in str(info.value)
    helpers.check_launcher(1)


def test_train_minutes_cannot_be_given_with_max_train_steps():
    with pytest.raises(ValueError, match=r"train_minutes=5 with max_train_steps=100.*max_train_steps=None"):
        helpers.check_config(helpers.TrainingConfig(train_minutes=5, max_train_steps=100))
    with pytest.raises(ValueError, match=r"train_minutes=0 .*positive"):
        helpers.check_config(helpers.TrainingConfig(train_minutes=0))
