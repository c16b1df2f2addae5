"""A tiny, randomly initialised FLUX.1 Kontext for tests and offline demos.

The real diffusers / transformers classes with seeded random weights, so the real
`FluxKontextBackend` code runs end to end on a CPU in a fraction of a second per edit,
with no download: a `FluxTransformer2DModel` with one double-stream and one single-stream
block and embedded guidance (as Kontext [dev]), a 4-block `AutoencoderKL` (8x down, as
FLUX's VAE: images are edited at multiples of 16 pixels), a small CLIP text encoder with
the tiny CLIP tokenizer of tiny-ip2p, a small T5 encoder with a T5 tokenizer built from a
few-piece Unigram vocabulary, and FLUX's flow-matching scheduler (dynamic shifting).
Its edits are meaningless images; only the plumbing is real.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from .flux_kontext import FluxKontextBackend
from .tiny_ip2p import tiny_text_config, tiny_tokenizer

TINY_MODEL_LABEL = "tiny-random-flux-kontext"

_WORDS = ["the", "it", "make", "turn", "into", "red", "blue", "statue", "bronze", "sepia", "a", "of"]


def tiny_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer over a small Unigram vocabulary: T5's specials (pad 0, eos 1, unk 2), the word marker,
    every printable ASCII character alone and after the marker, and a few whole words; any text tokenises."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -5.5) for c in chars]
    pieces += [("\u2581" + w, -3.0) for w in _WORDS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX's flow-matching Euler scheduler with its resolution-dependent (dynamic) shift, as Kontext ships it."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_components(seed: int) -> dict[str, Any]:
    """All components, weights drawn from a private RNG seeded with `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x a 2x2 patch
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # the T5 width
            pooled_projection_dim=32,  # the CLIP width
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.5,
            shift_factor=0.1,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(tiny_text_config())
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=256,
                d_model=32,
                d_ff=37,
                d_kv=8,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tiny_tokenizer(),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tiny_t5_tokenizer(),
        "scheduler": tiny_scheduler(),
    }


def build_tiny_flux_kontext(device: str = "cpu", seed: int = 0, precision: str = "fp32") -> FluxKontextBackend:
    """A tiny random Kontext backend; the same `seed` gives identical weights."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 - as the other arguments' errors
    backend = FluxKontextBackend(
        **tiny_components(seed),
        device=device,
        precision=precision,
        model=TINY_MODEL_LABEL,
    )
    backend.name = "tiny-flux-kontext"  # the flux-kontext code on tiny weights: Describe says which
    return backend


def make_backend(model: str, device: str, precision: str, seed: int, options: Any | None = None) -> FluxKontextBackend:
    """Registry factory: the tiny model of `seed` in bf16, as flux-kontext runs (`model` is ignored)."""
    from . import apply_torch_options, check_device_available, check_torch_options
    from .flux_kontext import served_precision

    check_device_available(device)
    check_torch_options(device, options)
    precision = served_precision(precision, "tiny-flux-kontext")
    backend = build_tiny_flux_kontext(device=device, seed=seed, precision=precision)
    return apply_torch_options(backend, options)


def save_tiny_flux_kontext(path: str | os.PathLike, seed: int = 0) -> str:
    """Save the tiny model of `seed` in diffusers format under `path` (created if needed), laid out as the hub's
    FLUX.1 Kontext (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/):
    `FluxKontextBackend.from_pretrained(path)` then loads it through the real loading code. Returns the folder."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")  # noqa: TRY004 - as the other arguments' errors
    from diffusers import FluxKontextPipeline

    folder = os.fspath(path)
    FluxKontextPipeline(**tiny_components(seed)).save_pretrained(folder)
    return folder
