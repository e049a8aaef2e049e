"""Notebook 08: labels from class folders, fine-tuning into a class-conditional model, guidance, the saved folder."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT, tiny_config, write_images

import helpers

CLASSES = ("blue_morpho", "cabbage_white", "monarch")


def write_class_folders(folder, per_class=8):
    """A folder of class subfolders (imagefolder's convention), each with its own generated images."""
    for seed, name in enumerate(CLASSES):
        write_images(os.path.join(folder, name), per_class, seed=seed)
    return str(folder)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny unconditional pipeline, as 05 saves it: what 08 fine-tunes."""
    tmp = tmp_path_factory.mktemp("base")
    folder = write_images(str(tmp / "images"), 16)
    config = tiny_config(tmp / "base", num_epochs=1, save_image_epochs=10, use_ema=False)
    images = helpers.images_to_tensor(helpers.load_image_dataset(folder), config.image_size)
    helpers.train_loop(*helpers.build_training(config, images))
    return config.output_dir


def test_a_flat_folder_or_a_single_class_stops_before_decoding_and_names_the_layout(tmp_path):
    flat = write_images(str(tmp_path / "flat"), 6)
    with pytest.raises(ValueError, match="no label column") as info:
        helpers.labelled_images(flat, 32)
    assert "subfolder of its own" in str(info.value) and "my_images/monarch/" in str(info.value)
    single = write_images(str(tmp_path / "single" / "monarch"), 6)
    with pytest.raises(ValueError, match="subfolder of its own"):
        helpers.labelled_images(os.path.dirname(single), 32)
    with pytest.raises(RuntimeError, match="subfolder of its own"):  # offline, a Hub id: the layout that works instead
        helpers.labelled_images("nobody-here/no-such-butterflies", 32)


def test_class_folders_label_each_image_and_an_unreadable_file_takes_its_label_with_it(tmp_path):
    folder = write_class_folders(tmp_path / "data", per_class=4)
    with open(os.path.join(folder, "monarch", "broken.png"), "wb") as file:
        file.write(b"not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, labels, class_names = helpers.labelled_images(folder, 16)
    assert class_names == CLASSES
    assert len(images) == len(labels) == 12 and torch.bincount(labels).tolist() == [4, 4, 4]
    messages = " ".join(str(w.message) for w in caught)
    assert "fewer than 20 images: blue_morpho (4), cabbage_white (4), monarch (5)" in messages  # counted before decoding
    assert "Skipped 1 unreadable image" in messages


def test_fine_tuning_adds_a_zeroed_class_embedding_so_every_label_starts_as_the_base_model(base_model):
    from diffusers import UNet2DModel

    config = tiny_config("unused", class_names=CLASSES, pretrained_model=base_model)
    before = UNet2DModel.from_pretrained(base_model, subfolder="unet").eval()
    after = helpers.load_pretrained_unet(config).eval()
    assert after.config.num_class_embeds == len(CLASSES) + 1
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([10, 300, 600, 990])
    with torch.no_grad():
        expected = before(x, t).sample
        for label in range(len(CLASSES) + 1):
            got = after(x, t, class_labels=torch.full((4,), label)).sample
            assert torch.equal(got, expected), label
    with pytest.raises(ValueError, match="image_size=64"):
        helpers.load_pretrained_unet(dataclasses.replace(config, image_size=64))
    with pytest.raises(FileNotFoundError, match="05_training"):
        helpers.load_pretrained_unet(dataclasses.replace(config, pretrained_model=os.path.dirname(base_model)))


def test_guidance_is_the_unconditional_prediction_plus_w_times_the_difference():
    config = tiny_config("unused", class_names=CLASSES)
    torch.manual_seed(0)
    unet = helpers.make_model(config).eval()
    torch.nn.init.normal_(unet.class_embedding.weight)  # classes that change the output
    x, t, labels = torch.randn(3, 3, 32, 32), torch.tensor(400), torch.tensor([0, 1, 2])
    with torch.no_grad():
        conditional = unet(x, t, class_labels=labels).sample
        unconditional = unet(x, t, class_labels=torch.full((3,), len(CLASSES))).sample
        for w in (0.0, 1.0, 3.0):
            guided = helpers.guided_prediction(unet, x, t, labels, w)
            torch.testing.assert_close(guided, unconditional + w * (conditional - unconditional), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)  # the check above could not pass by accident


def test_drop_labels_replaces_about_label_dropout_of_the_labels_with_no_class():
    config = tiny_config("unused", class_names=CLASSES, label_dropout=0.25)
    labels = torch.arange(3).repeat(4000)
    torch.manual_seed(0)
    dropped = helpers.drop_labels([labels], config)
    no_class = dropped == len(CLASSES)
    assert 0.23 < no_class.float().mean().item() < 0.27
    assert torch.equal(dropped[~no_class], labels[~no_class])
    assert helpers.drop_labels([], config) is None  # an unconditional batch: no labels at all


def cli(output_dir, data, base, *extra):
    """`accelerate launch helpers.py --class_conditional true ...` as 08's docs give it, as a subprocess."""
    flags = dict(dataset_name=data, output_dir=output_dir, class_conditional="true", pretrained_model=base,
                 image_size=32, block_out_channels="32,64", layers_per_block=1, train_batch_size=4, eval_batch_size=6,
                 num_epochs=2, lr_warmup_steps=2, save_image_epochs=100, save_model_epochs=100, mixed_precision="no",
                 eval_inference_steps=2, checkpointing_steps=4, checkpoints_total_limit=3, logging_steps=1,
                 learning_rate=5e-4, use_ema="false")
    command = [sys.executable, os.path.join(ROOT, "helpers.py")]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    return command + list(extra)


def test_a_conditional_run_from_the_command_line_saves_class_names_and_resumes_exactly(tmp_path, base_model):
    from diffusers import UNet2DModel
    from PIL import Image

    data = write_class_folders(tmp_path / "data")
    env = dict(os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    full = str(tmp_path / "full")
    run = subprocess.run(cli(full, data, base_model), env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "'global_step': 12" in run.stdout  # 24 images, batches of 4, 2 epochs
    assert json.load(open(os.path.join(full, "class_names.json"))) == list(CLASSES)
    card = open(os.path.join(full, "README.md")).read()
    assert "class-conditional" in card and "num_class_embeds=4" in card and 'class_names.index("blue_morpho")' in card
    grid = Image.open(os.path.join(full, "samples", "0001.png"))
    assert grid.size == (2 * 32, 3 * 32)  # a row per class, eval_batch_size // classes columns

    resumed = str(tmp_path / "resumed")  # a run killed after checkpoint-4, resumed
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-4"), os.path.join(resumed, "checkpoint-4"))
    config = helpers.parse_config(cli(resumed, data, base_model, "--resume_from_checkpoint", "latest")[2:])
    images, labels, class_names = helpers.labelled_images(data, 32)
    config = dataclasses.replace(config, class_names=class_names)
    assert helpers.train_loop(*helpers.build_training(config, images, labels))["global_step"] == 12
    a = UNet2DModel.from_pretrained(full, subfolder="unet").state_dict()
    b = UNet2DModel.from_pretrained(resumed, subfolder="unet").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"the resumed conditional run differs from the uninterrupted one by {worst}"
    assert a["class_embedding.weight"].abs().max() > 0  # the embedding trained away from zero


def test_labels_without_class_names_or_the_reverse_are_refused_before_training(tmp_path):
    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="class_names"):
        helpers.build_training(tiny_config(tmp_path / "a"), images, labels)
    with pytest.raises(ValueError, match="class_names"):
        helpers.build_training(tiny_config(tmp_path / "b", class_names=CLASSES), images)


def notebook_cell(name, marker):
    """The source of the code cell of a committed notebook that contains marker."""
    cells = json.load(open(os.path.join(ROOT, "notebooks", name)))["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"]))


def test_the_saved_folder_samples_a_class_with_guidance_in_plain_diffusers_as_08_shows(tmp_path, base_model):
    """08's plain-diffusers cell, run on a saved conditional folder, draws what the course's guided sample draws."""
    import types

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDPMScheduler, UNet2DModel

    config = tiny_config(tmp_path / "run", class_names=CLASSES, pretrained_model=base_model, num_epochs=1,
                         save_image_epochs=10, use_ema=False)
    data = write_class_folders(tmp_path / "data")
    images, labels, _ = helpers.labelled_images(data, 32)
    helpers.train_loop(*helpers.build_training(config, images, labels))
    unet = UNet2DModel.from_pretrained(config.output_dir, subfolder="unet")
    torch.nn.init.normal_(unet.class_embedding.weight)  # a few steps leave it small: make the classes matter here
    unet.save_pretrained(os.path.join(config.output_dir, "unet"))

    source = notebook_cell("08_conditioning.ipynb", "class_names.json")
    namespace = {"config": types.SimpleNamespace(output_dir=config.output_dir), "os": os, "torch": torch, "plt": plt,
                 "UNet2DModel": UNet2DModel, "make_grid": helpers.make_grid, "sampler_steps": 5, "guidance_scale": 4.0}
    exec(compile(source, "08 plain diffusers", "exec"), namespace)
    plt.close("all")
    drawn, w = namespace["x"], namespace["w"]
    assert drawn.shape == (8, 3, 32, 32) and torch.isfinite(drawn).all()

    scheduler = helpers.make_scheduler("ddim", DDPMScheduler.from_pretrained(config.output_dir, subfolder="scheduler"))
    noise = torch.randn((8, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    asked = torch.full((8,), len(CLASSES) - 1)
    course = helpers.sample(unet.eval(), scheduler, noise, 5, class_labels=asked, guidance_scale=w)
    torch.testing.assert_close(drawn, course, rtol=1e-4, atol=1e-4)
    unguided = helpers.sample(unet, scheduler, noise, 5, class_labels=asked, guidance_scale=0.0)
    assert (drawn - unguided).abs().max() > 1e-2  # guidance changed the images


def test_the_held_out_split_takes_as_many_of_each_class_and_leaves_some_to_train():
    labels = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    train, held_out = helpers.split_per_class(labels, 3, seed=0)
    assert not set(train.tolist()) & set(held_out.tolist()) and len(train) + len(held_out) == len(labels)
    assert torch.bincount(labels[held_out]).tolist() == [3, 3, 1]  # a class of 2 keeps one to train on
    assert torch.bincount(labels[train]).tolist() == [7, 1, 1]


def test_08_starts_from_05s_settings_but_not_its_hub_repo_and_says_what_to_do_without_a_run(tmp_path):
    run = tiny_config(tmp_path / "run", learning_rate=3e-4, push_to_hub=True, hub_model_id="someone/butterflies")
    os.makedirs(run.output_dir)
    helpers.save_run_settings(run)
    config = helpers.config_of_run(run.output_dir, output_dir=str(tmp_path / "classes"), learning_rate=None, seed=7)
    assert (config.image_size, tuple(config.block_out_channels), config.learning_rate) == (32, (32, 64), 3e-4)  # 05's
    assert (config.output_dir, config.seed) == (str(tmp_path / "classes"), 7)  # the values given; None keeps 05's
    assert not config.push_to_hub and config.hub_model_id is None  # 08 never uploads over 05's model
    with pytest.raises(FileNotFoundError, match="05_training.ipynb"):
        helpers.config_of_run(str(tmp_path / "nothing here"))
