"""Speed benchmark: the tutorial's training loop as written against the course's helpers.train_loop.

One process, one device, the same model, the same images and the same number of steps, two ways:
  tutorial  the loop of the diffusers tutorial "Train a diffusion model", copied below as written:
            datasets set_transform (Resize((s, s)), RandomHorizontalFlip, ToTensor, Normalize) per item
            in the main process, DataLoader(num_workers=0, shuffle=True), fp16 mixed precision with
            Accelerate's GradScaler, .item() and gradient clipping every step, evaluation with a
            1000-step DDPMPipeline. Departures: a step cap, and evaluation timed separately.
  course    helpers.train_loop, the course's default path: images decoded once into a uint8 tensor,
            flip and scaling on the device, bf16 "auto" mixed precision, fused AdamW, EMA, the loss read
            back every logging_steps, evaluation with helpers.evaluate (20-step DPM-Solver++).

Each loop runs --warmup-steps + --steps optimizer steps; only the last --steps are timed. The course's
images/s is what train_loop returns (its logging windows after the first; logging_steps is set to
--warmup-steps, 10 by default as in TrainingConfig). It prints images/s, ms/step, peak device memory
and MFU for each, times one evaluation grid each way, and ends with the line
    speedup: X.XXx (course N img/s, tutorial M img/s)

GPU (the figures for the README):
    python benchmarks/train_speed.py --data DIR --batch-sizes 16,64,128 --compile --json results.json
    (--data defaults to the Hub id huggan/smithsonian_butterflies_subset, as the course; give a local
    image folder on machines with no network: nothing then touches the network.)
CPU smoke run (proves that it runs; its timings are not results):
    python benchmarks/train_speed.py --device cpu --tiny --image-size 32 --steps 3 --data DIR
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers.py lives one folder up

import torch  # noqa: E402  (importing torch does not initialise CUDA: --device cpu can still hide GPUs)
import torch.nn.functional as F  # noqa: E402

import helpers  # noqa: E402

TUTORIAL_BATCH_SIZE = 16  # the tutorial's train_batch_size
TUTORIAL_EVAL_STEPS = 1000  # DDPMPipeline's default number of inference steps

# Dense bf16 tensor-core peak (fp16 where the GPU has no bf16), per GPU, from NVIDIA's datasheets.
# First match wins, so the more specific names come first.
PEAK_FLOPS = [
    (r"GH200|H200", 989e12),
    (r"H100.*PCIe", 756e12),
    (r"H100.*NVL", 835e12),
    (r"H100", 989e12),  # SXM
    (r"A100", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"L4\b", 121e12),
    (r"A10G?\b", 125e12),  # the A10 datasheet figure, used for AWS's A10G too
    (r"V100", 125e12),  # fp16
    (r"T4\b", 65e12),  # fp16 (no bf16)
]


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    """The command line; see the module docstring for examples."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="huggan/smithsonian_butterflies_subset",
                   help="a local image folder (no network needed) or a Hub dataset id")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu hides the GPUs from this process")
    p.add_argument("--image-size", type=int, default=128, help="training resolution (the tutorial: 128)")
    p.add_argument("--tiny", action="store_true", help="a tiny U-Net: block_out_channels (32, 64), 1 layer per block")
    p.add_argument("--steps", type=int, default=50, help="timed optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="untimed steps before them; also the course's logging_steps (TrainingConfig: 10)")
    p.add_argument("--tutorial-batch-size", type=int, default=TUTORIAL_BATCH_SIZE,
                   help="the tutorial loop's batch (16); the speedup compares the course at this batch")
    p.add_argument("--batch-sizes", default="16", help="course batch sizes, comma-separated, e.g. 16,64,128")
    p.add_argument("--eval-batch-size", type=int, default=16, help="images in each evaluation grid (16)")
    p.add_argument("--tutorial-eval-steps", type=int, default=TUTORIAL_EVAL_STEPS,
                   help="DDPM steps of the tutorial's evaluation (1000; fewer only for smoke runs)")
    p.add_argument("--course-eval-steps", type=int, default=None,
                   help="DPM-Solver++ steps of the course's evaluation (default: TrainingConfig's, 20)")
    p.add_argument("--compile", action="store_true",
                   help="also time the course path with torch.compile and channels_last")
    p.add_argument("--compile-batch-sizes", default=None,
                   help="batch sizes of the --compile runs (default: --batch-sizes); each compiles afresh, about a minute")
    p.add_argument("--channels-last", action="store_true", help="also time the course path with channels_last, no compile")
    p.add_argument("--foreach-adamw", action="store_true",
                   help="also time the course path with the default (foreach) AdamW instead of fused")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for GPUs not in the table")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.batch_sizes = parse_batch_sizes(args.batch_sizes, args.tutorial_batch_size)
    args.compile_batch_sizes = (parse_batch_sizes(args.compile_batch_sizes, args.tutorial_batch_size)
                                if args.compile_batch_sizes else args.batch_sizes)
    for name in ("steps", "warmup_steps", "tutorial_batch_size", "eval_batch_size", "tutorial_eval_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1.")
    return args


def parse_batch_sizes(text, tutorial_batch_size):
    """'16,64,128' -> [16, 64, 128], always including the tutorial's batch size (the comparison)."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes={text!r}: give whole numbers separated by commas, e.g. 16,64,128.")
    if any(s < 1 for s in sizes):
        raise SystemExit(f"--batch-sizes={text!r}: every batch size must be at least 1.")
    return sorted(set(sizes) | {tutorial_batch_size})


# --------------------------------------------------------------------------- device, FLOPs, memory


def device_name():
    """The GPU's name, or the CPU's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_flops(name, override_tflops=None):
    """The GPU's dense bf16 peak FLOP/s from the table (or --peak-tflops); None on a CPU or an unknown GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    for pattern, flops in PEAK_FLOPS:
        if re.search(pattern, name):
            return flops
    return None


def train_flops_per_image(model, image_size):
    """FLOPs of one forward+backward per image, counted with FlopCounterMode on a meta-device copy."""
    from torch.utils.flop_counter import FlopCounterMode

    meta_model = copy.deepcopy(model).to("meta")  # no memory, no time: shapes only
    images = torch.randn(2, 3, image_size, image_size, device="meta")
    timesteps = torch.randint(0, 1000, (2,), device="meta")
    # torch 2.4's module tracker prints a spurious "hierarchy tracking seems to be messed up" per
    # backward hook (the count is unaffected): keep it out of the report.
    with FlopCounterMode(display=False) as counter, contextlib.redirect_stdout(io.StringIO()):
        noise_pred = meta_model(images, timesteps, return_dict=False)[0]
        F.mse_loss(noise_pred.float(), images).backward()
    return counter.get_total_flops() / 2


def sync():
    """Wait for the GPU, so a clock read after it includes all queued work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory():
    """Free what earlier runs left and restart the peak-memory counter."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib():
    """Peak device memory allocated since reset_memory(), in GiB; None on a CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_accelerate():
    """Forget the previous Accelerator, so the next one may use another mixed precision."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --------------------------------------------------------------------------- the tutorial, as written


def make_tutorial_preprocess(config):
    """The tutorial's per-item preprocessing."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize((config.image_size, config.image_size)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )


def tutorial_evaluate(config, epoch, pipeline, num_inference_steps=TUTORIAL_EVAL_STEPS):
    """The tutorial's evaluate(); num_inference_steps is 1000 (the pipeline's default) unless capped."""
    from diffusers.utils import make_image_grid

    # Sample some images from random noise (this is the backward diffusion process).
    # The default pipeline output type is `List[PIL.Image]`
    images = pipeline(
        batch_size=config.eval_batch_size,
        generator=torch.manual_seed(config.seed),
        num_inference_steps=num_inference_steps,
    ).images

    # Make a grid out of the images (the tutorial: rows=4, cols=4 for its 16 images)
    image_grid = make_image_grid(images, *helpers.grid_shape(len(images)))

    # Save the images
    test_dir = os.path.join(config.output_dir, "samples")
    os.makedirs(test_dir, exist_ok=True)
    image_grid.save(f"{test_dir}/{epoch:04d}.png")


def tutorial_train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler,
                        max_steps, warmup_steps):
    """The tutorial's train_loop, with a step cap and a clock; evaluation and saving are left out (timed apart)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    # Initialize accelerator and tensorboard logging
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=os.path.join(config.output_dir, "logs"),
    )
    if accelerator.is_main_process:
        if config.output_dir is not None:
            os.makedirs(config.output_dir, exist_ok=True)
        accelerator.init_trackers("train_example")

    # Prepare everything
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )

    global_step = 0
    start = time.perf_counter()  # BENCHMARK: restarted after the warm-up steps

    # Now you train the model
    for epoch in range(config.num_epochs):
        progress_bar = tqdm(total=len(train_dataloader), disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")

        for step, batch in enumerate(train_dataloader):
            clean_images = batch["images"]
            # Sample noise to add to the images
            noise = torch.randn(clean_images.shape, device=clean_images.device)
            bs = clean_images.shape[0]

            # Sample a random timestep for each image
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bs,), device=clean_images.device,
                dtype=torch.int64
            )

            # Add noise to the clean images according to the noise magnitude at each timestep
            # (this is the forward diffusion process)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                # Predict the noise residual
                noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
                loss = F.mse_loss(noise_pred, noise)
                accelerator.backward(loss)

                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            progress_bar.update(1)
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
            global_step += 1

            if global_step == warmup_steps:  # BENCHMARK: start the clock after the warm-up
                sync()
                start = time.perf_counter()
            if global_step >= max_steps:  # BENCHMARK: the step cap
                break
        progress_bar.close()
        if global_step >= max_steps:
            break

    sync()
    seconds = time.perf_counter() - start
    accelerator.end_training()
    return accelerator.unwrap_model(model), global_step, seconds


def run_tutorial(args, dataset, noise_scheduler, workdir):
    """Train with the tutorial's loop and data path; return its row and the trained model."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_cosine_schedule_with_warmup

    mixed_precision = "fp16" if torch.cuda.is_available() else "no"  # fp16 AMP needs a GPU
    batch_size = args.tutorial_batch_size
    max_steps = args.warmup_steps + args.steps
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    config = make_config(args, batch_size, os.path.join(workdir, "tutorial"),
                         mixed_precision=mixed_precision, num_epochs=max(50, math.ceil(max_steps / steps_per_epoch)))

    preprocess = make_tutorial_preprocess(config)

    def transform(examples):
        images = [preprocess(image.convert("RGB")) for image in examples["image"]]
        return {"images": images}

    dataset.set_transform(transform)
    set_seed(config.seed)  # the same initial weights as helpers.build_training gives the course
    model = helpers.make_model(config)  # the same constructor call as the tutorial's UNet2DModel(...)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    lr_scheduler = get_cosine_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=(len(train_dataloader) * config.num_epochs),
    )
    reset_accelerate()
    reset_memory()
    model, global_step, seconds = tutorial_train_loop(
        config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler, max_steps, args.warmup_steps
    )
    row = make_row("tutorial", "as written", batch_size, mixed_precision, global_step,
                   args.steps * batch_size / seconds, peak_memory_gib())
    return row, config, model


def time_tutorial_evaluation(args, config, model, noise_scheduler):
    """Time one tutorial evaluation grid: DDPMPipeline with the training scheduler (1000 steps)."""
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline(unet=model, scheduler=noise_scheduler)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(batch_size=config.eval_batch_size, num_inference_steps=2)  # warm-up, as the course's is warm
    sync()
    start = time.perf_counter()
    tutorial_evaluate(config, 0, pipeline, num_inference_steps=args.tutorial_eval_steps)
    sync()
    seconds = time.perf_counter() - start
    return {"loop": "tutorial", "sampler": "ddpm", "inference_steps": args.tutorial_eval_steps,
            "images": config.eval_batch_size, "seconds": seconds,
            "seconds_for_1000_steps": seconds * TUTORIAL_EVAL_STEPS / args.tutorial_eval_steps}


# --------------------------------------------------------------------------- the course


def make_config(args, batch_size, output_dir, **overrides):
    """A TrainingConfig for one run: the course defaults, sized by the command line."""
    fields = dict(
        image_size=args.image_size,
        train_batch_size=batch_size,
        eval_batch_size=args.eval_batch_size,
        output_dir=output_dir,
        overwrite_output_dir=True,
        dataset_name=args.data,
        seed=args.seed,
    )
    if args.tiny:
        fields.update(block_out_channels=(32, 64), layers_per_block=1)
    if args.course_eval_steps:
        fields["eval_inference_steps"] = args.course_eval_steps
    fields.update(overrides)
    return helpers.TrainingConfig(**fields)


def course_variants(args):
    """The course rows to time: the default path, then each optional speed-up asked for."""
    variants = [{"name": "default", "compile": False, "channels_last": False, "foreach_adamw": False}]
    if args.channels_last:
        variants.append({"name": "channels_last", "compile": False, "channels_last": True, "foreach_adamw": False})
    if args.compile:
        variants.append({"name": "compile+channels_last", "compile": True, "channels_last": True, "foreach_adamw": False})
    if args.foreach_adamw:
        variants.append({"name": "foreach AdamW", "compile": False, "channels_last": False, "foreach_adamw": True})
    return variants


def run_course(args, images, batch_size, variant, workdir):
    """Train with helpers.train_loop (the real one) on helpers.build_training's objects; return its row."""
    max_steps = args.warmup_steps + args.steps
    config = make_config(
        args, batch_size, course_output_dir(workdir, batch_size, variant),
        num_epochs=math.ceil(max_steps / max(len(images) // batch_size, 1)),
        max_train_steps=max_steps,
        logging_steps=args.warmup_steps,  # the first logging window is the untimed warm-up
        save_image_epochs=10**9, save_model_epochs=10**9, checkpointing_steps=10**9,  # only after the last step
    )
    config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler = helpers.build_training(config, images)
    if variant["channels_last"]:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps the same parameters
    if variant["compile"]:
        torch._dynamo.reset()  # a fresh compile for this batch size: static shapes, as one training run has
        model.compile()  # in place, so train_loop's EMA, evaluation and saving see a plain UNet2DModel
    if variant["foreach_adamw"]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, foreach=True)
        lr_scheduler = helpers.make_lr_scheduler(optimizer, config, train_dataloader)
    reset_accelerate()
    reset_memory()
    with eager_evaluation(variant["compile"]):
        result = helpers.train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler)
    row = make_row("course", variant["name"], batch_size, helpers.resolve_mixed_precision(config.mixed_precision),
                   result["global_step"], result["images_per_second"], peak_memory_gib())
    return row, config, model, noise_scheduler


@contextlib.contextmanager
def eager_evaluation(compiled):
    """For a compiled model, train_loop's closing grid (not timed) runs eagerly: no second compile for sampling."""
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if not (compiled and stance):
        yield
        return
    evaluate = helpers.evaluate

    def eager_evaluate(*args, **kwargs):
        with stance("force_eager"):
            return evaluate(*args, **kwargs)

    helpers.evaluate = eager_evaluate  # train_loop's evaluate_and_save looks the name up in helpers
    try:
        yield
    finally:
        helpers.evaluate = evaluate


def course_output_dir(workdir, batch_size, variant):
    """Where one course run's train_loop writes (removed after the run)."""
    return os.path.join(workdir, f"course-{batch_size}-{variant['name'].replace('+', '-').replace(' ', '-')}")


def time_course_evaluation(config, model, noise_scheduler):
    """Time one course evaluation grid: helpers.evaluate with its few-step sampler, as train_loop calls it."""
    from diffusers import DDPMPipeline

    model.eval()
    pipeline = DDPMPipeline(unet=model, scheduler=helpers.make_scheduler(config.eval_sampler, noise_scheduler))
    pipeline.set_progress_bar_config(disable=True)
    sync()
    start = time.perf_counter()
    helpers.evaluate(config, 0, pipeline)
    sync()
    seconds = time.perf_counter() - start
    return {"loop": "course", "sampler": config.eval_sampler, "inference_steps": config.eval_inference_steps,
            "images": config.eval_batch_size, "seconds": seconds}


# --------------------------------------------------------------------------- results


def make_row(loop, variant, batch_size, mixed_precision, steps_run, images_per_second, memory_gib):
    """One training result; MFU is filled in later from the FLOP count."""
    return {
        "loop": loop,
        "variant": variant,
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "steps_run": steps_run,
        "images_per_second": images_per_second,
        "ms_per_step": 1000.0 * batch_size / images_per_second if images_per_second else None,
        "peak_memory_gib": memory_gib,
        "mfu": None,
        "error": None,
    }


def error_row(loop, variant, batch_size, err):
    """A run that failed (e.g. out of memory at a large batch): recorded, and the benchmark goes on."""
    row = make_row(loop, variant, batch_size, None, 0, None, None)
    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return row


def add_mfu(rows, flops_per_image, peak):
    """MFU = model FLOPs per second (forward+backward) / the GPU's peak."""
    for row in rows:
        if peak and row["images_per_second"]:
            row["mfu"] = flops_per_image * row["images_per_second"] / peak


def fmt(value, spec, missing="n/a"):
    """Format a number, or 'n/a' for None."""
    return missing if value is None else format(value, spec)


def print_report(report):
    """The human-readable tables; the last line is the speedup."""
    m, d = report["model"], report["device"]
    print(f"\nDevice: {d['name']}   peak: {fmt(d['peak_flops'] and d['peak_flops'] / 1e12, '.0f')} TFLOP/s bf16 dense")
    print(f"Model: UNet2DModel {m['block_out_channels']}, {m['layers_per_block']} layer(s)/block, "
          f"{m['parameters'] / 1e6:.2f} M parameters, {m['image_size']} px, "
          f"{m['train_gflops_per_image']:.2f} GFLOP forward+backward per image")
    print(f"Data: {report['data']['source']} ({report['data']['num_images']} images; the course's one-time "
          f"decode took {report['data']['course_cache_seconds']:.1f} s)")
    print(f"Steps: {report['steps']['warmup']} warm-up + {report['steps']['timed']} timed per run")
    if d["type"] == "cpu":
        print("NOTE: a CPU run proves that the benchmark runs; its timings are not results "
              "(the tutorial runs without fp16 here: fp16 AMP needs a GPU).")
    print(f"\n{'loop':<9} {'variant':<22} {'batch':>5} {'precision':>9} {'images/s':>9} {'ms/step':>9} "
          f"{'peak mem':>9} {'MFU':>6}")
    for r in report["train"]:
        if r["error"]:
            print(f"{r['loop']:<9} {r['variant']:<22} {r['batch_size']:>5}  failed: {r['error']}")
            continue
        print(f"{r['loop']:<9} {r['variant']:<22} {r['batch_size']:>5} {r['mixed_precision']:>9} "
              f"{fmt(r['images_per_second'], '.1f'):>9} {fmt(r['ms_per_step'], '.1f'):>9} "
              f"{fmt(r['peak_memory_gib'], '.2f') + (' GiB' if r['peak_memory_gib'] is not None else ''):>9} "
              f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f') + ('%' if r['mfu'] else ''):>6}")
    print(f"\nEvaluation grid ({report['evaluation'][0]['images'] if report['evaluation'] else '?'} images):")
    for e in report["evaluation"]:
        extra = ""
        if e.get("seconds_for_1000_steps") and e["inference_steps"] != TUTORIAL_EVAL_STEPS:
            extra = f"   (capped; about {e['seconds_for_1000_steps']:.1f} s for the tutorial's 1000 steps)"
        print(f"{e['loop']:<9} {e['sampler']:<6} {e['inference_steps']:>5} steps  {e['seconds']:8.2f} s{extra}")
    s = report["speedup"]
    if s["evaluation"]:
        tutorial_steps = next(e["inference_steps"] for e in report["evaluation"] if e["loop"] == "tutorial")
        estimated = "" if tutorial_steps == TUTORIAL_EVAL_STEPS else f", estimated from {tutorial_steps} steps"
        print(f"evaluation speedup: {s['evaluation']:.1f}x (against the tutorial's 1000-step grid{estimated})")
    if s["train"] is None:
        print("speedup: n/a (a comparison run failed: see above)")
    else:
        print(f"speedup: {s['train']:.2f}x (course {s['course_images_per_second']:.1f} img/s, "
              f"tutorial {s['tutorial_images_per_second']:.1f} img/s)")


def software_versions():
    """The versions that produced the figures."""
    import accelerate
    import datasets
    import diffusers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


# --------------------------------------------------------------------------- main


def prepare_environment(args):
    """Hide the GPUs for --device cpu, and keep the Hub offline when --data is a local folder."""
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if helpers.is_local_path(args.data):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible to PyTorch. Use --device cpu (a smoke run) or a GPU machine.")


def main(argv=None):
    """Run both loops, print the tables and the speedup line, and write the JSON."""
    args = parse_args(argv)
    prepare_environment(args)
    import datasets
    from diffusers import DDPMScheduler

    datasets.disable_progress_bars()
    workdir = tempfile.mkdtemp(prefix="train-speed-")
    name = device_name()
    peak = peak_flops(name, args.peak_tflops)

    dataset = helpers.load_image_dataset(args.data)
    start = time.perf_counter()
    images = helpers.images_to_tensor(dataset, args.image_size)  # the course's one-time decode
    cache_seconds = time.perf_counter() - start
    smallest = min(len(dataset), len(images))
    if max(args.batch_sizes) > smallest:
        raise SystemExit(f"--batch-sizes/--tutorial-batch-size up to {max(args.batch_sizes)} but the data has "
                         f"{smallest} images: use smaller batches or more images.")

    config = make_config(args, args.tutorial_batch_size, workdir)
    torch.manual_seed(args.seed)
    model = helpers.make_model(config)
    flops_per_image = train_flops_per_image(model, args.image_size)
    report = {
        "benchmark": "benchmarks/train_speed.py",
        "args": vars(args),
        "smoke_run": not torch.cuda.is_available(),
        "device": {"type": "cuda" if torch.cuda.is_available() else "cpu", "name": name, "peak_flops": peak},
        "software": software_versions(),
        "model": {"block_out_channels": list(config.block_out_channels), "layers_per_block": config.layers_per_block,
                  "parameters": helpers.count_parameters(model), "image_size": args.image_size,
                  "train_gflops_per_image": flops_per_image / 1e9},
        "data": {"source": args.data, "num_images": len(images), "course_cache_seconds": cache_seconds},
        "steps": {"warmup": args.warmup_steps, "timed": args.steps},
        "train": [],
        "evaluation": [],
    }
    del model
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps)

    tutorial_row, course_row = None, None
    try:
        tutorial_row, tutorial_config, tutorial_model = run_tutorial(args, dataset, noise_scheduler, workdir)
        report["train"].append(tutorial_row)
        report["evaluation"].append(time_tutorial_evaluation(args, tutorial_config, tutorial_model, noise_scheduler))
        del tutorial_model
    except Exception as err:  # recorded in the table; the course runs still go ahead
        traceback.print_exc()
        report["train"].append(error_row("tutorial", "as written", args.tutorial_batch_size, err))
        tutorial_row = None

    for variant in course_variants(args):
        for batch_size in args.compile_batch_sizes if variant["compile"] else args.batch_sizes:
            course_model = None
            try:
                row, course_config, course_model, course_scheduler = run_course(args, images, batch_size, variant, workdir)
            except Exception as err:  # e.g. out of memory at a large batch: recorded, and the next run goes on
                traceback.print_exc()
                row = error_row("course", variant["name"], batch_size, err)
            report["train"].append(row)
            is_comparison = variant["name"] == "default" and batch_size == args.tutorial_batch_size
            if is_comparison and course_model is not None:
                course_row = row
                report["evaluation"].append(time_course_evaluation(course_config, course_model, course_scheduler))
            del course_model
            helpers.remove_path(course_output_dir(workdir, batch_size, variant))
            reset_memory()

    helpers.remove_path(workdir)  # the pipelines train_loop saved (450 MB each at full size)
    add_mfu(report["train"], flops_per_image, peak)
    ok = tutorial_row and course_row and tutorial_row["images_per_second"] and course_row["images_per_second"]
    evals = {e["loop"]: e for e in report["evaluation"]}
    report["speedup"] = {
        "train": course_row["images_per_second"] / tutorial_row["images_per_second"] if ok else None,
        "course_images_per_second": course_row["images_per_second"] if ok else None,
        "tutorial_images_per_second": tutorial_row["images_per_second"] if ok else None,
        "evaluation": (evals["tutorial"]["seconds_for_1000_steps"] / evals["course"]["seconds"]
                       if {"tutorial", "course"} <= evals.keys() else None),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nWrote {args.json}")
    print_report(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
