"""tiny-ip2p edit time on the CPU in fp32, bf16 and fp16: why a half-precision variant's server runs bf16 there.

    OMP_NUM_THREADS=1 python bench/cpu_precision.py

Prints seconds per edit (64x64, 5 DDIM steps, one thread, after one warm-up edit, mean of --repeats).
The tiny model's timings say which kernels are slow, not what the full-size model costs.
A benchmark, not a test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import machine

from diffusion_server.backends.tiny_ip2p import build_tiny_ip2p
from in2n_contract import EditParams


def main(repeats: int = 5) -> None:
    torch.set_num_threads(1)
    image = np.random.default_rng(0).random((64, 64, 3), dtype=np.float32)  # [H, W, 3]
    params = EditParams(instruction="make it red", guidance_scale=7.5, image_guidance_scale=1.5, diffusion_steps=5,
                        lower_bound=0.7, upper_bound=0.98, seed=0)  # fmt: skip
    print(f"machine: {machine()}")
    for precision in ("fp32", "bf16", "fp16"):
        backend = build_tiny_ip2p(precision=precision)
        backend.edit(image, image, params)  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            backend.edit(image, image, params)
        print(f"{precision}: {(time.perf_counter() - started) / repeats:.3f} s per edit", flush=True)


if __name__ == "__main__":
    main()
