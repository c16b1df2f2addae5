"""The flux-kontext editor on the full-size FLUX.1 Kontext architecture, random weights, into one JSON.

    bash bench/gpu/run.sh --kontext                       # on a CUDA machine (see bench/gpu/README.md)
    bash bench/gpu/run.sh --kontext --tiny --device cpu   # tiny components on the CPU (the smoke test)

Full size: FLUX.1's transformer (19 double-stream + 38 single-stream blocks, 3072 wide, embedded
guidance: 12B parameters), its 16-channel VAE, CLIP ViT-L/14's text encoder and T5-XXL's encoder,
with random weights built in bf16 directly on the device (torch's default dtype and device set while
the modules are made: no fp32 copy, no CPU copy; an edit's cost does not depend on the weight
values); tokenizers are the tiny ones of the tests (T5 pads to 512 tokens whatever the text).
`FluxKontextBackend.edit_batch` at 512 x 512 with Kontext's default 28 steps, at each batch size:
edits/s, peak GPU memory, and the fraction of the compute floor (FLOPs of an edit counted by torch's
FLOP counter, against this GPU's measured bf16 matmul rate and a nominal 790 TFLOP/s). Random bf16
weights may drive an edit to non-finite values: the edit is then an error, after all its compute,
and its time still counts (`non_finite` says how many). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import numpy as np
import torch

NOMINAL_DENSE_BF16_TFLOPS = 790.0
"""What an H200 sustains in dense half-precision matrix work (the floor the IP2P part uses too)."""

FULL_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FULL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


@contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Modules made inside are made on `device` in `dtype` directly."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def full_components(device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffusion_server.backends.tiny_flux_kontext import tiny_scheduler, tiny_t5_tokenizer
    from diffusion_server.backends.tiny_ip2p import tiny_tokenizer

    torch.manual_seed(0)
    with building_on(device, dtype):
        transformer = FluxTransformer2DModel(**FULL_TRANSFORMER)
        vae = AutoencoderKL(**FULL_VAE)
        clip = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                vocab_size=49408,
                projection_dim=768,
                hidden_act="quick_gelu",
                bos_token_id=0,
                pad_token_id=1,
                eos_token_id=2,
            )
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "tokenizer": tiny_tokenizer(),
            "text_encoder_2": t5, "tokenizer_2": tiny_t5_tokenizer(), "scheduler": tiny_scheduler()}  # fmt: skip


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Sustained dense matmul throughput (8192^3 in dtype), TFLOP/s; None on the CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize(device)
    return round(2 * n**3 * 10 / (time.perf_counter() - t0) / 1e12, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random components (the smoke test)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--side", type=int, default=None, help="render side (default 512; tiny: 32)")
    ap.add_argument("--steps", type=int, default=None, help="diffusion steps (default Kontext's 28; tiny: 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per size, after one warm-up")
    ap.add_argument("--budget-s", type=float, default=380.0, help="start no batch size after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from diffusion_server.backends.base import EditItem
    from diffusion_server.backends.flux_kontext import KONTEXT_DEFAULTS, FluxKontextBackend
    from in2n_contract import EditParams

    started = time.monotonic()
    device = torch.device(args.device)
    side = args.side or (32 if args.tiny else 512)
    steps = args.steps or (2 if args.tiny else int(KONTEXT_DEFAULTS["diffusion_steps"]))
    if args.out:
        out = Path(args.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "kontext_bench.json"
    else:
        out = REPO / "bench" / "results" / f"kontext_bench{'_tiny' if args.tiny else ''}.json"
    cuda = device.type == "cuda"
    doc: dict = {"machine": {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                             "torch": torch.__version__, "python": platform.python_version()},
                 "command": " ".join(sys.argv)}  # fmt: skip

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")

    t0 = time.monotonic()
    if args.tiny:
        from diffusion_server.backends.tiny_flux_kontext import tiny_components

        parts = tiny_components(0)
    else:
        parts = full_components(device, torch.bfloat16)
    backend = FluxKontextBackend(
        **parts, device=args.device, precision="bf16", model="random " + ("tiny" if args.tiny else "full-size")
    )
    params = {name: sum(p.numel() for p in getattr(backend, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}  # fmt: skip
    doc["setup"] = {"build_s": round(time.monotonic() - t0, 1), "precision": "bf16", "side": side, "steps": steps,
                    "parameters": params, "weights_gpu_bytes": torch.cuda.memory_allocated(device) if cuda else None}  # fmt: skip
    save()

    rng = np.random.default_rng(0)

    def items(n: int, first_seed: int) -> list:
        made = []
        for i in range(n):
            render = rng.random((side, side, 3), dtype=np.float32)
            original = np.clip(render + rng.normal(0, 0.05, render.shape), 0, 1).astype(np.float32)
            p = EditParams("turn it into bronze", guidance_scale=3.5, diffusion_steps=steps, seed=first_seed + i,
                           lower_bound=0.7, upper_bound=0.7)  # fmt: skip
            made.append(EditItem(render, original, p))
        return made

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # The floor: FLOPs of one edit (text embeddings cached, as in a run), counted by torch.
    from torch.utils.flop_counter import FlopCounterMode

    backend.edit_batch(items(1, 0))  # warm-up; caches the instruction's embeddings
    with FlopCounterMode(display=False) as counter:
        backend.edit_batch(items(1, 0))
    tflop_edit = counter.get_total_flops() / 1e12
    peak = matmul_tflops(device, torch.bfloat16)
    doc["floor"] = {"tflop_per_edit": float(f"{tflop_edit:.4g}"), "measured_matmul_tflops": peak,
                    "nominal_tflops": NOMINAL_DENSE_BF16_TFLOPS if cuda else None,
                    "floor_ms_per_edit_nominal": round(tflop_edit / NOMINAL_DENSE_BF16_TFLOPS * 1e3, 2)}  # fmt: skip
    save()

    doc["batches"] = {}
    for batch in args.batches:
        if time.monotonic() - started > args.budget_s:
            doc["batches"][str(batch)] = {"skipped": f"past --budget-s {args.budget_s:g}"}
            continue
        try:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            backend.edit_batch(items(batch, 100))  # warm-up at this size
            times, non_finite = [], 0
            for r in range(args.repeats):
                sync()
                t = time.perf_counter()
                results = backend.edit_batch(items(batch, 1000 * (r + 1)))
                sync()
                times.append(time.perf_counter() - t)
                non_finite += sum(isinstance(x, Exception) for x in results)
            per_batch = statistics.median(times)
            achieved = tflop_edit * batch / per_batch
            row = {"s_per_batch": round(per_batch, 4), "edits_per_s": round(batch / per_batch, 4),
                   "achieved_tflops": float(f"{achieved:.4g}"),
                   "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                   "non_finite": non_finite}  # fmt: skip
            if peak:
                row["fraction_of_measured_matmul"] = round(achieved / peak, 4)
                row["fraction_of_nominal_floor"] = round(achieved / NOMINAL_DENSE_BF16_TFLOPS, 4)
            doc["batches"][str(batch)] = row
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: recorded, the others stand
            doc["batches"][str(batch)] = {
                "skipped": f"{type(e).__name__}: {e}"[:500],
                "traceback": traceback.format_exc()[-2000:],
            }
        save()
    measured = {int(b): r for b, r in doc["batches"].items() if "edits_per_s" in r}
    if measured:
        best = max(measured, key=lambda b: measured[b]["edits_per_s"])
        doc["summary"] = {"edits_per_s_batch_1": measured.get(1, {}).get("edits_per_s"), "best_batch": best,
                          "edits_per_s_best": measured[best]["edits_per_s"],
                          "peak_gpu_bytes_best": measured[best]["peak_gpu_bytes"],
                          "fraction_of_nominal_floor_best": measured[best].get("fraction_of_nominal_floor")}  # fmt: skip
    doc["wall_s"] = round(time.monotonic() - started, 1)
    save()
    print(f"kontext_bench: wrote {out}")


if __name__ == "__main__":
    main()
