"""benchmarks/train_speed.py runs end to end on a CPU at tiny size (that it runs, not how fast)."""

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, write_images


def test_speed_benchmark_runs_on_cpu_and_writes_json(tmp_path):
    images = write_images(str(tmp_path / "images"), 20)
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    command = [
        sys.executable, os.path.join(ROOT, "benchmarks", "train_speed.py"),
        "--device", "cpu", "--tiny", "--image-size", "32", "--steps", "3", "--warmup-steps", "1",
        "--data", images, "--tutorial-batch-size", "2", "--batch-sizes", "2",
        "--eval-batch-size", "2", "--tutorial-eval-steps", "2", "--course-eval-steps", "2",
        "--json", str(out),
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    lines = run.stdout.strip().splitlines()
    assert any(re.match(r"tutorial\s+as written\s+2\s+no\s+[\d.]+\s+[\d.]+\s+n/a\s+n/a", l) for l in lines), run.stdout
    import helpers

    auto = helpers.resolve_mixed_precision("auto")  # bf16 on a CPU that computes it natively, else no
    assert any(re.match(rf"course\s+default\s+2\s+{auto}\s+[\d.]+\s+[\d.]+\s+n/a\s+n/a", l) for l in lines), run.stdout
    assert any(re.match(r"tutorial\s+ddpm\s+2 steps", l) for l in lines), run.stdout
    assert any(re.match(r"course\s+dpm\+\+\s+2 steps", l) for l in lines), run.stdout
    assert re.fullmatch(r"speedup: \d+\.\d\dx \(course \d+\.\d img/s, tutorial \d+\.\d img/s\)", lines[-1]), lines[-1]

    report = json.loads(out.read_text())
    assert report["smoke_run"] is True and report["device"]["type"] == "cpu"
    assert report["model"]["block_out_channels"] == [32, 64] and report["model"]["train_gflops_per_image"] > 0
    assert report["data"]["num_images"] == 20
    assert report["steps"] == {"warmup": 1, "timed": 3}
    rows = {(r["loop"], r["variant"]): r for r in report["train"]}
    assert set(rows) == {("tutorial", "as written"), ("course", "default")}
    for row in rows.values():
        assert row["error"] is None and row["steps_run"] == 4 and row["batch_size"] == 2
        assert row["images_per_second"] > 0 and row["ms_per_step"] > 0
        assert row["peak_memory_gib"] is None and row["mfu"] is None  # n/a on a CPU
    assert [e["loop"] for e in report["evaluation"]] == ["tutorial", "course"]
    assert all(e["seconds"] > 0 for e in report["evaluation"])
    speedup = report["speedup"]
    assert speedup["train"] > 0
    assert abs(speedup["train"] - speedup["course_images_per_second"] / speedup["tutorial_images_per_second"]) < 1e-9


def test_profile_of_the_training_step_runs_on_cpu_and_names_the_operators(tmp_path):
    out = tmp_path / "profile.txt"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "profile_step.py"), "--tiny", "--image-size", "32",
               "--batch-sizes", "4", "--rows", "8", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = out.read_text()
    assert report.startswith("CPU, ") and "profiled steps 11-20" in report
    wall = re.search(r"^batch 4: wall ([\d.]+) ms/step, GPU kernels 0\.0 ms/step", report, re.M)
    assert wall and float(wall.group(1)) > 0, report  # a CPU has no kernels to count
    assert "ProfilerStep*" in report and "aten::" in report  # torch.profiler's table of train_loop's operators


def test_sampler_fid_scores_saved_pipelines_with_each_sampler(tmp_path):
    """benchmarks/sampler_fid.py on a tiny saved pipeline and a few images: one FID line per model and sampler."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(str(tmp_path / "model"))
    images = write_images(str(tmp_path / "images"), 6)
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "sampler_fid.py"), "--data", images,
               "--models", str(tmp_path / "model"), "--samplers", "ddim:2", "sde-dpm++:2", "--samples", "4"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert [(r[1], r[2]) for r in rows] == [("ddim", "2"), ("sde-dpm++", "2")], run.stdout
    assert all(float(r[3]) > 0 and float(r[4]) > 0 for r in rows), run.stdout


def test_preset_time_fits_a_train_minutes_budget_and_reports_how_far_it_ended_from_it(tmp_path):
    """The benchmark behind the train_minutes figure: it runs, saves a model and a last grid, and reports."""
    images = write_images(str(tmp_path / "images"), 20)
    out = tmp_path / "budget.json"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "preset_time.py"), "--preset", "quick",
               "--data", images, "--train-minutes", "0.2", "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["train_minutes"] == 0.2 and report["saved_model"] and report["last_grid"]
    assert report["off_budget"] == pytest.approx(report["train_seconds"] / 12 - 1)
    assert 0 < report["global_step"] and 0 < report["expected_seconds"]
    assert "off the 0.2-minute budget" in run.stdout
