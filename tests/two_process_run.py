"""Run train_loop in two CPU processes with accelerate's debug_launcher, recording what each saw and wrote.

A script, run by test_training.py in a fresh interpreter: forking a process that has already run
PyTorch's OpenMP kernels can hang the children, so the launch must come first.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402


def record(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler):
    """In each process: train, noting the batches seen and the pipeline saves, then dump the weights."""
    from accelerate import PartialState

    seen, saves = [], []
    original_augment, original_save = helpers.augment_batch, helpers.save_pipeline_atomically

    def augment(uint8_images):
        seen.append(uint8_images[:, 0, 0, 0].tolist())  # each test image is one solid grey level
        return original_augment(uint8_images)

    def save(pipeline, output_dir, *args, **kwargs):
        saves.append(output_dir)
        return original_save(pipeline, output_dir, *args, **kwargs)

    helpers.augment_batch, helpers.save_pipeline_atomically = augment, save
    helpers.train_loop(config, model, noise_scheduler, optimizer, train_dataloader, lr_scheduler)
    rank = PartialState().process_index  # only after train_loop's Accelerator has set up the process group
    record_dir = os.path.dirname(config.output_dir)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(record_dir, f"rank{rank}.pt"))
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "saves": saves}, f)


if __name__ == "__main__":
    from accelerate import debug_launcher

    config = helpers.TrainingConfig(**json.loads(sys.argv[1]))
    images = helpers.images_to_tensor(helpers.load_image_dataset(config.dataset_name), config.image_size)
    debug_launcher(record, helpers.build_training(config, images), num_processes=2)
