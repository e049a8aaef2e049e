"""Wall time of one whole training run with a preset, as 05_training runs it (one process).

    python benchmarks/preset_time.py --preset quick --data DIR --out quick.json
    python benchmarks/preset_time.py --preset quick --data DIR --train-minutes 4 --out budget.json

Decodes the images once (timed apart), then runs helpers.train_loop on helpers.build_training's objects,
evaluation grids and saving included, into a temporary output_dir, and prints the minutes it took against
the time the run expected before its first step. With --train-minutes it also reports how far the whole
train_loop call (its timing of a few steps included) ended from that budget, and whether the run left a
saved model and its last grid.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # helpers.py lives one folder up

import torch  # noqa: E402

import helpers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", choices=sorted(helpers.PRESETS))
    parser.add_argument("--data", required=True, help="a local image folder or a Hub dataset id")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--train-minutes", type=float, default=None, help="fit the run to this budget (train_minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        config = helpers.preset_config(args.preset, dataset_name=args.data, output_dir=output_dir,
                                       overwrite_output_dir=True, train_minutes=args.train_minutes)
        start = time.perf_counter()
        images = helpers.images_to_tensor(helpers.load_image_dataset(config.dataset_name), config.image_size)
        decode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = helpers.train_loop(*helpers.build_training(config, images))
        train_seconds = time.perf_counter() - start
        saved = sorted(os.listdir(output_dir))
        grids = sorted(os.listdir(os.path.join(output_dir, "samples")))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    report = {"preset": args.preset, "device": device, "cpu": platform.processor() or platform.machine(),
              "cpu_native_bf16": helpers.cpu_has_native_bf16(), "cores": os.cpu_count(), "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "images": len(images), "decode_seconds": decode_seconds,
              "train_seconds": train_seconds, **result, "saved_model": "model_index.json" in saved,
              "last_grid": grids[-1] if grids else None}
    if args.train_minutes:
        report["train_minutes"] = args.train_minutes
        report["off_budget"] = train_seconds / (args.train_minutes * 60) - 1
    print(f"preset {args.preset!r} on {device}: {len(images)} images decoded in {decode_seconds:.1f} s; "
          f"{result['global_step']} steps ({result['epochs']} epochs) trained in {train_seconds / 60:.2f} min"
          + (f", {result['images_per_second']:.0f} images/s after the first logging window" if result["images_per_second"] else "")
          + f"; expected "
          f"{result['expected_seconds'] / 60:.2f} min before the first step"
          + (f"; {report['off_budget']:+.1%} off the {args.train_minutes:g}-minute budget" if args.train_minutes else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
