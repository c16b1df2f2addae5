"""InstructPix2Pix components with random weights, full size or tiny, for the GPU benchmark.

Full size: Stable Diffusion 1.5's UNet with 8 input channels (IP2P's), its VAE, a CLIP ViT-L/14
text encoder, configs written here (no download). An edit's cost does not depend on the weight
values, so random weights time the real architecture. The tokenizer is the tiny test tokenizer
(any text gives 77 ids, as CLIP's does; the text encoder's cost depends only on the length).
Tiny: the test suite's tiny model (diffusion_server/backends/tiny_ip2p.py).
"""

from __future__ import annotations

import os

import torch

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), 8 input channels as IP2P.
SD15_UNET: dict = {
    "sample_size": 64, "in_channels": 8, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}  # fmt: skip
# Its VAE (vae/config.json).
SD15_VAE: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "block_out_channels": (128, 256, 512, 512), "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}  # fmt: skip
# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14), with the tiny tokenizer's special ids.
CLIP_L14_TEXT: dict = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
}  # fmt: skip


def random_components(full: bool, device: str = "cpu", seed: int = 0) -> dict:
    """Components for `Ip2pBackend(**parts)`: full size (built on `device`, fast on a GPU) or tiny."""
    from diffusion_server.backends.tiny_ip2p import tiny_components, tiny_ddim_config, tiny_tokenizer

    if not full:
        return tiny_components(seed)
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "scheduler": DDIMScheduler(**tiny_ddim_config()),
    }


def save_components(parts: dict, folder: str, dtype: torch.dtype) -> str:
    """Write `parts` in diffusers' folder layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/), weights
    in `dtype`, for `python -m diffusion_server --backend ip2p --model FOLDER`."""
    os.makedirs(folder, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        module = parts[name]
        was = next(module.parameters()).dtype
        if was != dtype:
            module.to(dtype)
        module.save_pretrained(os.path.join(folder, name))
        if was != dtype:
            module.to(was)
    parts["tokenizer"].save_pretrained(os.path.join(folder, "tokenizer"))
    parts["scheduler"].save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def unet_tflop_per_row(parts: dict, side: int) -> float:
    """UNet cost of one row at `side` x `side` pixels, in TFLOP (2 x multiply-accumulates), counted by
    torch's FLOP counter on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = parts["unet"]
    f = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    cfg = unet.config
    h = side // f
    device, dtype = unet.device, unet.dtype
    x = torch.zeros(1, cfg.in_channels, h, h, device=device, dtype=dtype)
    ctx = torch.zeros(1, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=ctx)
    return counter.get_total_flops() / 1e12
