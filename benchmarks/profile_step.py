"""Where a training step's time goes: helpers.train_loop under torch.profiler, on random images.

    python benchmarks/profile_step.py --batch-sizes 16,128 --out profile.txt

For each batch size it runs the course's real train_loop (helpers.build_training's objects, the tutorial's
U-Net at 128 px unless --tiny) for 20 optimizer steps, profiles steps 11-20, and reports the wall
time per step, the GPU's busy time per step (the sum of its kernels), and the kernels grouped by kind
(convolution, matrix product, normalization, element-wise, optimizer, other), then torch.profiler's own
table of the operators with the most device time. A GPU busy for most of the step is limited by its
kernels; a large gap between wall and busy time means the host (Python, launches) keeps it waiting.
"""

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers.py lives one folder up

import torch  # noqa: E402

import helpers  # noqa: E402

WAIT, WARMUP, ACTIVE = 8, 2, 10  # profiler schedule, in batches
KINDS = [  # (kind, substrings of a kernel's name), first match wins
    ("convolution", ("conv", "cudnn", "implicit_gemm", "wgrad", "dgrad", "fprop", "xmma", "sm90_xmma")),
    ("matrix product", ("gemm", "cutlass", "nvjet", "matmul")),
    ("normalization", ("norm", "welford")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "reduce", "copy", "silu", "cat", "fill")),
]


def kernel_kind(name):
    """The kind of a device kernel, from its name."""
    lower = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lower for k in keys)), "other")


def profile_batch_size(batch_size, args, images):
    """Run train_loop with the profiler on ACTIVE steps; return a report's lines."""
    from torch.profiler import ProfilerActivity, profile, schedule

    with tempfile.TemporaryDirectory() as output_dir:
        config = helpers.preset_config(
            "tutorial", train_batch_size=batch_size, output_dir=output_dir, overwrite_output_dir=True,
            max_train_steps=WAIT + WARMUP + ACTIVE, logging_steps=10, save_image_epochs=10**9,
            save_model_epochs=10**9, checkpointing_steps=10**9, image_size=args.image_size,
            **(dict(block_out_channels=(32, 64), layers_per_block=1) if args.tiny else {}),
        )
        built = helpers.build_training(config, images)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        prof = profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE))
        add, evaluate = helpers.LossLog.add, helpers.evaluate
        marks = {}

        def add_and_step(self, loss, step):
            add(self, loss, step)
            if step in (WAIT + WARMUP, WAIT + WARMUP + ACTIVE - 1):  # the first and last profiled step
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                marks.setdefault("start", time.perf_counter())
                marks["end"] = time.perf_counter()
            prof.step()

        helpers.LossLog.add = add_and_step  # train_loop calls log.add once per batch
        helpers.evaluate = lambda *a, **k: None  # noqa: E731  (the closing grid is not profiled)
        try:
            with prof:
                helpers.train_loop(*built)
        finally:
            helpers.LossLog.add, helpers.evaluate = add, evaluate
    wall_ms = 1000 * (marks["end"] - marks["start"]) / (ACTIVE - 1)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not e.name.startswith("ProfilerStep")]  # the profiler's own step markers are not kernels
    by_kind = collections.Counter()
    for e in events:
        by_kind[kernel_kind(e.name)] += e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
    busy_ms = sum(by_kind.values()) / 1000 / ACTIVE
    lines = [f"batch {batch_size}: wall {wall_ms:.1f} ms/step, GPU kernels {busy_ms:.1f} ms/step "
             f"({100 * busy_ms / wall_ms:.0f}% busy), {batch_size / wall_ms * 1000:.0f} images/s"]
    for kind, us in by_kind.most_common():
        lines.append(f"  {kind:<15} {us / 1000 / ACTIVE:7.2f} ms/step  {100 * us / max(sum(by_kind.values()), 1):5.1f}%")
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,128")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a tiny U-Net (a CPU smoke run)")
    parser.add_argument("--rows", type=int, default=25, help="operators in torch.profiler's table")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(sizes) * 4, 3, args.image_size, args.image_size), generator=generator,
                           dtype=torch.uint8)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    report = [f"{name}; torch {torch.__version__}; profiled steps {WAIT + WARMUP + 1}-{WAIT + WARMUP + ACTIVE}"]
    for batch_size in sizes:
        report += profile_batch_size(batch_size, args, images)
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
