"""A tiny, randomly initialised InstructPix2Pix for tests and offline demos.

The components are the real diffusers / transformers classes (UNet with 8 input
channels, a 2-block AutoencoderKL, a small CLIP text encoder, a CLIP tokenizer
built from a few-token vocabulary) with seeded random weights, so the real
`Ip2pBackend` code runs end to end on a CPU in about a second per edit, with
no download. Its edits are meaningless images; only the plumbing is real.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .ip2p import REFERENCE_DDIM_SETTINGS, Ip2pBackend

TINY_MODEL_LABEL = "tiny-random-ip2p"

# Merges of the tiny BPE vocabulary: a few common English pieces.
_MERGES: list[tuple[str, str]] = [
    ("t", "h"),
    ("th", "e</w>"),
    ("i", "n"),
    ("e", "r</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "n</w>"),
    ("e", "d</w>"),
    ("i", "t</w>"),
    ("o", "f</w>"),
]


def _tiny_vocab() -> dict[str, int]:
    """Special tokens (bos 0, pad 1, eos 2), every printable ASCII character with and
    without the end-of-word suffix, and the results of `_MERGES`. Anything else
    (non-ASCII bytes) maps to the unknown token, so any text tokenises."""
    tokens = ["<|startoftext|>", "<|pad|>", "<|endoftext|>"]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens += chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in _MERGES]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer loaded from vocab.json + merges.txt written to a temp folder."""
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as folder:
        with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(_tiny_vocab(), f)
        with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES))
        return CLIPTokenizer.from_pretrained(
            folder,
            bos_token="<|startoftext|>",
            eos_token="<|endoftext|>",
            pad_token="<|pad|>",
            unk_token="<|endoftext|>",
            model_max_length=77,
        )


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A 2-block AutoencoderKL (4 latent channels, latents at half the image side), weights from torch's current RNG.
    `scaling_factor`: the latent scale, Stable Diffusion 1.5's by default (SDXL's is 0.13025)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=scaling_factor,
    )


def tiny_text_config(**overrides: Any) -> CLIPTextConfig:
    """A 3-layer, 32-wide CLIP text encoder's config, with the tiny tokenizer's special ids; `overrides`
    replace or add fields (e.g. SDXL's second encoder: hidden_act="gelu", projection_dim=32)."""
    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "vocab_size": 1000,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
    }
    return CLIPTextConfig(**{**fields, **overrides})


def tiny_ddim_config() -> dict[str, Any]:
    """DDIMScheduler arguments: Stable Diffusion's noise schedule (scaled-linear betas 0.00085 .. 0.012 over
    1000 steps) with the reference's DDIM settings (`REFERENCE_DDIM_SETTINGS`); the same at any model size."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        **REFERENCE_DDIM_SETTINGS,
    )


def tiny_components(seed: int) -> dict:
    """All components, weights drawn from a private RNG seeded with `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=8,  # 4 noisy latents + 4 image-conditioning latents
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config())
    scheduler = DDIMScheduler(**tiny_ddim_config())
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "scheduler": scheduler,
    }


def build_tiny_ip2p(device: str = "cpu", seed: int = 0, precision: str = "fp32") -> Ip2pBackend:
    """A tiny random IP2P backend; the same `seed` gives identical weights."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 - the seed's errors are ValueErrors, as the other arguments'
    backend = Ip2pBackend(**tiny_components(seed), device=device, precision=precision, model=TINY_MODEL_LABEL)
    backend.name = "tiny-ip2p"  # the ip2p code on tiny weights: Describe says which
    return backend


def make_backend(model: str, device: str, precision: str, seed: int, options: Any | None = None) -> Ip2pBackend:
    """Registry factory: the tiny model of `seed` (weights built here, nothing loaded); `model` is ignored."""
    from . import apply_torch_options, check_device_available, check_torch_options

    check_device_available(device)
    check_torch_options(device, options)
    return apply_torch_options(build_tiny_ip2p(device=device, seed=seed, precision=precision), options)
