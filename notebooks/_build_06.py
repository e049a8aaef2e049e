"""Build notebooks/06_sampling.ipynb (without outputs): `python notebooks/_build_06.py`."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = []


def md(text):
    cells.append(new_markdown_cell(text.strip("\n")))


def code(text, tags=None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    cells.append(cell)


md(r"""
# 06 · Sampling: from noise to butterflies, and how good they are

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/COURSE_OWNER/diffusion-course/blob/main/notebooks/06_sampling.ipynb)

Notebook 05 trained a U-Net and saved it as a `DDPMPipeline`. Here you load that pipeline and
generate butterflies with it, as the tutorial does at its end; then you open the box. You will
learn what one step of the reverse process computes (DDPM's and DDIM's update, checked against
diffusers' own code), watch one sample go from noise to butterfly, compare samplers side by side
on the same noise (DDPM with 1000 steps, DDIM, DPM-Solver++, UniPC, Euler with 10 to 50), see
what the moving average of the weights (EMA) buys, check that a seed reproduces its images
exactly, and measure quality with three numbers: the sliced Wasserstein distance (SWD, no
download needed), FID and KID, each next to the floor that real images reach against real images.
""")

code(r"""
# Setup: on Colab, fetch the course and install its requirements; elsewhere this does nothing.
import os, sys
if "google.colab" in sys.modules and not os.path.exists("helpers.py"):
    !git clone -q --depth 1 https://github.com/COURSE_OWNER/diffusion-course.git /content/diffusion-course
    %cd /content/diffusion-course/notebooks
    %pip install -q -r ../requirements.txt
sys.path.insert(0, os.path.abspath(".."))  # helpers.py lives one folder up
""")

md(r"""
## Parameters

The defaults are the full-size run of the tutorial. Use the same `dataset_name`, `image_size` and
`output_dir` as in 05_training. Sampling for the metrics is the expensive part:
`num_metric_images` images for each of the seven samplers, and DDPM alone runs 1000 U-Net passes
per batch. On a GPU the full run takes a while; on a CPU, lower `ddpm_steps`, the steps in
`fast_samplers` and `num_metric_images`.
""")

code(r"""
# Data and model: the same values as in 05_training.
dataset_name = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id or a local folder of images
image_size = 128  # the generated image resolution (the model's sample_size)
output_dir = "ddpm-butterflies-128"  # the folder where 05_training saved the pipeline

# Sampling.
eval_batch_size = 16  # images per grid, and per batch when sampling for the metrics
seed = 0  # seeds the initial noise: the same seed gives the same images
ddpm_steps = 1000  # DDPM's number of steps, the tutorial's (DDPMPipeline's default num_inference_steps)
fast_samplers = [["ddim", 50], ["ddim", 20], ["dpm++", 20], ["dpm++", 10], ["unipc", 20], ["euler", 20]]  # [sampler, steps] compared with DDPM
eval_sampler = "dpm++"  # the sampler for the EMA-against-raw comparison and the reproducibility check
eval_inference_steps = 20  # its number of steps

# Quality metrics.
num_metric_images = 500  # generated images per sampler for SWD, FID and KID (at most half the dataset, see below)
fid_weights_path = None  # a local Inception-v3 weights file for FID and KID; None: download it once (needs a network)

# Figures.
figures_dir = None  # None: do not save figures; a folder (e.g. "../images") to save them as 06_<what>.png
figure_label = ""  # a note added to figure titles, e.g. "CPU, 32 px, 2 epochs"
""", tags=["parameters"])

code(r"""
import io
import time

import datasets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from IPython.display import Image as ShowImage, display
from PIL import Image, ImageDraw

from helpers import (TrainingConfig, add_real_images, checkpoints_in, count_parameters, fid_kid_scores,
                     generate_images, images_to_tensor, laplacian_pyramid, load_image_dataset, make_fid_kid,
                     make_grid, make_inception, make_scheduler, predict_x0, quality_metrics, sample, save_gif,
                     show_source, sliced_wasserstein, swd, to_pil_images)

config = TrainingConfig(dataset_name=dataset_name, image_size=image_size, output_dir=output_dir,
                        eval_batch_size=eval_batch_size, seed=seed, eval_sampler=eval_sampler,
                        eval_inference_steps=eval_inference_steps, fid_weights_path=fid_weights_path)
device = "cuda" if torch.cuda.is_available() else "cpu"
datasets.disable_progress_bars()
diffusers_logging.disable_progress_bar()
if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
title_note = f" ({figure_label})" if figure_label else ""


def save_figure(fig, what):
    # Save a figure as figures_dir/06_<what>.png when figures_dir is set.
    if figures_dir:
        fig.savefig(os.path.join(figures_dir, f"06_{what}.png"), dpi=120, bbox_inches="tight")


print("device:", device)
""")

md(r"""
## 1. Load the trained pipeline

At the end of training, `train_loop` saved `DDPMPipeline(unet=unet, scheduler=noise_scheduler)`
with `save_pretrained(output_dir)`. That folder holds:

- `model_index.json`: which classes make up the pipeline (`UNet2DModel`, `DDPMScheduler`);
- `unet/`: the U-Net's `config.json` (its architecture) and `diffusion_pytorch_model.safetensors`
  (its weights, the **EMA** weights: see section 8);
- `scheduler/scheduler_config.json`: the noise schedule ($T = 1000$, linear $\beta_t$);
- `unet_raw/`: the weights before averaging. The tutorial does not save these; our
  `train_loop` adds them so that section 8 can compare the two.

`DDPMPipeline.from_pretrained(output_dir)` reads `model_index.json` and rebuilds each component
from its folder: no training code needed. The same call accepts a Hub id
(`"<user>/<model>"`), which is how others use a model you pushed. **Train in 05_training first**:
without a saved pipeline there is nothing to sample from.
""")

code(r"""
if not os.path.isfile(os.path.join(config.output_dir, "model_index.json")):
    found = "It holds checkpoints but no saved pipeline yet: finish (or resume) training in 05_training. " if checkpoints_in(config.output_dir) else ""
    raise FileNotFoundError(
        f"No trained pipeline in output_dir={config.output_dir!r} (no model_index.json there). {found}"
        "Run 05_training.ipynb first, which saves the pipeline there, or set output_dir to the folder "
        "you trained into (to sample from a model on the Hub, call DDPMPipeline.from_pretrained('<user>/<model>'))."
    )
pipeline = DDPMPipeline.from_pretrained(config.output_dir).to(device)
pipeline.set_progress_bar_config(disable=True)
unet, scheduler = pipeline.unet.eval(), pipeline.scheduler
if unet.config.sample_size != config.image_size:
    raise ValueError(
        f"image_size={config.image_size}, but the model in {config.output_dir!r} makes "
        f"{unet.config.sample_size} px images: set image_size={unet.config.sample_size}."
    )
""")

code(r"""
# NBVAL_CHECK_OUTPUT
print("U-Net:", type(unet).__name__, f"with {count_parameters(unet):,} parameters, {unet.config.sample_size} px")
print("Scheduler:", type(scheduler).__name__, f"with T = {scheduler.config.num_train_timesteps} steps,",
      f"betas {scheduler.config.beta_schedule} from {scheduler.config.beta_start} to {scheduler.config.beta_end}")
""")

md(r"""
## 2. The tutorial's last step: a grid of butterflies

The tutorial ends by opening the last grid that `evaluate` saved. Here you call the pipeline
yourself, as `evaluate` does: it draws the initial noise $x_T \sim \mathcal N(0, I)$ from the
generator and runs `num_inference_steps` DDPM steps (`ddpm_steps`, 1000 as in the tutorial).
One departure: the tutorial passes `generator=torch.manual_seed(config.seed)`, which reseeds PyTorch's global random
number generator (diffusers #7991); a local `torch.Generator` gives the same images and leaves the
global one alone. `output_type="pt"` returns a tensor in $[0, 1]$ instead of PIL images.
""")

code(r"""
start = time.perf_counter()
pipeline_images = pipeline(
    batch_size=config.eval_batch_size,
    generator=torch.Generator().manual_seed(config.seed),
    num_inference_steps=ddpm_steps,
    output_type="pt",
).images.cpu()
print(f"{len(pipeline_images)} images with DDPM, {ddpm_steps} steps, in {time.perf_counter() - start:.1f} s")

fig = plt.figure(figsize=(6, 6), layout="constrained")
plt.imshow(make_grid(pipeline_images * 2 - 1))  # [0, 1] -> [-1, 1], the course's convention
plt.title(f"DDPMPipeline, {ddpm_steps} steps, seed {config.seed}{title_note}")
plt.axis("off")
save_figure(fig, "pipeline_grid")
plt.show()
""")

md(r"""
## 3. What one sampling step computes

The model $\epsilon_\theta(x_t, t)$ predicts the noise in a noisy image $x_t$. With
$\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$ (training noised
$x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$), **DDPM** (Ho et al. 2020,
Algorithm 2) removes a little of the predicted noise and adds back a little fresh noise $z$:

$$x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{1 - \alpha_t}{\sqrt{1 - \bar\alpha_t}}\,\epsilon_\theta(x_t, t)\Big) + \sigma_t z,
\qquad z \sim \mathcal N(0, I),\quad \sigma_t^2 = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\,\beta_t .$$

It needs all 1000 steps because each step is small and stochastic. **DDIM** (Song et al. 2021,
with $\eta = 0$) first estimates the clean image, then jumps to any earlier timestep $t'$
(e.g. 50 steps apart) with no fresh noise, so the same $x_T$ always gives the same image:

$$\hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon_\theta(x_t, t)}{\sqrt{\bar\alpha_t}},
\qquad x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'}}\,\epsilon_\theta(x_t, t).$$

The next cell computes one step of each from the formulas and compares it with diffusers'
`scheduler.step`. With fewer than 1000 steps DDPM jumps from $t$ to $t' < t - 1$ and
$\alpha_t$ becomes $\bar\alpha_t / \bar\alpha_{t'}$, which is what the code uses. diffusers clips
$\hat x_0$ to $[-1, 1]$ by default (`clip_sample=True`), a safeguard the formulas do not have, so
the check turns it off.
""")

code(r"""
# NBVAL_CHECK_OUTPUT
size = unet.config.sample_size
x_t = torch.randn((2, 3, size, size), generator=torch.Generator().manual_seed(config.seed)).to(device)

ddpm = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
ddpm.set_timesteps(ddpm_steps)
t = ddpm.timesteps[len(ddpm.timesteps) // 2]  # a step halfway through
t_prev = t - ddpm.config.num_train_timesteps // ddpm_steps
with torch.no_grad():
    eps = unet(x_t, t).sample  # ε_θ(x_t, t)
abar_t, abar_prev = ddpm.alphas_cumprod[t].to(device), ddpm.alphas_cumprod[t_prev].to(device)
alpha_t = abar_t / abar_prev  # 1 - β_t when the steps are consecutive
sigma_t = ((1 - abar_prev) / (1 - abar_t) * (1 - alpha_t)).sqrt()
z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(1)).to(device)
ddpm_formula = (x_t - (1 - alpha_t) / (1 - abar_t).sqrt() * eps) / alpha_t.sqrt() + sigma_t * z
ddpm_step = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(1)).prev_sample  # draws the same z
print(f"DDPM, t = {int(t)} -> {int(t_prev)}: formula matches scheduler.step:", torch.allclose(ddpm_formula, ddpm_step, atol=1e-4))

ddim = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
ddim.set_timesteps(config.eval_inference_steps)
t = ddim.timesteps[len(ddim.timesteps) // 2]
t_prev = t - ddim.config.num_train_timesteps // config.eval_inference_steps
with torch.no_grad():
    eps = unet(x_t, t).sample
abar_t, abar_prev = ddim.alphas_cumprod[t].to(device), ddim.alphas_cumprod[t_prev].to(device)
x0_hat = (x_t - (1 - abar_t).sqrt() * eps) / abar_t.sqrt()
ddim_formula = abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps
ddim_step = ddim.step(eps, t, x_t).prev_sample
print(f"DDIM, t = {int(t)} -> {int(t_prev)}: formula matches scheduler.step:", torch.allclose(ddim_formula, ddim_step, atol=1e-4))
""")

md(r"""
`DDPMPipeline` runs that step in a loop, but only with schedulers whose `step` accepts a
`generator`: `UniPCMultistepScheduler.step` takes none, so the pipeline raises `TypeError` with
it. The course's `sample` is the same loop for any diffusers scheduler. Two calls make it general:
`x_T` is scaled by `init_noise_sigma` (1 for DDPM, DDIM, DPM-Solver++ and UniPC; about 157 for
Euler, which works with the noise level $\sigma_t = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}$
instead of $t$), and `scale_model_input` rescales $x_t$ where a scheduler needs it (Euler; the
identity for the others). Given the same generator for the
initial noise and the steps, it reproduces `DDPMPipeline` exactly (checked in section 7).
""")

code(r"""
show_source(sample)
""")

md(r"""
## 4. The reverse process, step by step

The next cell samples four images with DDPM and keeps snapshots along the way, through the
`callback` that `sample` calls after every step. To see what the model thinks at each step, the
U-Net is wrapped in a small function that remembers its input $x_t$ and its prediction
$\epsilon_\theta(x_t, t)$; `predict_x0` turns them into $\hat x_0$, the model's guess of the
clean image (the formula of section 3), with no extra U-Net pass. The figure after it follows
the first image: the top row shows $x_t$, noise that fades as $t$ goes to 0; the bottom row shows
$\hat x_0$: the coarse layout (where the butterfly is, its colours) is decided early, the fine
detail late.
""")

code(r"""
show_source(predict_x0)

ddpm = make_scheduler("ddpm", scheduler)
generator = torch.Generator().manual_seed(config.seed)
noise = torch.randn((4, 3, size, size), generator=generator).to(device)
keep = set(np.linspace(0, ddpm_steps - 1, min(ddpm_steps, 24)).round().astype(int).tolist())
snapshots, seen = [], {}


def unet_and_remember(x, t):
    # The model as sample() calls it; it also remembers its input x_t and its prediction ε_θ(x_t, t).
    output = unet(x, t)
    seen.update(x=x, eps=output.sample)
    return output


def keep_snapshot(i, t, x):
    # Called by sample() after step i (at timestep t): keep x_t and the model's guess of x_0 at that step.
    if i in keep:
        snapshots.append((f"t = {int(t)}", seen["x"].cpu(), predict_x0(ddpm, seen["x"], t, seen["eps"]).cpu()))


final = sample(unet_and_remember, ddpm, noise, ddpm_steps, generator, callback=keep_snapshot)
snapshots.append(("final image", final.cpu(), final.cpu()))
print(f"{len(snapshots)} snapshots, from pure noise (t = {int(ddpm.timesteps[0])}) to the final images {tuple(final.shape)}")
""")

code(r"""
columns = [snapshots[round(k)] for k in np.linspace(0, len(snapshots) - 1, min(8, len(snapshots)))]
fig, axes = plt.subplots(2, len(columns), figsize=(2 * len(columns), 4.4), squeeze=False, layout="constrained")
for col, (label, x, x0) in enumerate(columns):
    axes[0, col].imshow(to_pil_images(x[:1])[0])
    axes[1, col].imshow(to_pil_images(x0[:1])[0])
    axes[0, col].set_title(label, fontsize=9)
axes[0, 0].set_ylabel("$x_t$")
axes[1, 0].set_ylabel(r"$\hat x_0$")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle(f"The reverse process: DDPM, {ddpm_steps} steps{title_note}")
save_figure(fig, "reverse_process")
plt.show()
""")

md(r"""
The same snapshots as an animation: top row $x_t$, bottom row $\hat x_0$, for four images. It is
displayed here and, when `figures_dir` is set, saved as `06_reverse_process.gif`.
""")

code(r"""
scale = max(1, 128 // size)  # show small images at least 128 px wide


def gif_frame(label, x, x0):
    # One frame: x_t above, the guess of x_0 below, enlarged, with the step written under it.
    grid = make_grid(torch.cat([x, x0]))
    grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    frame = Image.new("RGB", (grid.width, grid.height + 16), "white")
    frame.paste(grid, (0, 0))
    ImageDraw.Draw(frame).text((4, grid.height + 2), f"{label}   top: x_t   bottom: predicted x_0", fill="black")
    return frame


frames = [gif_frame(*snapshot) for snapshot in snapshots]
gif = io.BytesIO()
save_gif(frames, gif, seconds_per_frame=0.12, hold_last_seconds=2.0)
if figures_dir:
    with open(os.path.join(figures_dir, "06_reverse_process.gif"), "wb") as file:
        file.write(gif.getvalue())
display(ShowImage(data=gif.getvalue(), format="gif"))
""")

md(r"""
## 5. The same seed gives the same images

Sampling is random only through the generator: the initial noise $x_T$ and, for DDPM, the
fresh noise $z$ of each step. Seed the generator and the images are fixed, which is what makes
the comparisons below fair and lets you regenerate a butterfly you liked. The cell samples the
same grid twice and compares them bit for bit. This holds on one machine with the same library
versions; another GPU or CPU can round differently and shift pixels slightly.
""")

code(r"""
# NBVAL_CHECK_OUTPUT
eval_scheduler = make_scheduler(config.eval_sampler, scheduler)
settings = (config.eval_batch_size, config.eval_inference_steps, config.eval_batch_size)
first, _ = generate_images(unet, eval_scheduler, *settings, seed=config.seed)
second, _ = generate_images(unet, eval_scheduler, *settings, seed=config.seed)
other, _ = generate_images(unet, eval_scheduler, *settings, seed=config.seed + 1000)
print(f"{config.eval_sampler}, {config.eval_inference_steps} steps, seed {config.seed}, twice:")
print("  identical:", torch.equal(first, second), "| largest difference:", (first - second).abs().max().item())
print("another seed gives other images:", not torch.equal(first, other))
""")

md(r"""
## 6. Measuring quality

Looking at grids is the first test, but it cannot tell 10 steps from 20 reliably. Three numbers
compare a set of generated images with a set of real ones; lower is better for all three.

**Sliced Wasserstein distance** (SWD; Karras et al. 2018, the progressive-GAN paper) needs no
trained network. Each image is split into a Laplacian pyramid: band-pass levels that hold the
detail of one scale each, down to 16 px, where the last level keeps the coarse colours. From each
level it takes 128 random 7×7 patches per image; each patch is a descriptor of $7 \cdot 7 \cdot 3 = 147$
numbers, normalised per set to mean 0 and standard deviation 1 in each colour channel. The
distance between two clouds of descriptors $A$ and $B$ is estimated on random unit directions
$\theta$: project both sets on $\theta$, sort, and average the gaps (the 1-D Wasserstein distance
is exactly that),

$$\mathrm{SWD}(A, B) = \frac{1}{|\Theta|}\sum_{\theta \in \Theta} \frac{1}{n}\sum_{i=1}^{n}
\big|\,\mathrm{sort}(A\theta)_i - \mathrm{sort}(B\theta)_i\,\big| ,$$

with 4 repeats of 128 directions, reported ×1000 per level and averaged over the levels. The
normalisation per set is deliberate: a constant change of brightness or contrast is not counted,
only the shape of the patch distribution (textures, edges, colour relations). The same patch
positions and directions are used for both sets (a seeded generator), so identical sets give 0
exactly.

**FID** (Fréchet Inception distance) embeds every image with an Inception-v3 network trained on
ImageNet (2048 features), fits a Gaussian to each set and compares them:
$\|\mu_r - \mu_g\|^2 + \mathrm{Tr}\big(\Sigma_r + \Sigma_g - 2(\Sigma_r \Sigma_g)^{1/2}\big)$.
**KID** (kernel Inception distance) compares the same features with an unbiased kernel statistic
(polynomial kernel MMD², averaged over random subsets); unlike FID it is not biased by the
number of images, which matters at a few hundred. Both come from `torchmetrics` and need the
Inception weights (about 100 MB, downloaded once); with no network, point `fid_weights_path` at a
copy, or they are skipped.

**The floor.** Two sets of real butterflies are not at distance 0: each metric has its own noise
and a bias that depends on the number of images. So the real images are split into two disjoint
halves of `n` images each: the *reference* set, which every generated set is compared with, and a
*held-out* set, whose distance to the reference is the best a generator can hope for at this `n`.
(Both halves were used in training; held-out means only "not in the reference set".) Every
sampler is scored on `n` generated images, so all rows compare sets of the same size. That is why
`num_metric_images` is at most half the dataset: 500 for the 1000 Smithsonian butterflies.
""")

code(r"""
show_source(swd)
show_source(sliced_wasserstein)
""")

code(r"""
real = images_to_tensor(load_image_dataset(config.dataset_name), config.image_size)  # uint8 N×3×H×W
n = min(num_metric_images, len(real) // 2)
if n < 2:
    raise ValueError(f"The dataset has {len(real)} images: the metrics need at least 4 (two sets of 2).")
order = torch.randperm(len(real), generator=torch.Generator().manual_seed(config.seed))
reference, held_out = real[order[:n]], real[order[n:2 * n]]
""")

code(r"""
# NBVAL_CHECK_OUTPUT
print(f"{len(real)} real images; reference set {tuple(reference.shape)}, held-out set {tuple(held_out.shape)}")
print("SWD of the reference set with itself:", swd(reference, reference)["swd"])
""")

md(r"""
What SWD looks at: the Laplacian pyramid of one real butterfly. Each band-pass level is the image
minus a blurred copy of itself (grey is 0); the last level is the blurred rest.
""")

code(r"""
levels = laplacian_pyramid(reference[:1].float())
fig, axes = plt.subplots(1, len(levels), figsize=(3 * len(levels), 3.3), squeeze=False, layout="constrained")
for ax, level in zip(axes[0], levels):
    if level is levels[-1]:
        shown = level[0] / 255
    else:  # band-pass: centre on grey and stretch to show the detail
        shown = (0.5 + level[0] / (2 * level.abs().max().clamp_min(1))).clamp(0, 1)
    ax.imshow(shown.permute(1, 2, 0).numpy())
    ax.set_title(f"{level.shape[-1]} px" + (" (rest)" if level is levels[-1] else " (detail)"))
    ax.axis("off")
fig.suptitle(f"Laplacian pyramid of a real image{title_note}")
save_figure(fig, "laplacian_pyramid")
plt.show()
""")

md(r"""
Now the Inception network for FID and KID. The feature extractor is shared by both metrics, and
the reference images are embedded once: `reset()` clears only the generated side. KID's random
subsets are drawn under a fixed seed, so its value is reproducible too.
""")

code(r"""
show_source(fid_kid_scores)
""")

code(r"""
try:
    inception = make_inception(config.fid_weights_path)
except RuntimeError as err:
    inception = None
    print(f"FID and KID are skipped: {err}\nSWD needs no weights and is still reported.")

fid_kid = None
if inception is not None:  # the reference images are embedded once, here
    fid_kid = make_fid_kid(inception, kid_subset_size=min(100, n))
    for metric in fid_kid:
        metric.to(device)
    add_real_images(*fid_kid, reference)


def score(images):
    # SWD (and FID, KID when available) of a set of n images against the reference set, on the device.
    return quality_metrics(reference.to(device), images.to(device), fid_kid)


start = time.perf_counter()
floor = score(held_out)
print(f"The floor, held-out real images against the reference ({n} images each), in {time.perf_counter() - start:.1f} s:")
print(pd.Series(floor).round(4).to_string())
""")

md(r"""
## 7. Samplers side by side

Every sampler below starts from the same noise: batch $b$ of every sampler comes from
`torch.Generator().manual_seed(seed + b)`, so the first grids show the same butterflies drawn
by different numerical methods. All of them reuse the trained model and its noise schedule
(`make_scheduler` builds each from the saved scheduler's config):

| sampler | diffusers class | what it does |
|---|---|---|
| `ddpm` | `DDPMScheduler` | the stochastic update of section 3, one step per training timestep |
| `ddim` | `DDIMScheduler` | the deterministic update of section 3, skipping timesteps |
| `dpm++` | `DPMSolverMultistepScheduler` | a 2nd-order solver of the same ODE as DDIM, reusing the previous step's prediction |
| `unipc` | `UniPCMultistepScheduler` | a predictor-corrector solver, also multistep |
| `euler` | `EulerDiscreteScheduler` | Euler's method on the ODE written in noise levels $\sigma$ (Karras et al. 2022) |

For each: a grid, the seconds per grid of `eval_batch_size` images, and the three metrics on `n`
images against the reference. The DDPM row should match the pipeline's grid of section 2 exactly:
same noise, same steps, same generator.
""")

code(r"""
show_source(generate_images)
""")

code(r"""
n_generate = max(n, config.eval_batch_size)
samplers = [["ddpm", ddpm_steps]] + [list(s) for s in fast_samplers]
rows, grids, scores = [], {}, {}
for name, steps in samplers:
    images, seconds = generate_images(unet, make_scheduler(name, scheduler), n_generate, steps, config.eval_batch_size, config.seed)
    grids[(name, steps)], scores[(name, steps)] = images[: config.eval_batch_size], score(images[:n])
    rows.append({"scheduler": name, "steps": steps, "seconds": seconds, **scores[(name, steps)]})
    print(f"{name:>6}, {steps:>4} steps: {seconds:6.2f} s per grid, SWD {rows[-1]['swd']:.1f}")
rows.append({"scheduler": "real (held-out)", "steps": None, "seconds": None, **floor})
table = pd.DataFrame(rows).astype({"steps": "Int64"})
table.to_csv(os.path.join(config.output_dir, "samplers.csv"), index=False, float_format="%.5g")
table.round(3)
""")

code(r"""
# NBVAL_CHECK_OUTPUT
ddpm_grid = (grids[("ddpm", ddpm_steps)] / 2 + 0.5).clamp(0, 1)
print("The DDPM grid equals the DDPMPipeline grid of section 2:", torch.equal(ddpm_grid, pipeline_images))
print("samplers.csv columns:", list(table.columns))
print(table[["scheduler", "steps"]].to_string(index=False))
""")

code(r"""
panels = [(f"{name}, {steps} steps\n{row.seconds:.1f} s/grid, SWD {row.swd:.1f}", grids[(name, steps)])
          for (name, steps), row in zip(samplers, table.itertuples())]
panels.append((f"real images (reference)\nSWD floor {floor['swd']:.1f}", reference[: config.eval_batch_size]))
cols = 4
fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4 * cols, 4.4 * -(-len(panels) // cols)), squeeze=False, layout="constrained")
for ax in axes.flat:
    ax.axis("off")
for ax, (label, images) in zip(axes.flat, panels):
    ax.imshow(make_grid(images))
    ax.set_title(label, fontsize=10)
fig.suptitle(f"Samplers on the same noise, seed {config.seed}{title_note}")
save_figure(fig, "samplers")
plt.show()
""")

md(r"""
How to read the table: `seconds` grows with the number of steps (one U-Net pass each), so DDPM
with 1000 steps costs 20 to 100 times more than the others. The question is what the extra
steps buy. Compare each row's SWD (and FID, KID) with the floor in the last row, and with each
other: differences smaller than the gap between repeated runs with another seed are noise. The
DDIM paper gives the pattern to expect, on CIFAR-10: FID 4.16 with 100 DDIM steps against 4.04
with 1000, and 3.17 for DDPM's 1000 stochastic steps; below that, fewer steps cost more and more.
DPM-Solver++ and UniPC were designed to give good samples in about 10 to 20 steps.

With a briefly trained model (the reduced CI run) the numbers mostly measure the model, not the
sampler. Such a model has not yet learned to remove the last, fine noise (small $t$), and the
samplers show it differently. DDPM adds fresh noise at every step, which hides the errors: its
images look smooth. The deterministic samplers add none and keep them; in our short CPU runs DDIM
(which clips $\hat x_0$ to $[-1, 1]$) left grey speckle, and DPM-Solver++, UniPC and Euler (which do
not clip) saturated colour noise. Train longer before judging the samplers.
""")

md(r"""
## 8. EMA against raw weights

During training, `train_loop` keeps an exponential moving average of the weights (as diffusers'
`train_unconditional.py`): after every optimizer step
$\theta_{\text{EMA}} \leftarrow d\,\theta_{\text{EMA}} + (1 - d)\,\theta$, with a decay
$d = \min\big(0.9999,\ 1 - (1 + \text{step}/\gamma)^{-p}\big)$ that starts small and approaches
0.9999 ($\gamma = 1$, $p = 3/4$). The average smooths out the noise of the last updates, and
samples from it are usually cleaner. The pipeline was saved with the EMA weights; `unet_raw/`
holds the weights the optimizer actually reached. Both sample from the same noise here, with
`eval_sampler` and `eval_inference_steps`. After a short run the two are nearly the same (the
decay is still small); the difference shows late in a long run, when single updates are noisy
and the average is not.
""")

code(r"""
raw_folder = os.path.join(config.output_dir, "unet_raw")
if not os.path.isdir(raw_folder):
    print(f"No {raw_folder!r}: the model was trained with use_ema=False (then unet/ holds the raw weights "
          "and there is nothing to compare) or by an older helpers.py. Retrain in 05_training to compare.")
else:
    raw_unet = UNet2DModel.from_pretrained(config.output_dir, subfolder="unet_raw").to(device).eval()
    key = (config.eval_sampler, config.eval_inference_steps)
    ema_rows, ema_grids = [], {}
    for weights, model in (("EMA", unet), ("raw", raw_unet)):
        if weights == "EMA" and key in grids:  # section 7 already sampled the EMA weights this way
            ema_grids[weights], metrics = grids[key], scores[key]
        else:
            images, _ = generate_images(model, eval_scheduler, n_generate, config.eval_inference_steps, config.eval_batch_size, config.seed)
            ema_grids[weights], metrics = images[: config.eval_batch_size], score(images[:n])
        ema_rows.append({"weights": weights, **metrics})
    print("Largest weight difference, EMA against raw:",
          max((a - b).abs().max().item() for a, b in zip(unet.parameters(), raw_unet.parameters())))
    display(pd.DataFrame(ema_rows + [{"weights": "real (held-out)", **floor}]).round(3))

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), layout="constrained")
    for ax, row in zip(axes, ema_rows):
        ax.imshow(make_grid(ema_grids[row["weights"]]))
        ax.set_title(f"{row['weights']} weights: SWD {row['swd']:.1f}")
        ax.axis("off")
    fig.suptitle(f"EMA against raw weights, {config.eval_sampler} {config.eval_inference_steps} steps, same noise{title_note}")
    save_figure(fig, "ema_vs_raw")
    plt.show()
""")

md(r"""
## 9. What you saw, and the CSV

- `DDPMPipeline.from_pretrained(output_dir)` rebuilds the trained pipeline from its folder; the
  course's `sample` is the same loop, open to every scheduler.
- A step of DDPM or DDIM is one U-Net pass plus the update of section 3; the samplers differ
  only in how they use the model's noise predictions, so they can be swapped after training.
- Fewer steps are much faster; the metrics, read against the real-against-real floor, tell what
  quality that costs.
- The same seed gives the same images, which makes all of these comparisons possible.

The comparison table is saved as `output_dir/samplers.csv`, one row per sampler (plus the floor),
with the columns `scheduler, steps, seconds` and one per metric (`swd`, its value at each pyramid
level, and `fid`, `kid`, `kid_std` when the Inception weights were available):
""")

code(r"""
print(open(os.path.join(config.output_dir, "samplers.csv")).read())
""")

notebook = new_notebook(cells=cells)
notebook.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
notebook.metadata["language_info"] = {"name": "python"}
path = Path(__file__).with_name("06_sampling.ipynb")
nbformat.write(notebook, path)
print(f"wrote {path}")
