"""train_loop end to end on a CPU: saving, resuming after SIGKILL, two processes, NaN, Hub without login."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys
import time
import types
import warnings

import pytest
import torch
from conftest import ROOT, tiny_config, write_images

import helpers


def train(config, image_folder):
    """Load the folder and run the tutorial's train_loop in this process."""
    images = helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)
    return helpers.train_loop(*helpers.build_training(config, images))


def unet_weights(output_dir):
    """The saved UNet's state dict."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(os.path.join(output_dir, "unet")).state_dict()


def logged_steps(output_dir):
    """Every step at which the loss was written to TensorBoard."""
    return helpers.read_logged_scalars(output_dir, "loss")[0]


def test_train_loop_saves_a_loadable_pipeline_grids_and_logs(tmp_path, image_folder):
    from diffusers import DDPMPipeline

    config = tiny_config(tmp_path / "run")
    result = train(config, image_folder)
    assert result["global_step"] == 2 * (24 // 4)  # two epochs of six batches
    out = config.output_dir
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["0000.png", "0001.png"]
    assert [os.path.basename(p) for p in helpers.checkpoints_in(out)] == ["checkpoint-8", "checkpoint-12"]
    assert not glob.glob(os.path.join(out, "*.tmp")) and not os.path.exists(os.path.join(out, ".tmp-pipeline"))
    assert logged_steps(out) == [2, 4, 6, 8, 10, 12]
    card = open(os.path.join(out, "README.md")).read()  # the model card, saved with the pipeline
    assert "unconditional-image-generation" in card and "2 epochs of 2" in card and "(32, 64)" in card
    assert 'DDPMPipeline.from_pretrained("run")' in card and "![The last sample grid](samples/0001.png)" in card
    pipeline = DDPMPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_gradient_accumulation_counts_optimizer_steps_and_ends_the_cosine(tmp_path, image_folder):
    config = tiny_config(tmp_path / "run", gradient_accumulation_steps=2, save_image_epochs=10)
    images = helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)
    args = helpers.build_training(config, images)
    lr_scheduler = args[-1]
    result = helpers.train_loop(*args)
    assert result["global_step"] == 2 * (6 // 2)
    assert lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # not stretched (diffusers script's defect)


def test_max_train_steps_ends_mid_epoch_with_that_epochs_grid_and_pipeline(tmp_path, image_folder):
    config = tiny_config(tmp_path / "run", num_epochs=3, max_train_steps=9, checkpointing_steps=4, save_image_epochs=10)
    result = train(config, image_folder)
    assert result["global_step"] == 9 and result["epochs"] == 2  # six steps an epoch: stops 3 steps into the second
    assert logged_steps(config.output_dir)[-1] == 9
    assert sorted(os.listdir(os.path.join(config.output_dir, "samples"))) == ["0001.png"]  # the last epoch's grid
    assert os.path.isfile(os.path.join(config.output_dir, "unet", "config.json"))
    resumed = helpers.train_loop(*helpers.build_training(  # from checkpoint-8, mid-epoch, to the same cap
        dataclasses.replace(config, resume_from_checkpoint="latest"),
        helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)))
    assert resumed["global_step"] == 9


def test_resuming_a_finished_run_trains_samples_and_saves_nothing_again(tmp_path, image_folder):
    config = tiny_config(tmp_path / "run", num_epochs=3, max_train_steps=8, checkpointing_steps=4)
    train(config, image_folder)  # ends mid-epoch at step 8, with checkpoint-8
    grid = os.path.join(config.output_dir, "samples", "0001.png")
    before = os.stat(grid).st_mtime_ns
    resumed = train(dataclasses.replace(config, resume_from_checkpoint="latest"), image_folder)
    assert resumed["global_step"] == 8
    assert os.stat(grid).st_mtime_ns == before  # no grid sampled again


def cli(output_dir, image_folder, *extra):
    """The command line that `accelerate launch helpers.py` runs, as a subprocess."""
    flags = dict(
        dataset_name=image_folder, output_dir=output_dir, image_size=32, block_out_channels="32,64",
        layers_per_block=1, train_batch_size=4, eval_batch_size=4, num_epochs=4, lr_warmup_steps=2,
        save_image_epochs=100, save_model_epochs=100, mixed_precision="no", eval_inference_steps=2,
        checkpointing_steps=4, checkpoints_total_limit=3, logging_steps=1,
    )
    command = [sys.executable, os.path.join(ROOT, "helpers.py")]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    return command + list(extra)


def test_sigkill_after_a_checkpoint_then_resume_latest_matches_an_uninterrupted_run(tmp_path, image_folder):
    env = dict(os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    full, interrupted = str(tmp_path / "full"), str(tmp_path / "interrupted")
    subprocess.run(cli(full, image_folder), env=env, check=True, capture_output=True, timeout=300)

    process = subprocess.Popen(cli(interrupted, image_folder), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(interrupted, "checkpoint-8")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert not os.path.exists(os.path.join(interrupted, "model_index.json"))  # killed mid-run

    resumed = subprocess.run(cli(interrupted, image_folder, "--resume_from_checkpoint", "latest"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout
    assert "'global_step': 24" in resumed.stdout  # 4 epochs x 6 batches, as the uninterrupted run
    assert logged_steps(interrupted)[-1] == 24 and 1 in logged_steps(interrupted)  # one continued curve
    a, b = unet_weights(full), unet_weights(interrupted)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"resumed weights differ from the uninterrupted run by {worst}"


def test_two_processes_shard_the_data_agree_on_weights_and_write_once(tmp_path):
    folder = write_images(str(tmp_path / "solid"), 16, solid=True)
    config = tiny_config(tmp_path / "run", num_epochs=2, checkpointing_steps=2, use_ema=True, dataset_name=folder)
    fields = {k: v for k, v in vars(config).items()}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "two_process_run.py"), json.dumps(fields)],
                         env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    runs = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for epoch in range(2):  # 16 images, batch 4 per process: 2 batches per process per epoch
        shards = [sorted(v for batch in run["seen"][2 * epoch:2 * epoch + 2] for v in batch) for run in runs]
        assert not set(shards[0]) & set(shards[1]), "the two processes saw the same images"
        assert sorted(shards[0] + shards[1]) == [8 * i + 4 for i in range(16)]
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert len(runs[0]["saves"]) == 2 and runs[1]["saves"] == []  # pipeline saved by the main process only
    assert sorted(os.listdir(os.path.join(config.output_dir, "samples"))) == ["0000.png", "0001.png"]
    assert len(glob.glob(os.path.join(config.output_dir, "logs", "**", "events.*"), recursive=True)) == 1
    assert [os.path.basename(p) for p in helpers.checkpoints_in(config.output_dir)] == ["checkpoint-2", "checkpoint-4"]


def test_a_nan_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, image_folder, monkeypatch):
    config = tiny_config(tmp_path / "run", num_epochs=3, checkpointing_steps=4, logging_steps=2)
    mse, calls = torch.nn.functional.mse_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = mse(*args, **kwargs)
        return loss * float("nan") if len(calls) > 5 else loss  # the 6th step (step 5) goes bad

    monkeypatch.setattr(helpers.F, "mse_loss", poisoned)
    with pytest.raises(FloatingPointError) as error:
        train(config, image_folder)
    message = str(error.value)
    assert "at step 5" in message and "checkpoint-4" in message and "resume_from_checkpoint" in message
    assert [os.path.basename(p) for p in helpers.checkpoints_in(config.output_dir)] == ["checkpoint-4"]
    assert not os.path.exists(os.path.join(config.output_dir, "model_index.json"))  # NaN weights never saved
    from safetensors.torch import load_file

    weights = load_file(os.path.join(config.output_dir, "checkpoint-4", "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_push_to_hub_without_a_login_still_saves_locally_and_says_to_log_in(tmp_path, image_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tiny_config(tmp_path / "run", num_epochs=1, push_to_hub=True, hub_model_id="someone/butterflies")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, image_folder)
    messages = " ".join(str(w.message) for w in caught)
    assert "log in" in messages.lower() and "saved locally" in messages
    assert os.path.exists(os.path.join(config.output_dir, "model_index.json"))


def test_a_second_run_refuses_to_overwrite_before_any_training(tmp_path, image_folder):
    config = tiny_config(tmp_path / "run", num_epochs=1)
    train(config, image_folder)
    saved = os.path.getmtime(os.path.join(config.output_dir, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileExistsError, match="resume_from_checkpoint='latest'.*overwrite_output_dir=True"):
        helpers.check_output_dir(config)
    with pytest.raises(FileExistsError):
        train(config, image_folder)
    assert os.path.getmtime(os.path.join(config.output_dir, "unet", "diffusion_pytorch_model.safetensors")) == saved


def test_push_to_hub_creates_the_repo_as_asked_and_uploads_after_saving(tmp_path, image_folder, monkeypatch):
    import huggingface_hub
    from concurrent.futures import Future

    calls = []

    def fake_create_repo(repo_id, private, exist_ok):
        calls.append(("create", repo_id, private))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def fake_upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns, run_as_future):
        saved = os.path.exists(os.path.join(folder_path, "unet", "diffusion_pytorch_model.safetensors"))
        calls.append(("upload", repo_id, saved, tuple(ignore_patterns), run_as_future))
        future = Future()
        future.set_exception(ConnectionError("no network in the test")) if len(calls) > 2 else future.set_result(None)
        return future

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fake_upload_folder)
    config = tiny_config(tmp_path / "run", num_epochs=2, push_to_hub=True, hub_private_repo=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config, image_folder)
    assert calls[0] == ("create", "run", True)  # hub_model_id=None: the name of output_dir, private as asked
    assert [c[0] for c in calls[1:]] == ["upload", "upload"]  # after each save (every epoch here)
    assert all(c[2] and "checkpoint-*" in c[3] and c[4] for c in calls[1:])  # saved first, no checkpoints, background
    assert any("Upload to 'run' failed" in str(w.message) and "saved locally" in str(w.message) for w in caught)


def test_presets_give_the_tutorial_run_or_a_small_one_and_explicit_values_win():
    tutorial, quick = helpers.preset_config("tutorial"), helpers.preset_config("quick", num_epochs=None)
    assert tutorial == helpers.TrainingConfig()
    assert quick.image_size == 32 and quick.block_out_channels == (32, 64, 128)
    assert quick.up_block_types == ("UpBlock2D",) * 3  # mirrored from the preset's down blocks
    fewer_levels = helpers.preset_config("quick", image_size=64, block_out_channels=[32, 64])
    assert fewer_levels.block_out_channels == (32, 64)
    assert len(fewer_levels.down_block_types) == len(fewer_levels.up_block_types) == 2  # derived for the new levels
    helpers.check_config(fewer_levels)  # the preset's three block types are not kept for two levels
    assert helpers.preset_config("quick", image_size=64).image_size == 64
    with pytest.raises(ValueError, match="preset='fast': use one of 'tutorial', 'quick'"):
        helpers.preset_config("fast")


def test_sampling_without_a_trained_model_says_what_to_do_and_offline_names_the_hub_fallback(tmp_path, image_folder):
    empty = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="Train a model in 05_training.ipynb"):
        helpers.load_trained_pipeline(empty)
    with pytest.raises(RuntimeError, match=r"(?s)could not be loaded.*connect to the internet") as error:
        helpers.load_trained_pipeline(empty, fallback_id="anton-l/ddpm-butterflies-128")  # HF_HUB_OFFLINE=1 here
    assert "train a model in 05_training.ipynb first" in str(error.value)
    config = tiny_config(tmp_path / "run", num_epochs=1)
    train(config, image_folder)
    pipeline = helpers.load_trained_pipeline(config.output_dir, fallback_id="anton-l/ddpm-butterflies-128")
    assert pipeline.unet.config.sample_size == 32  # the local model wins over the Hub's


def test_resume_puts_the_ema_weights_back_on_the_training_device(tmp_path, image_folder):
    # accelerator.load_state reads the EMA weights onto the CPU; on a GPU the next ema_model.step then
    # mixed cuda and cpu tensors and stopped the resumed run (seen on an H100). A "meta" device stands in
    # for the GPU: resume_run must move the EMA to whatever device the accelerator trains on.
    import dataclasses
    import types

    config = tiny_config(tmp_path / "run", num_epochs=1, checkpointing_steps=2, save_image_epochs=10)
    images = helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)
    helpers.train_loop(*helpers.build_training(config, images))
    resumed = dataclasses.replace(config, resume_from_checkpoint="latest")
    accelerator = helpers.make_accelerator(resumed)
    _, model, _, optimizer, train_dataloader, lr_scheduler = helpers.build_training(resumed, images)
    ema_model = helpers.make_ema_model(resumed, model, accelerator)
    accelerator.prepare(model, optimizer, train_dataloader, lr_scheduler)
    on_meta = types.SimpleNamespace(print=accelerator.print, load_state=accelerator.load_state,
                                    device=torch.device("meta"))
    assert helpers.resume_run(resumed, on_meta, ema_model) == 6
    assert ema_model.optimization_step == 6  # the checkpoint's EMA was loaded, not a fresh one
    assert {p.device.type for p in ema_model.shadow_params} == {"meta"}


def test_each_sample_grid_is_logged_to_tensorboard_beside_the_loss(tmp_path, image_folder):
    import glob

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path / "run")
    train(config, image_folder)
    (events,) = glob.glob(os.path.join(config.output_dir, "logs", "**", "events.*"), recursive=True)
    accumulator = EventAccumulator(events, size_guidance={"images": 0})
    accumulator.Reload()
    logged = accumulator.Images("samples")
    assert [event.step for event in logged] == [6, 12]  # the step each epoch's grid was sampled at
    saved = np.asarray(Image.open(os.path.join(config.output_dir, "samples", "0001.png")).convert("RGB"))
    from io import BytesIO

    shown = np.asarray(Image.open(BytesIO(logged[-1].encoded_image_string)).convert("RGB"))
    assert np.array_equal(shown, saved)  # the same pixels as samples/0001.png


def test_the_run_reports_its_expected_and_its_measured_time(tmp_path, image_folder, capsys):
    config = tiny_config(tmp_path / "run", save_image_epochs=1)
    result = train(config, image_folder)
    out = capsys.readouterr().out
    assert "Expected time:" in out and "12 steps of" in out and "2 sample grids of" in out  # before the first step
    assert "Trained to step 12 in" in out and "expected before the first step:" in out
    assert 0 < result["expected_seconds"] and 0 < result["seconds"]
    assert helpers.run_settings(config.output_dir)["dataset_name"] == config.dataset_name  # for 06 and 07


def test_time_training_leaves_the_runs_random_numbers_and_weights_alone(tmp_path, image_folder):
    """Timing trains a throwaway copy: the run's weights and seeded random streams are as without it."""
    config = tiny_config(tmp_path / "run")
    images = helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)
    _, model, noise_scheduler, _, train_dataloader, _ = helpers.build_training(config, images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator = helpers.make_accelerator(config)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    step_seconds, grid_seconds = helpers.time_training(config, accelerator, model, noise_scheduler, train_dataloader)
    assert torch.equal(torch.rand(3), expected_draw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0 < step_seconds and 0 < grid_seconds


def test_train_minutes_fits_the_steps_and_the_lr_schedule_to_the_budget_and_a_resume_keeps_them(tmp_path, image_folder,
                                                                                                 monkeypatch):
    # A fake clock: each step takes 2 s and each sample grid 3 s, so 0.51 minutes (30.6 s) hold 12 steps and
    # their 2 grids (12 * 2 + 2 * 3 = 30 s), not 13 (a third epoch, a third grid: 13 * 2 + 3 * 3 = 35 s).
    monkeypatch.setattr(helpers, "time_training", lambda *args, **kwargs: (2.0, 3.0))
    config = tiny_config(tmp_path / "run", train_minutes=0.51, num_epochs=100, save_image_epochs=1, checkpointing_steps=4)
    images = helpers.images_to_tensor(helpers.load_image_dataset(image_folder), config.image_size)
    args = helpers.build_training(config, images)
    result = helpers.train_loop(*args)
    assert result["global_step"] == 12 and result["epochs"] == 2
    assert result["expected_seconds"] == pytest.approx(12 * 2.0 + 2 * 3.0)
    out = config.output_dir
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["0000.png", "0001.png"]  # the last grid at the end
    assert os.path.isfile(os.path.join(out, "model_index.json"))  # and the saved model
    assert logged_steps(out)[-1] == 12
    lrs = helpers.read_logged_scalars(out, "lr")[1]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)  # the cosine reaches zero at the fitted last step
    # Resuming the run keeps its 12 steps, however fast this machine now seems.
    monkeypatch.setattr(helpers, "time_training", lambda *args, **kwargs: (0.1, 0.1))
    resumed = train(dataclasses.replace(config, resume_from_checkpoint="checkpoint-8"), image_folder)
    assert resumed["global_step"] == 12


def test_time_unet_pass_waits_for_an_mps_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("sync"))

    class MpsUNet:
        config = type("Config", (), {"sample_size": 8, "in_channels": 3, "num_class_embeds": None})()
        device, dtype = torch.device("mps"), torch.float32

        def __call__(self, x, t):
            calls.append("pass")
            return types.SimpleNamespace(sample=x)  # what a UNet2DModel returns

    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: None)  # no MPS tensor on this machine
    helpers.time_unet_pass(MpsUNet(), 2, repeats=1)
    assert calls == ["sync", "pass", "sync"] * 2  # the clock stops after the GPU has finished each pass
