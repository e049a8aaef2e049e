"""FID of saved pipelines under several samplers, against one folder of real images (features computed once).

    python benchmarks/sampler_fid.py --data DIR --models runs/a runs/b --samplers dpm++:20 sde-dpm++:20 [--samples 256]

Each model samples --samples images per sampler with helpers.generate_images (batch b from the noise of
seed + b, the same noise for every model and sampler); FID uses the Inception-v3 of helpers.make_inception.
FID with a few hundred samples is biased upwards: compare numbers only at the same --samples.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the real images: a local folder")
    parser.add_argument("--models", nargs="+", required=True, help="output_dirs holding a saved pipeline")
    parser.add_argument("--samplers", nargs="+", default=["dpm++:20", "sde-dpm++:20"], help="name:steps")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    from diffusers import DDPMPipeline

    pipelines = {path: DDPMPipeline.from_pretrained(path) for path in args.models}
    size = next(iter(pipelines.values())).unet.config.sample_size
    real = helpers.images_to_tensor(helpers.load_image_dataset(args.data), size)
    kid = helpers.make_kid(helpers.make_inception(), kid_subset_size=min(100, args.samples, len(real)))
    helpers.add_real_images(kid, real, batch_size=64)
    print(f"model | sampler | steps | FID ({args.samples} samples) | seconds per 16 images")
    for path, pipeline in pipelines.items():
        unet = pipeline.unet.to(helpers.pick_device()).eval()  # CUDA, else MPS, else the CPU
        for spec in args.samplers:
            name, steps = spec.split(":")
            fake, seconds = helpers.generate_images(unet, helpers.make_scheduler(name, pipeline.scheduler),
                                                    args.samples, int(steps), 16, seed=0)
            fid = helpers.fid_kid_scores(kid, helpers.to_uint8(fake), batch_size=64)["fid"]
            print(f"{path} | {name} | {steps} | {fid:.1f} | {seconds:.2f}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
