"""Build notebooks 01-04 of the course (no outputs). Run: .venv/bin/python notebooks/_build_01_04.py"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''# Setup: on Colab, fetch the course and install its requirements; elsewhere this does nothing.
import os, sys
if "google.colab" in sys.modules:
    if not os.path.exists("/content/diffusion-course"):
        !git clone -q --depth 1 https://github.com/COURSE_OWNER/diffusion-course.git /content/diffusion-course
        %pip install -q -r /content/diffusion-course/requirements.txt
    %cd /content/diffusion-course/notebooks
sys.path.insert(0, os.path.abspath(".."))  # helpers.py lives one folder up'''


def badge(name):
    return (
        "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
        f"(https://colab.research.google.com/github/COURSE_OWNER/diffusion-course/blob/main/notebooks/{name}.ipynb)"
    )


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text, tags=None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    return cell


def write(name, cells):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for index, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{index:02d}"  # stable ids: rebuilding changes nothing that did not change
        if cell.cell_type == "code":
            cell.execution_count = None
            cell.outputs = []
    nbformat.validate(nb)
    nbformat.write(nb, os.path.join(HERE, f"{name}.ipynb"))
    print("wrote", name)


SAVE_NOTE = '''`figures_dir` and `figure_label` only matter when the course's own figures are regenerated:
with `figures_dir` set, the key figures are also saved there as PNG files, each with a small
footer (`figure_label`, or the dataset and image size) saying what data made it.'''

# ============================================================================ 01


def nb01():
    return [
        md(f"""
# 01 · What we build, and the training configuration

{badge("01_config")}

This course trains a diffusion model **from scratch** to generate pictures of butterflies. It is
rebuilt, step by step, from the 🤗 Diffusers tutorial
[*Train a diffusion model*](https://huggingface.co/docs/diffusers/tutorials/basic_training), with the
same model and the tutorial's names (`TrainingConfig`, `train_dataloader`, `noise_scheduler`,
`train_loop`, `evaluate`), made fast, resumable and testable.

What you will learn: what a diffusion model does, and `TrainingConfig`, the one object that holds
every hyper-parameter of a run: what each field controls, why some defaults differ from the tutorial,
and how `check_config` catches a bad setting before any training starts.
"""),
        code(SETUP),
        code('''
# Parameters: the tutorial's full-size values (papermill may override them).
# Data
dataset_name = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id, or a local folder of images
image_size = 128  # the generated image resolution, in pixels per side

# Batches, epochs and the optimizer
train_batch_size = 16  # images per training step on each process
eval_batch_size = 16  # images in each evaluation grid
num_epochs = 50  # passes over the dataset
gradient_accumulation_steps = 1  # batches summed before each optimizer step
learning_rate = 1e-4  # AdamW's peak learning rate
lr_warmup_steps = 500  # optimizer steps of linear warm-up

# Saving
save_image_epochs = 10  # sample an evaluation grid every N epochs
save_model_epochs = 30  # save the pipeline every N epochs
output_dir = "ddpm-butterflies-128"  # where the run is saved (and its name on the Hub)

# Precision and randomness
mixed_precision = "auto"  # "auto", "no", "fp16" or "bf16" (the tutorial: "fp16")
seed = 0  # seeds everything random in a run

# The model (the tutorial's UNet2DModel)
block_out_channels = (128, 128, 256, 256, 512, 512)  # channels of each U-Net level
layers_per_block = 2  # ResNet layers in each U-Net block
''', tags=["parameters"]),
        md(r"""
## What we are building

**Unconditional image generation**: the model receives no prompt and no label. After training on a
folder of butterfly photos it produces *new* butterflies that look as if they came from the same
collection.

A **diffusion model** learns to undo noise.

* The **forward process** is fixed, with nothing to learn: take a training image $x_0$ and add a little
  Gaussian noise at each of $T = 1000$ steps, until $x_T$ is indistinguishable from pure noise.
  Notebook 04 writes it as a formula and computes it with `DDPMScheduler.add_noise`.
* The **reverse process** is learned: a neural network (a U-Net, notebook 03) is shown a noisy image
  $x_t$ and its step $t$ and predicts the noise in it. Removing a little of the predicted noise, step
  after step, turns fresh random noise into a new image (notebook 06).

Training (notebook 05) repeats one simple exercise: take a real image, noise it to a random step $t$,
ask the network which noise was added, and penalise the error.

| notebook | what it builds |
|---|---|
| 01_config | `TrainingConfig`: the hyper-parameters (this notebook) |
| 02_dataset | the butterflies, preprocessed once into a tensor cache, and the `DataLoader` |
| 03_model | the U-Net, `UNet2DModel` |
| 04_scheduler | the noise schedule, the forward process and the training target |
| 05_training | `train_loop` with 🤗 Accelerate: mixed precision, checkpoints, EMA |
| 06_sampling | generating butterflies, and faster samplers |

Every notebook stands on its own: it imports what it needs from `helpers.py` and builds its own
`config`, so you can open any of them first (06 needs the model that 05 saves).
"""),
        code('''
import dataclasses
import tempfile

from helpers import TrainingConfig, check_config, check_output_dir, resolve_mixed_precision, show_source
'''),
        md("""
## `TrainingConfig`

The tutorial gathers its hyper-parameters in a `TrainingConfig` dataclass; the course does the same
in `helpers.py`. Here is its source: the tutorial's fields first, with their full-run values, then the
fields the course adds for the model, the noise, checkpoints and the EMA.
"""),
        code("show_source(TrainingConfig)"),
        md("""
Build this run's configuration from the parameters cell. Any field not passed keeps the default above.
"""),
        code('''
config = TrainingConfig(
    dataset_name=dataset_name,
    image_size=image_size,
    train_batch_size=train_batch_size,
    eval_batch_size=eval_batch_size,
    num_epochs=num_epochs,
    gradient_accumulation_steps=gradient_accumulation_steps,
    learning_rate=learning_rate,
    lr_warmup_steps=lr_warmup_steps,
    save_image_epochs=save_image_epochs,
    save_model_epochs=save_model_epochs,
    output_dir=output_dir,
    mixed_precision=mixed_precision,
    seed=seed,
    block_out_channels=block_out_channels,
    layers_per_block=layers_per_block,
)
for name, value in dataclasses.asdict(config).items():
    print(f"{name:28} {value!r}")
'''),
        md(r"""
## What each field does

### 1 · Data, model and optimiser
* **`dataset_name`**: a 🤗 Hub dataset id (the tutorial's `huggan/smithsonian_butterflies_subset`,
  1,000 museum photos) or a local folder of images: your own pictures, or any data on a machine with
  no network (notebook 02).
* **`image_size`**: every image is resized and cropped to `image_size × image_size`, and the model
  generates images of exactly that size. A step's cost grows with the pixels: 128 px is 4× the work
  of 64 px. The U-Net halves the image once per level after the first, so `image_size` must be
  divisible by $2^{\text{levels}-1}$ (32 for the tutorial's 6 levels).
* **`block_out_channels`**: the channels of each U-Net level, multiples of 32; its length is the
  number of levels. **`layers_per_block`**: ResNet layers in each level. **`down_block_types`**,
  **`up_block_types`**: the block of each level; left as `None` they are derived from
  `block_out_channels` as the tutorial writes them out (notebook 03).
* **`num_train_timesteps`**: $T$, the number of noising steps of the forward process (notebook 04).
* **`train_batch_size`**: images per training step, on each process. With $N$ GPUs one optimizer
  step sees `train_batch_size` × $N$ × `gradient_accumulation_steps` images.
* **`num_epochs`**: passes over the dataset. 1,000 images in full batches of 16 make 62 steps per
  epoch (notebook 02), so the tutorial's 50 epochs are about 3,100 optimizer steps.
  **`max_train_steps`**: stop earlier, after this many optimizer steps.
* **`gradient_accumulation_steps`**: sum the gradients of this many batches before each optimizer
  step: a larger batch behind each step at no extra memory, and that many times fewer steps.
* **`learning_rate`**, **`lr_warmup_steps`**: AdamW's peak learning rate, $10^{-4}$, reached by a
  linear rise from 0 over the first `lr_warmup_steps` optimizer steps (early on, Adam's running
  statistics are noisy and full-size steps can throw a freshly initialised network off course), then
  decayed along a cosine to 0 at the last step. Both are counted in optimizer steps of one process,
  so they keep their meaning when `gradient_accumulation_steps` changes; with $N$ processes
  🤗 Accelerate advances the schedule $N$ times per step, so the warm-up covers the same number of
  images.
* **`max_grad_norm`**: gradients whose norm exceeds this are scaled down (the tutorial hard-codes 1.0).
"""),
        md("""
### 2 · Saving, precision and the Hub
* **`output_dir`**: the folder a run writes to: samples, checkpoints, TensorBoard logs and the final
  pipeline.
* **`save_image_epochs`**: every this many epochs, and after the last, sample a grid of
  **`eval_batch_size`** images (16 make a 4×4 grid; no effect on training) into
  `output_dir/samples/<epoch>.png`: the way to watch the model improve.
* **`eval_sampler`**, **`eval_inference_steps`**: the sampler that draws those grids, and its number of
  steps. Only `"ddpm"`, `"ddim"` and `"dpm++"` can drive them (departure 5 below).
* **`save_model_epochs`**: every this many epochs, and after the last, save the pipeline (U-Net
  weights and scheduler settings) in `output_dir`, ready for `DDPMPipeline.from_pretrained`.
* **`logging_steps`**: read the loss back from the GPU only every this many steps; each read makes
  the CPU wait for the GPU.
* **`mixed_precision`**: `"no"` computes in float32; `"fp16"` and `"bf16"` run most of the model in
  16-bit floats on a GPU: about twice as fast, half the activation memory. The default `"auto"` picks
  for the machine (departure 2).
* **`seed`**: seeds everything random in a run: the initial weights, the data order, the noise and
  timesteps of each step, and the noise behind each evaluation grid. The same seed gives the same run.
* **`push_to_hub`**: upload the saved pipeline to the 🤗 Hub after each save, to **`hub_model_id`**,
  `"<your-username>/<repo>"` (None: the name of `output_dir`), created private if
  **`hub_private_repo`** is set (departure 3).
* **`overwrite_output_dir`**: what to do when `output_dir` already holds a trained run (departure 4).
"""),
        md(r"""
### 3 · Checkpoints, EMA and metrics
* **`checkpointing_steps`**: every this many optimizer steps, save everything needed to continue
  (weights, optimizer, learning-rate schedule, EMA, random states) in `output_dir/checkpoint-<step>`.
  **`checkpoints_total_limit`**: keep only the newest this many (each is several times the model's
  size). **`resume_from_checkpoint`**: `"latest"`, or a checkpoint folder, continues an interrupted
  run where it stopped.
* **`fid_weights_path`**: a local copy of the Inception network that the FID and KID quality scores
  need, for machines that cannot download it (notebook 06).
* **`use_ema`**: keep an exponential moving average (EMA) of the weights, and sample and save with it:
  single steps make the weights jitter, and their average generates cleaner images. After each
  optimizer step $s$,
  $\theta_{\text{EMA}} \leftarrow d_s\,\theta_{\text{EMA}} + (1 - d_s)\,\theta$ with
  $d_s = \min\left(d_{\max},\; 1 - (1 + s / \gamma)^{-p}\right)$, where $d_{\max}$ is **`ema_max_decay`**,
  $\gamma$ is **`ema_inv_gamma`** and $p$ is **`ema_power`** (defaults 0.9999, 1.0 and 0.75, from
  diffusers' `train_unconditional.py`). The average remembers about the last $1/(1-d_s)$ steps: a
  short memory early on, when the weights change fast, growing later:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
for step in (10, 100, 1_000, 3_100, 100_000):
    decay = min(config.ema_max_decay, 1 - (1 + step / config.ema_inv_gamma) ** -config.ema_power)
    print(f"step {step:>7,}: decay {decay:.4f}, averages over about {1 / (1 - decay):,.0f} steps")
'''),
        md("""
## Departures from the tutorial

### 1. An annotated dataclass
The tutorial writes its fields without type annotations (`image_size = 128`). `@dataclass` only
turns *annotated* names into fields, so the tutorial's class has no fields at all: its values are
plain class attributes, and `TrainingConfig(image_size=64)` fails. Here is the tutorial's pattern:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
@dataclasses.dataclass
class TutorialConfig:  # the tutorial's pattern: no annotations
    image_size = 128
    train_batch_size = 16


print("fields:", [f.name for f in dataclasses.fields(TutorialConfig)])
try:
    TutorialConfig(image_size=64)
except TypeError as err:
    print("TypeError:", err)
'''),
        md("""
Every field of the course's `TrainingConfig` is annotated (`image_size: int = 128`), so any of them
can be set when the config is built, and the parameters cell above works:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
print(TrainingConfig(image_size=64).image_size)
print(len(dataclasses.fields(TrainingConfig)), "fields")
'''),
        md("""
### 2. `mixed_precision="auto"`
The tutorial sets `"fp16"`, which needs a GPU. `"auto"` chooses bf16 on GPUs that support it (no loss
scaling needed, no overflow), fp16 on older GPUs, and plain float32 on a CPU:
"""),
        code('''
show_source(resolve_mixed_precision)
print("on this machine 'auto' means:", repr(resolve_mixed_precision(config.mixed_precision)))
'''),
        md("""
### 3. `push_to_hub=False` by default
The tutorial uploads to the Hub by default, which fails for anyone not logged in (and in its code,
with `push_to_hub=True` the pipeline is never saved locally: diffusers issue #3705). The course
always saves locally and uploads only when asked. To upload, log in once with a token that has
*write* access, then set `push_to_hub=True` and `hub_model_id="<your-username>/<repo>"`:

```python
from huggingface_hub import notebook_login

notebook_login()  # or `hf auth login` in a terminal
```

If the upload fails, training goes on and the model stays in `output_dir`.

### 4. `overwrite_output_dir=False` by default
The tutorial sets `overwrite_output_dir = True` but never reads it: re-running its notebook silently
writes over the last model. The course refuses to start a *new* run in a folder that already holds a
trained model or checkpoints, and says what to do: continue with `resume_from_checkpoint="latest"`,
start over with `overwrite_output_dir=True` (which deletes the old run), or pick another `output_dir`.
`train_loop` runs this check before any work. Here it is on a throw-away folder that looks like a
finished run:
"""),
        code('''
show_source(check_output_dir)
with tempfile.TemporaryDirectory() as folder:
    open(os.path.join(folder, "model_index.json"), "w").close()  # a saved pipeline's marker file
    try:
        check_output_dir(dataclasses.replace(config, output_dir=folder))
    except FileExistsError as err:
        print("FileExistsError:", err)
'''),
        md("""
### 5. The evaluation sampler
The tutorial's `evaluate` samples with `DDPMPipeline` and the DDPM scheduler: 1,000 network calls per
grid (81–83 s per evaluation in the tutorial's Colab). The course's `evaluate` still uses
`DDPMPipeline`, but with DPM-Solver++ in `eval_inference_steps=20` steps, from the same trained model
and noise schedule (`eval_sampler="ddpm"` with 1000 steps gives the tutorial's behaviour). Only
`"ddpm"`, `"ddim"` and `"dpm++"` can drive `DDPMPipeline`: it passes a `generator` to the scheduler's
`step`, which UniPC's `step` does not accept, and it never calls `scale_model_input`, which Euler
needs. `check_config` rejects the others (below); notebook 06 compares more samplers with the course's
own sampling loop.

### 6. The seed seeds everything
In the tutorial `seed` only seeds the evaluation, and it does so with `torch.manual_seed`, which
resets the global random state and makes the data order repeat after each evaluation (diffusers
#7991). The course seeds the whole run once and gives evaluation its own generators.

## `check_config`: catching a bad setting before training
`make_model` and `train_loop` call `check_config` first. Each error names the field and the fix:
"""),
        code("show_source(check_config)"),
        code('''
check_config(config)  # raises if something is wrong
print("this run's config is fine")
'''),
        code('''
# NBVAL_CHECK_OUTPUT
for bad in (
    dataclasses.replace(config, image_size=config.image_size + 1),  # not divisible by 2**(levels - 1)
    dataclasses.replace(config, mixed_precision="fp32"),  # not a valid choice
    dataclasses.replace(config, eval_sampler="euler"),  # DDPMPipeline cannot drive it
):
    try:
        check_config(bad)
    except ValueError as err:
        print("ValueError:", err)
'''),
        md("""
## This run's configuration at a glance
"""),
        code('''
# NBVAL_CHECK_OUTPUT
print("image_size:        ", config.image_size)
print("train_batch_size:  ", config.train_batch_size)
print("block_out_channels:", config.block_out_channels)
print("down_block_types:  ", config.down_block_types)
print("up_block_types:    ", config.up_block_types)
print("seed:              ", config.seed)
'''),
        md("""
**Next:** [02_dataset](02_dataset.ipynb) loads the butterflies and turns them into training batches.
"""),
    ]


# ============================================================================ 02


def nb02():
    return [
        md(f"""
# 02 · The dataset: loading and preprocessing

{badge("02_dataset")}

What you will learn: how to load the Smithsonian butterflies with 🤗 Datasets (or a folder of your
own images, with no network), what the raw photos look like, and how the course prepares them for
training. The tutorial decodes, resizes, flips and normalises every image again in every epoch; the
course decodes and resizes each image **once** into a compact `uint8` tensor cache, and does the cheap
random flip and the scaling to $[-1, 1]$ on the GPU, batch by batch. You will also see why the course
crops instead of squashing, and check the batches the training loop will receive.
"""),
        code(SETUP),
        code('''
# Parameters: the tutorial's full-size values (papermill may override them).
# Data
dataset_name = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id, or a local folder of images
image_size = 128  # the training image resolution, in pixels per side
train_batch_size = 16  # images per training batch
seed = 0  # seeds the data order and the random flips

# Figures (for regenerating the course's images; None: do not save)
figures_dir = None  # a folder to save the key figures in as PNG
figure_label = ""  # footer text on saved figures ("": the dataset and image size)
''', tags=["parameters"]),
        code('''
import datasets
import matplotlib.pyplot as plt
import torch
from torchvision import transforms

from helpers import (TrainingConfig, augment_batch, hub_error_message, image_to_rgb, images_to_tensor,
                     load_image_dataset, make_dataloader, make_decode_transform, show_source, to_pil_images)

datasets.disable_progress_bars()  # keep the notebook's output short

config = TrainingConfig(
    dataset_name=dataset_name, image_size=image_size, train_batch_size=train_batch_size, seed=seed
)
label = figure_label or f"{config.dataset_name}, image_size {config.image_size}"
'''),
        md(SAVE_NOTE),
        md("""
## Loading the dataset

The tutorial loads the butterflies with `load_dataset(config.dataset_name, split="train")`. The
course's `load_image_dataset` does the same for a Hub id. For a local folder it uses 🤗 Datasets'
`imagefolder` loader, as the tutorial's tip suggests, and it turns the library's many error types into
messages that say what to do.
"""),
        code("show_source(load_image_dataset)"),
        md("""
**Your own images.** Put your pictures (`.jpg`, `.png`, ...; any sizes, subfolders allowed) in a
folder and set `dataset_name` to its path, e.g. `TrainingConfig(dataset_name="my_images")`. A few
hundred images of one kind of subject is enough to see the model learn.

**No network.** A Hub id needs the Hub. With no connection `load_dataset` retries for a while and
then fails with a `ConnectionError`; `load_image_dataset` turns it into this message (built here
without touching the network):
"""),
        code('''
print(hub_error_message(
    "huggan/smithsonian_butterflies_subset",
    ConnectionError("Couldn't reach 'huggan/smithsonian_butterflies_subset' on the Hub (ConnectionError)"),
))
'''),
        code('''
dataset = load_image_dataset(config.dataset_name)
dataset
'''),
        md("""
## The raw images

🤗 Datasets decodes each image into a `PIL.Image` when it is read. The photos come in different sizes
and shapes, and some files may be grayscale, palette or transparent PNGs; `image_to_rgb` turns any
of them into 8-bit RGB (transparent pixels become white), for display here and for training later.
"""),
        code('''
raw_images = dataset[:4]["image"]
for image in raw_images:
    print(f"{image.width} × {image.height} pixels, mode {image.mode}")

fig, axs = plt.subplots(1, 4, figsize=(16, 4), layout="compressed")
for ax, image in zip(axs, raw_images):
    ax.imshow(image_to_rgb(image))
    ax.set_title(f"{image.width} × {image.height}")
    ax.set_axis_off()
fig.supxlabel(label, fontsize=9, color="gray")  # what made the figure
if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
    fig.savefig(os.path.join(figures_dir, "02_raw_images.png"), dpi=100, bbox_inches="tight")
plt.show()
'''),
        md(r"""
## Preprocessing: the tutorial's way

The network needs every image at the same size, as numbers in $[-1, 1]$. The tutorial's `preprocess`:

* `Resize((s, s))` makes each image `config.image_size` pixels square,
* `RandomHorizontalFlip()` mirrors half of them at random (more variety from the same photos),
* `ToTensor()` turns the pixels into floats in $[0, 1]$,
* `Normalize([0.5], [0.5])` computes $(x - 0.5) / 0.5$, mapping $[0, 1]$ to $[-1, 1]$.

It is applied with `dataset.set_transform`, i.e. again every time an image is read: every epoch
re-decodes every JPEG and resizes it. For a large photo that is several milliseconds of CPU work per
image, often longer than the GPU needs to train on it.
"""),
        code('''
preprocess = transforms.Compose(  # the tutorial's preprocessing, for comparison
    [
        transforms.Resize((config.image_size, config.image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ]
)
'''),
        md("""
## Preprocessing: the course's way

The course splits `preprocess` in two.

1. **Once, before training** (`images_to_tensor`): decode each image, resize its *shorter* side to
   `image_size` and cut out the centre square (`make_decode_transform`), and keep the result as
   `uint8` numbers in one tensor, the *cache*. A photo is decoded once per run instead of once per epoch.
2. **Every step, on the device** (`augment_batch`, below): the random flip and the scaling to
   $[-1, 1]$, which are cheap tensor operations on the whole batch.

Why shorter side + centre crop? The tutorial's `Resize((s, s))` forces every photo into a square: a
photo twice as wide as it is tall gets squashed to half its width, and the model learns (and later
draws) squashed butterflies. Resizing the shorter side keeps the proportions; the crop loses a strip
at the edges of wide photos instead.

Two smaller departures make the one-off decoding fast and sharp:

* **JPEG draft decoding.** Before decoding a JPEG, `images_to_tensor` calls
  `image.draft("RGB", (s, s))`: the decoder then produces the picture directly at 1/2, 1/4 or 1/8 of
  its size, the smallest of these that still has at least `image_size` pixels on each side. A large
  photo decodes several times faster, and the resize below still has at least `image_size` pixels
  per side to work from.
* **Bicubic, antialiased resizing.** `make_decode_transform` resizes with bicubic interpolation and
  `antialias=True`, where the tutorial's `Resize` uses torchvision's default, bilinear. Bicubic keeps
  edges such as wing veins a little sharper when shrinking; antialiasing averages over all the source
  pixels, so fine patterns do not turn into moiré.
"""),
        code('''
show_source(make_decode_transform)
show_source(images_to_tensor)
'''),
        code('''
images = images_to_tensor(dataset, config.image_size)  # decode and resize every image once
'''),
        md("""
The same four photos, squashed by the tutorial's `Resize((s, s))` (top) and from the course's cache
(bottom):
"""),
        code('''
squash = transforms.Resize((config.image_size, config.image_size))
fig, axs = plt.subplots(2, 4, figsize=(10, 5.4), layout="compressed")
for i, image in enumerate(raw_images):
    axs[0, i].imshow(squash(image_to_rgb(image)))
    axs[1, i].imshow(images[i].permute(1, 2, 0).numpy())  # C×H×W -> H×W×C for matplotlib
for ax in axs.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axs[0, 0].set_ylabel("tutorial: Resize((s, s))")
axs[1, 0].set_ylabel("course: shorter side + crop")
fig.supxlabel(label, fontsize=9, color="gray")  # what made the figure
if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
    fig.savefig(os.path.join(figures_dir, "02_preprocessed.png"), dpi=100, bbox_inches="tight")
plt.show()
'''),
        md("""
The cache holds one byte per pixel and colour, a quarter of the memory of float32: the tutorial's
1,000 butterflies at 128 px take 1000 × 3 × 128 × 128 bytes, about 49.2 MB, so the whole dataset
stays in memory for the run.
"""),
        code('''
# NBVAL_CHECK_OUTPUT
print("cache:", tuple(images.shape), images.dtype)
print(f"memory: {images.numel() * images.element_size() / 1e6:.1f} MB as uint8, "
      f"{images.numel() * 4 / 1e6:.1f} MB if it were float32")
'''),
        md(r"""
## Augmentation and scaling, on the device

`augment_batch` maps each stored byte $u \in \lbrace 0, \dots, 255\rbrace$ to $x = u / 127.5 - 1 \in [-1, 1]$:
exactly what `ToTensor` ($u / 255$) followed by `Normalize([0.5], [0.5])` computes, since
$(u/255 - 0.5)/0.5 = u/127.5 - 1$. Then it mirrors each image with probability ½, drawing anew at
every step, so over the epochs the model sees every butterfly both ways round.
"""),
        code("show_source(augment_batch)"),
        code('''
# NBVAL_CHECK_OUTPUT
tutorial_scaling = transforms.Normalize([0.5], [0.5])(images[0].float() / 255)  # ToTensor + Normalize
course_scaling = images[0].float() / 127.5 - 1  # what augment_batch computes
print("the same numbers:", torch.allclose(tutorial_scaling, course_scaling, atol=1e-6))
'''),
        md("""
## Batches: `make_dataloader`

The tutorial wraps the dataset in a `DataLoader(dataset, batch_size=..., shuffle=True)`. The course's
`DataLoader` reads from the cache: each batch is a single `uint8` tensor, shuffled with a generator
seeded by `config.seed`.

It also sets `drop_last=True`, which drops the last, smaller batch of each epoch: 1,000 images in
batches of 16 give **62** full batches per epoch, where the tutorial's `DataLoader` gives 63, the last
with only 8 images. Every batch is then the same size, so every step has the same tensor shapes:
the GPU libraries reuse the kernels they picked for that shape, and a model sped up with
`torch.compile` is compiled once instead of again for the odd last batch. Every gradient also
averages the same number of images. The shuffle differs from epoch to epoch, so the 8 images left out
change too.
"""),
        code("show_source(make_dataloader)"),
        code('''
train_dataloader = make_dataloader(images, config)
(uint8_images,) = next(iter(train_dataloader))  # what the training loop receives
torch.manual_seed(config.seed)  # augment_batch draws its flips from torch's global generator
clean_images = augment_batch(uint8_images)  # in train_loop this runs on the GPU
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print(len(train_dataloader), "batches per epoch of", config.train_batch_size, "images")
print("batch from the DataLoader:", tuple(uint8_images.shape), uint8_images.dtype)
print("after augment_batch:      ", tuple(clean_images.shape), clean_images.dtype)
print(f"value range: {clean_images.min().item():.3f} to {clean_images.max().item():.3f}")
'''),
        md("""
One batch, as the model will see it (`to_pil_images` maps $[-1, 1]$ back to pixels):
"""),
        code('''
shown = to_pil_images(clean_images[:8])
fig, axs = plt.subplots(1, len(shown), figsize=(2 * len(shown), 2.2), layout="compressed")
for ax, image in zip(axs, shown):
    ax.imshow(image)
    ax.set_axis_off()
plt.show()
'''),
        md("""
**Next:** [03_model](03_model.ipynb) builds the U-Net that will learn to denoise these images.
"""),
    ]


# ============================================================================ 03


def nb03():
    return [
        md(f"""
# 03 · The model: a U-Net

{badge("03_model")}

What you will learn: how the tutorial's `UNet2DModel` is put together: its levels, the resolution
each works at, where it uses self-attention and why only there, how the course derives the block types
from `block_out_channels`, how many parameters it has, and how one parameter makes it smaller. You will
check, as the tutorial does, that an image goes in and a tensor of the same shape comes out.
"""),
        code(SETUP),
        code('''
# Parameters: the tutorial's full-size values (papermill may override them).
# Data
dataset_name = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id, or a local folder of images
image_size = 128  # the image resolution, in pixels per side

# The model (the tutorial's UNet2DModel)
block_out_channels = (128, 128, 256, 256, 512, 512)  # channels of each U-Net level
layers_per_block = 2  # ResNet layers in each U-Net block
seed = 0  # seeds the initial weights
''', tags=["parameters"]),
        code('''
import datasets
import torch

from helpers import (TrainingConfig, augment_batch, count_parameters, default_down_block_types,
                     images_to_tensor, load_image_dataset, make_model, show_source)

datasets.disable_progress_bars()  # keep the notebook's output short

config = TrainingConfig(
    dataset_name=dataset_name,
    image_size=image_size,
    block_out_channels=block_out_channels,
    layers_per_block=layers_per_block,
    seed=seed,
)
'''),
        md(r"""
## What the network does

The network $\varepsilon_\theta(x_t, t)$ receives a noisy image $x_t$ and its timestep $t$, and
returns a tensor of the **same shape**: its estimate of the noise in $x_t$ (notebook 04 explains why
the noise). A **U-Net** suits this image-in, image-out task:

* the **down** path works at full resolution first, then halves the height and width at each level
  while adding channels, so deeper levels see larger parts of the image in less detail;
* the **middle** block works at the smallest resolution;
* the **up** path mirrors the down path back to full resolution, and **skip connections** hand each
  down level's features to the up level of the same resolution, so fine detail is not lost on the way.

The timestep $t$ is turned into a vector (a sinusoidal embedding, then a small MLP) and added inside
every ResNet block, so each layer knows how noisy its input is.

The course builds the tutorial's model with `make_model`, sized by the config:
"""),
        code("show_source(make_model)"),
        md("""
## Block types follow from `block_out_channels`

The tutorial spells out six down blocks and six up blocks by hand. The course derives them from the
number of levels with the tutorial's rule (plain ResNet blocks, self-attention in the second-deepest
level; the up path mirrors the down path), so changing `block_out_channels` alone gives a consistent
model:
"""),
        code("show_source(default_down_block_types)"),
        code('''
# NBVAL_CHECK_OUTPUT
tutorial_down = ("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
tutorial_up = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")
print("6 levels give the tutorial's down blocks:", default_down_block_types(6) == tutorial_down)
print("and its up blocks:", TrainingConfig().up_block_types == tutorial_up)
print("this config:", config.down_block_types)
print("            ", config.up_block_types)
'''),
        md(r"""
## Levels and resolutions

Level $i$ works at `image_size` $/ 2^i$ pixels per side: every level but the last ends by halving
the resolution. For the tutorial's model at 128 px that is 128, 64, 32, 16, 8 and 4.

**Attention** lets every position of a feature map look at every other, e.g. to match one wing to the
other. Its cost grows with the *square* of the number of positions: at 128×128 that would be
$16384^2 \approx 2.7 \times 10^8$ pairs per image, at 8×8 only $64^2 = 4096$. So the tutorial uses it
only at the second-deepest level (8×8 at 128 px) and, in `UNet2DModel`'s middle block, at the
deepest one. This run's model:
"""),
        code('''
torch.manual_seed(config.seed)  # the same initial weights every time
model = make_model(config)
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print(f"{'level':>5}  {'channels':>8}  {'resolution':>10}  {'down block':16}  attention")
for level, block in enumerate(model.down_blocks):
    side = config.image_size // 2**level
    attention = "yes" if hasattr(block, "attentions") else "no"
    channels = config.block_out_channels[level]
    print(f"{level:>5}  {channels:>8}  {f'{side}×{side}':>10}  {type(block).__name__:16}  {attention}")
side = config.image_size // 2 ** (len(config.block_out_channels) - 1)
attention = "yes" if model.mid_block.attentions[0] is not None else "no"
print(f"{'mid':>5}  {config.block_out_channels[-1]:>8}  {f'{side}×{side}':>10}  {type(model.mid_block).__name__:16}  {attention}")
'''),
        md("""
## How big is it?

The tutorial's full model (the defaults of the parameters cell: six levels from 128 to 512 channels,
two ResNet layers each, 128 px) has **113,673,219** parameters: about 434 MiB of float32 weights,
and several times that during training (gradients and AdamW's two running averages). This run's model:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
num_parameters = count_parameters(model)
print(f"{num_parameters:,} parameters, {num_parameters * 4 / 2**20:,.1f} MiB of float32 weights")
'''),
        md("""
## Does an image go in and the same shape come out?

As in the tutorial, pass one real, preprocessed image through the untrained model, with `timestep=0`.
The image comes from the dataset, preprocessed the course's way (notebook 02): decoded and cropped by
`images_to_tensor`, scaled to $[-1, 1]$ by `augment_batch`.
"""),
        code('''
dataset = load_image_dataset(config.dataset_name)
sample_image = augment_batch(images_to_tensor(dataset.select(range(1)), config.image_size))
with torch.no_grad():  # no training here: skip the bookkeeping for gradients
    output = model(sample_image, timestep=0).sample
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print("Input shape:", sample_image.shape)
print("Output shape:", output.shape)
'''),
        md("""
## A smaller model is one parameter away

The convolutions' weights grow with the product of their input and output channels, so halving every
entry of `block_out_channels` makes the model about four times smaller and faster, with everything else
(block types, image size) unchanged. Here is the tutorial's model at half width:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
half_width = TrainingConfig(block_out_channels=(64, 64, 128, 128, 256, 256))
print(f"{count_parameters(make_model(half_width)):,} parameters at half width (the tutorial's: 113,673,219)")
'''),
        md("""
Fewer levels (e.g. `block_out_channels=(64, 128, 128, 256)`), `layers_per_block=1` and a smaller
`image_size` shrink it further: that is how this course runs on a CPU and in its tests.

Every channel count must be a multiple of 32: the blocks normalise their channels with `GroupNorm`
in 32 groups, which must divide the channels evenly. `make_model` checks the config first
(`check_config`, notebook 01) and stops with an error that says so, before building anything:
"""),
        code('''
# NBVAL_CHECK_OUTPUT
try:
    make_model(TrainingConfig(block_out_channels=(48, 96)))
except ValueError as err:
    print("ValueError:", err)
'''),
        md("""
**Next:** [04_scheduler](04_scheduler.ipynb): how the training images are noised, and what the model
learns to predict.
"""),
    ]


# ============================================================================ 04


def nb04():
    return [
        md(f"""
# 04 · The noise scheduler: the forward process and the training target

{badge("04_scheduler")}

What you will learn: what `DDPMScheduler` computes during training. You will write the forward
(noising) process as a formula, check it against `noise_scheduler.add_noise` number for number, plot
how much of the image survives at each timestep, watch a real butterfly dissolve into noise, and see
why the model is trained to predict the *noise*, with the loss $\\lVert\\varepsilon - \\varepsilon_\\theta\\rVert^2$.
Finally you will compute that loss for the untrained model, and see why it starts near 1.
"""),
        code(SETUP),
        code('''
# Parameters: the tutorial's full-size values (papermill may override them).
# Data
dataset_name = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id, or a local folder of images
image_size = 128  # the image resolution, in pixels per side
train_batch_size = 16  # images in the batch whose loss is computed

# The model (the tutorial's UNet2DModel)
block_out_channels = (128, 128, 256, 256, 512, 512)  # channels of each U-Net level
layers_per_block = 2  # ResNet layers in each U-Net block
seed = 0  # seeds the weights, the noise and the timesteps

# Figures (for regenerating the course's images; None: do not save)
figures_dir = None  # a folder to save the key figures in as PNG
figure_label = ""  # footer text on saved figures ("": the dataset and image size)
''', tags=["parameters"]),
        code('''
import datasets
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from helpers import (TrainingConfig, augment_batch, images_to_tensor, load_image_dataset, make_model,
                     to_pil_images)

datasets.disable_progress_bars()  # keep the notebook's output short

config = TrainingConfig(
    dataset_name=dataset_name,
    image_size=image_size,
    train_batch_size=train_batch_size,
    block_out_channels=block_out_channels,
    layers_per_block=layers_per_block,
    seed=seed,
)
label = figure_label or f"{config.dataset_name}, image_size {config.image_size}"
device = "cuda" if torch.cuda.is_available() else "cpu"
'''),
        md(SAVE_NOTE),
        md("""
## The scheduler

A scheduler holds the **noise schedule**. During training it noises clean images to a chosen step
(`add_noise`, this notebook); during sampling it walks back from noise to an image (`step`,
notebook 06). The tutorial uses the DDPM scheduler with $T = 1000$ steps:
"""),
        code('''
noise_scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps)
'''),
        code('''
# NBVAL_CHECK_OUTPUT
cfg = noise_scheduler.config
print("num_train_timesteps:", cfg.num_train_timesteps)
print("beta_schedule:", cfg.beta_schedule, "from", cfg.beta_start, "to", cfg.beta_end)
print("prediction_type:", cfg.prediction_type)
'''),
        md("""
Read the settings from `noise_scheduler.config`, e.g. `noise_scheduler.config.num_train_timesteps`
as the course's `train_loop` does. The attribute `noise_scheduler.num_train_timesteps` still works but
is deprecated and prints a warning (diffusers issue #2849).
"""),
        md(r"""
## The forward process

At each step $t$ the image is shrunk slightly and a little Gaussian noise of variance $\beta_t$ is
added; the $\beta_t$ grow linearly from `beta_start` to `beta_end`:

$$q(x_t \mid x_{t-1}) = \mathcal{N}\!\left(\sqrt{1-\beta_t}\,x_{t-1},\; \beta_t I\right).$$

Gaussian noise added to Gaussian noise is Gaussian, so $t$ steps combine into one. With
$\alpha_t = 1 - \beta_t$ and $\bar\alpha_t = \prod_{s \le t} \alpha_s$ (`noise_scheduler.alphas_cumprod`):

$$q(x_t \mid x_0) = \mathcal{N}\!\left(\sqrt{\bar\alpha_t}\,x_0,\; (1-\bar\alpha_t)\, I\right),
\qquad\text{i.e.}\qquad
x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\quad \varepsilon \sim \mathcal{N}(0, I).$$

Training never needs to walk through the steps: `noise_scheduler.add_noise(x0, noise, t)` jumps
straight to any $t$ with this formula. ($\sqrt{\bar\alpha_t}$ scales the image, its variance by
$\bar\alpha_t$; $1-\bar\alpha_t$ is the noise variance, $\sqrt{1-\bar\alpha_t}$ its scale. diffusers counts
$t$ from 0 to $T-1$.) The plot shows the two scales, the factors of $x_0$ and $\varepsilon$ above:
"""),
        code('''
alphas_cumprod = noise_scheduler.alphas_cumprod
timesteps_shown = [0, 50, 100, 250, 500, config.num_train_timesteps - 1]
print("alphas_cumprod is the running product of 1 - beta:",
      torch.allclose(alphas_cumprod, torch.cumprod(1 - noise_scheduler.betas, dim=0)))

t = torch.arange(config.num_train_timesteps)
fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
ax.plot(t, alphas_cumprod.sqrt(), label=r"$\\sqrt{\\bar\\alpha_t}$: signal scale")
ax.plot(t, (1 - alphas_cumprod).sqrt(), label=r"$\\sqrt{1-\\bar\\alpha_t}$: noise scale")
ax.set_xlabel("timestep $t$")
ax.set_ylim(0, 1.02)
ax.legend()
ax.grid(alpha=0.3)
fig.supxlabel(label, fontsize=9, color="gray")  # what made the figure
if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
    fig.savefig(os.path.join(figures_dir, "04_alpha_bar.png"), dpi=100, bbox_inches="tight")
plt.show()
'''),
        code('''
# NBVAL_CHECK_OUTPUT
for step in timesteps_shown:
    alpha_bar_t = alphas_cumprod[step].item()
    print(f"t = {step:>3}: alpha_bar {alpha_bar_t:.4f}, signal scale {alpha_bar_t ** 0.5:.4f}, "
          f"noise scale {(1 - alpha_bar_t) ** 0.5:.4f}")
'''),
        md("""
The image fades fast at first: by the middle of the schedule it is scaled by less than 0.28 (less
than 8 % of its variance is left), and at $t = 999$ only noise remains, which is where sampling starts.

## A real butterfly, noised

Take the first image of the dataset (preprocessed as in notebook 02) and one fixed draw of noise, and
noise the image to each timestep above, with `add_noise` and by hand with the formula. The noise comes
from a local seeded `torch.Generator`; the flips use the global one, seeded first.
"""),
        code('''
dataset = load_image_dataset(config.dataset_name)
num_images = min(len(dataset), config.train_batch_size)
images = images_to_tensor(dataset.select(range(num_images)), config.image_size)  # uint8, as in 02
torch.manual_seed(config.seed)  # augment_batch's random flips
clean_images = augment_batch(images)  # in [-1, 1]
sample_image = clean_images[:1]

generator = torch.Generator().manual_seed(config.seed)  # a local generator for all the noise below
noise = torch.randn(sample_image.shape, generator=generator)
timesteps = torch.tensor(timesteps_shown)
x0 = sample_image.expand(len(timesteps), -1, -1, -1)  # the same image once per timestep
eps = noise.expand(len(timesteps), -1, -1, -1)  # with the same noise

noisy_images = noise_scheduler.add_noise(x0, eps, timesteps)
alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
by_hand = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
print(f"max |add_noise - formula| = {(noisy_images - by_hand).abs().max().item():.2e}")
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print("add_noise computes the formula:", torch.allclose(noisy_images, by_hand, atol=1e-5))
print("noisy images:", tuple(noisy_images.shape))
'''),
        code('''
fig, axs = plt.subplots(1, len(timesteps_shown), figsize=(2.4 * len(timesteps_shown), 2.9), layout="compressed")
for ax, image, step in zip(axs, to_pil_images(noisy_images), timesteps_shown):
    ax.imshow(image)
    ax.set_title(f"t = {step}\\n" + r"$\\bar\\alpha_t$" + f" = {alphas_cumprod[step].item():.3f}")
    ax.set_axis_off()
fig.supxlabel(label, fontsize=9, color="gray")  # what made the figure
if figures_dir:
    os.makedirs(figures_dir, exist_ok=True)
    fig.savefig(os.path.join(figures_dir, "04_noising.png"), dpi=100, bbox_inches="tight")
plt.show()
'''),
        md(r"""
## Why the model predicts the noise

Given $x_t$ and $t$, knowing the noise $\varepsilon$ is the same as knowing the clean image:
$x_0 = \left(x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon\right) / \sqrt{\bar\alpha_t}$. So a network that
predicts the noise is a denoiser, and the sampler (notebook 06) uses its prediction to step from $x_t$
towards $x_{t-1}$. Ho et al. (DDPM, 2020) derived the training objective and found that this
simplified version works best:

$$L_{\text{simple}} = \mathbb{E}_{x_0,\ \varepsilon \sim \mathcal N(0, I),\ t \sim \mathcal U\lbrace 0, \dots, T-1\rbrace}
\left\lVert \varepsilon - \varepsilon_\theta\!\left(\sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon,\; t\right)\right\rVert^2 .$$

Whatever $t$ is, the target $\varepsilon$ has mean 0 and variance 1: an evenly scaled regression
target for the network at every noise level. Line by line, as in the training loop:

| formula | code |
|---|---|
| $\varepsilon \sim \mathcal N(0, I)$ | `noise = torch.randn(...)` |
| $t \sim \mathcal U\lbrace 0, \dots, T-1\rbrace$, one per image | `timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,))` |
| $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon$ | `noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)` |
| $\varepsilon_\theta(x_t, t)$ | `noise_pred = model(noisy_images, timesteps).sample` |
| $\lVert\varepsilon - \varepsilon_\theta\rVert^2$, averaged | `loss = F.mse_loss(noise_pred, noise)` |

(`F.mse_loss` averages over the pixels too, which only divides the sum by a constant.)

## The untrained model's loss
"""),
        code('''
torch.manual_seed(config.seed)  # the same initial weights every time
model = make_model(config).to(device)

bs = clean_images.shape[0]
noise = torch.randn(clean_images.shape, generator=generator).to(device)
timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,), generator=generator).to(device)
noisy_images = noise_scheduler.add_noise(clean_images.to(device), noise, timesteps)
with torch.no_grad():  # no training here: skip the bookkeeping for gradients
    noise_pred = model(noisy_images, timesteps).sample
loss = F.mse_loss(noise_pred, noise)

print(f"loss of the untrained model:      {loss.item():.3f}")
print(f"loss of always predicting zeros:  {F.mse_loss(torch.zeros_like(noise), noise).item():.3f}")
print(f"size of the model's output (RMS): {noise_pred.pow(2).mean().sqrt().item():.3f}")
'''),
        code('''
# NBVAL_CHECK_OUTPUT
print("batch:", tuple(noisy_images.shape), "timesteps:", tuple(timesteps.shape))
print("untrained loss is close to 1:", abs(loss.item() - 1) < 0.5)
'''),
        md(r"""
Why about 1? Write the prediction as $f$ and expand the mean squared error:
$\overline{(\varepsilon - f)^2} = \overline{\varepsilon^2} - 2\,\overline{\varepsilon f} + \overline{f^2}$.
The noise has variance 1, so $\overline{\varepsilon^2} \approx 1$; an untrained network knows nothing
about the noise, so its output is uncorrelated with it and $\overline{\varepsilon f} \approx 0$. What
is left is $1 + \overline{f^2}$: a little above 1, by the square of the untrained output's size.
Predicting zeros scores exactly $\overline{\varepsilon^2} \approx 1$, so 1 is the baseline: a model
whose loss falls well below 1 has learned to see noise. Notebook 05 trains it to do that.

**Next:** [05_training](05_training.ipynb) puts the data, the model and the scheduler into the
training loop.
"""),
    ]


if __name__ == "__main__":
    write("01_config", nb01())
    write("02_dataset", nb02())
    write("03_model", nb03())
    write("04_scheduler", nb04())
