"""Training steps per second of the quick preset's U-Net on this machine, float32 against bf16 autocast.

    python benchmarks/cpu_precision.py

Random 32 px batches, AdamW, the loss in float32; 3 warm-up steps, then a fixed number of timed steps,
at batch 16 and 64. On a CPU with AVX512-BF16 or AMX, bf16 autocast is faster; elsewhere it is slower
(mixed_precision="auto" picks it only where the CPU computes it natively).
"""

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helpers  # noqa: E402


def images_per_second(batch_size, bf16):
    """Training images per second of the quick U-Net at batch_size, with or without bf16 autocast."""
    model = helpers.make_model(helpers.preset_config("quick", train_batch_size=batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), 3e-4)
    x, t = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 1000, (batch_size,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x, t).sample
        F.mse_loss(out.float(), x).backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(3):
        step()
    steps = max(3, 192 // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


if __name__ == "__main__":
    print(f"native bf16 on this CPU: {helpers.cpu_has_native_bf16()}")
    for batch_size in (16, 64):
        for bf16 in (False, True):
            print(f"batch {batch_size}, {'bf16 autocast' if bf16 else 'float32'}: {images_per_second(batch_size, bf16):.1f} images/s")
