"""The peer: the HF diffusion-models-class unit-1 recipe at 32 px, trained on a local folder, then FID/KID.

    python benchmarks/peer_recipe.py --data DIR --out runs/peer --course-model runs/ddpm-butterflies-quick

Trains the class's published recipe with its own plain loop (as its notebook does): UNet2DModel with
block_out_channels (64, 128, 128, 256), two layers per block, attention in the two deepest levels;
DDPMScheduler with the cosine schedule (squaredcos_cap_v2), noise prediction; AdamW at 4e-4, constant;
batch 64; 30 epochs; random flips; no EMA. The only change: bf16 autocast where the CPU or GPU computes
it natively, as the course's mixed_precision="auto" does, so both get the same help from the hardware.
Then samples 256 images from it, and from the course's model in --course-model, with DDIM-50 from the
same seeded noise, and scores both against all the folder's images with FID and KID (helpers).
With --peer-results, scores only the course's model, taking the peer's scores and time from a results
file an earlier run wrote (the peer's samples do not change while its weights do not).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402


def train_peer(images, out, epochs=30, batch_size=64, seed=0):
    """The class's recipe and loop; returns the U-Net, its scheduler and the training seconds."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=(64, 128, 128, 256),
                        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=batch_size, shuffle=True)
    bf16 = helpers.resolve_mixed_precision("auto") == "bf16"
    device = helpers.pick_device()  # CUDA, else MPS, else the CPU
    model.to(device)
    start, losses = time.perf_counter(), []
    for epoch in range(epochs):
        for (batch,) in loader:
            clean = helpers.augment_batch(batch.to(device))
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, 1000, (len(clean),), device=device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                pred = model(noisy, timesteps, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"peer epoch {epoch + 1}/{epochs}: loss {sum(losses[-len(loader):]) / len(loader):.4f}", flush=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(os.path.join(out, "unet"))
    scheduler.save_pretrained(os.path.join(out, "scheduler"))
    return model.eval(), scheduler, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/peer")
    parser.add_argument("--course-model", required=True, help="the output_dir of the course's quick run")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--scores-only", action="store_true",
                        help="skip training: score the peer already saved in --out (its time read from results.json)")
    parser.add_argument("--figure", help="also write both grids side by side, with their scores, to this PNG")
    parser.add_argument("--course-minutes", type=float, help="the course run's training time, for the figure's title")
    parser.add_argument("--data-label", default="Leeds butterflies on white", help="names the data in the figure's footer")
    parser.add_argument("--peer-results", help="score only the course's model; the peer's scores from this results file")
    args = parser.parse_args()
    if args.peer_results and (args.figure or args.scores_only):
        parser.error("--peer-results scores the course's model alone: no --figure (it needs the peer's samples), no --scores-only")
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    real = helpers.images_to_tensor(helpers.load_image_dataset(args.data), 32)
    earlier = json.load(open(args.peer_results)) if args.peer_results else None
    if earlier:
        peer, peer_scheduler, peer_seconds = None, None, earlier["peer_training_seconds"]
    elif args.scores_only:
        peer = UNet2DModel.from_pretrained(os.path.join(args.out, "unet")).eval()
        peer_scheduler = DDPMScheduler.from_pretrained(os.path.join(args.out, "scheduler"))
        peer_seconds = json.load(open(os.path.join(args.out, "results.json")))["peer_training_seconds"]
    else:
        peer, peer_scheduler, peer_seconds = train_peer(real, args.out)
    course = DDPMPipeline.from_pretrained(args.course_model)
    kid = helpers.make_kid(helpers.make_inception(), kid_subset_size=100)
    helpers.add_real_images(kid, real)
    results = {"peer_training_seconds": peer_seconds, "samples": args.samples, "real_images": len(real),
               "course_model": args.course_model,
               "peer_parameters": earlier["peer_parameters"] if earlier else helpers.count_parameters(peer),
               "course_parameters": helpers.count_parameters(course.unet)}
    if earlier:
        results.update(peer=earlier["peer"], peer_scores_from=args.peer_results)
    models = [] if earlier else [("peer", peer, peer_scheduler)]
    models.append(("course", course.unet.eval(), course.scheduler))
    os.makedirs(args.out, exist_ok=True)
    for name, unet, scheduler in models:
        fake, _ = helpers.generate_images(unet, helpers.make_scheduler("ddim", scheduler), args.samples, 50, 64, seed=0)
        results[name] = helpers.fid_kid_scores(kid, helpers.to_uint8(fake))
        helpers.make_grid(fake[:16]).save(os.path.join(args.out, f"{name}_ddim50.png"))
        print(name, results[name], flush=True)
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)
    print(json.dumps(results, indent=1))
    if args.figure:
        save_figure(args, results)


def save_figure(args, results):
    """The first 16 samples of each model side by side, titled with time, FID and KID, footed with the machine."""
    import datetime

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from make_outputs import hardware, versions

    course_time = f", {args.course_minutes:.1f} min" if args.course_minutes else ""
    millions = {name: f"{results[name + '_parameters'] / 1e6:.1f} M parameters" for name in ("peer", "course")}
    titles = {"peer": f"HF class recipe ({millions['peer']}, {results['peer_training_seconds'] / 60:.1f} min)",
              "course": f"course quick preset ({millions['course']}{course_time})"}
    fig, axs = plt.subplots(1, 2, figsize=(9, 5.4), gridspec_kw=dict(top=0.83, bottom=0.05, left=0.01, right=0.99, wspace=0.04))
    for ax, name in zip(axs, ("peer", "course")):
        ax.imshow(Image.open(os.path.join(args.out, f"{name}_ddim50.png")), interpolation="nearest")
        ax.set_title(f"{titles[name]}\nFID {results[name]['fid']:.1f}, KID {results[name]['kid']:.3f}", fontsize=10)
        ax.set_axis_off()
    fig.suptitle(f"The same noise, DDIM 50 steps; scores of {results['samples']} samples against the "
                 f"{results['real_images']} images", fontsize=10, y=0.985)
    fig.text(0.005, 0.005, f"{args.data_label}; {hardware(short=True)}; {datetime.date.today()}; {versions()}",
             fontsize=7, color="0.45")
    fig.savefig(args.figure, dpi=80)
    print("figure:", args.figure)


if __name__ == "__main__":
    main()
