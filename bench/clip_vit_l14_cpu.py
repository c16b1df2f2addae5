"""What one frame costs in ViT-L/14's image tower (the default CLIP model of nerf_trainer/clip_metrics.py), with
random weights of the full-size config (no download): the compute is the same as the real weights'.

    .venv/bin/python bench/clip_vit_l14_cpu.py --frames 4 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

# openai/clip-vit-large-patch14's vision tower.
VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
           "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4, help="frames timed, one at a time (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_L14)).to(args.device).eval()
    pixels = torch.randn(1, 3, 224, 224, device=args.device)  # [1, 3, 224, 224]: one frame after CLIP's processor
    with torch.no_grad():
        model(pixel_values=pixels)  # warm-up
        times = []
        for _ in range(args.frames):
            start = time.perf_counter()
            model(pixel_values=pixels).image_embeds.cpu()
            times.append(time.perf_counter() - start)
    print(f"ViT-L/14 image embedding on {args.device} ({torch.get_num_threads()} threads): "
          f"{min(times):.2f} s min, {sum(times) / len(times):.2f} s mean per frame over {args.frames} frames")  # fmt: skip


if __name__ == "__main__":
    main()
