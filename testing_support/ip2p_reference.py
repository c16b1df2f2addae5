"""The published Instruct-NeRF2NeRF edit, step by step, from raw IP2P components.

An independent statement of docs/method.md, "One edit (the IP2P call)", written
from the published procedure and sharing no code with `Ip2pBackend`: the tests
check the backend against it (tests/test_ip2p_backend.py) and the GPU benchmark
times it as the anchor (bench/gpu/gpu_bench.py). One edit, no batching, no caches:

1. T ~ uniform integer in [int(1000 * lower), int(1000 * upper)] (inclusive);
2. a DDIM scheduler with the 1000-step noise schedule, its spacing applied as if it
   had T training steps (config num_train_timesteps := T), `steps` timesteps;
3. z = VAE(render) posterior sample * scaling factor, noised at the first timestep;
4. c = VAE(original) posterior mode (unscaled); three UNet rows (text, c), (empty, c),
   (empty, 0) per step, guided as uncond + g (text_image - image) + g_img (image - uncond);
5. decode z / scaling factor, map [-1, 1] -> [0, 1], clamp.

Randomness as the reference run draws it after `torch.manual_seed(seed)`: T, then the
posterior sample, then the noise, from one CPU generator.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler


def reference_edit(parts: Any, render: np.ndarray, original: np.ndarray, params: Any) -> tuple[np.ndarray, int]:
    """One edit of `render` ([H, W, 3] float32 in [0, 1], H and W multiples of the VAE factor).

    Args:
        parts: anything with `unet`, `vae`, `text_encoder`, `tokenizer` and `scheduler`
            attributes (e.g. an `Ip2pBackend`); the UNet's device and dtype are used.
        original: the unedited view, same shape as `render`.
        params: an `EditParams` (instruction, guidance_scale, image_guidance_scale,
            diffusion_steps, lower_bound, upper_bound, seed: an int).

    Returns:
        (edited image [H, W, 3] float32 in [0, 1], T).
    """
    if params.seed is None:
        raise ValueError("params.seed must be an int: the reference draws its randomness from it")
    if render.shape != original.shape:
        raise ValueError(f"render {render.shape} and original {original.shape} must have the same shape")
    unet, vae, text_encoder, tokenizer = parts.unet, parts.vae, parts.text_encoder, parts.tokenizer
    device, dtype = unet.device, unet.dtype
    g = torch.Generator().manual_seed(int(params.seed))
    # 1. T, inclusive, from int(1000 * lower) to int(1000 * upper).
    T = int(torch.randint(int(1000 * params.lower_bound), int(1000 * params.upper_bound) + 1, (1,), generator=g))
    # 2. The schedule: DDIM with the 1000-step noise schedule, spaced as if it had T training steps.
    sched = DDIMScheduler.from_config(parts.scheduler.config)
    sched.register_to_config(num_train_timesteps=T)
    sched.set_timesteps(params.diffusion_steps)
    scale = float(getattr(vae.config, "scaling_factor", None) or 0.18215)

    def to_t(img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None]  # [1, 3, H, W]
        return (x * 2 - 1).to(device, vae.dtype)

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids.to(text_encoder.device))[0].to(dtype)  # [1, 77, D]

    with torch.no_grad():
        # 3. The render's latents (a posterior sample, scaled), noised at the schedule's first timestep.
        z0 = vae.encode(to_t(render)).latent_dist.sample(g) * scale  # [1, 4, h, w]
        noise = torch.randn(z0.shape, generator=g).to(device, z0.dtype)
        t0 = sched.timesteps[0]
        abar = sched.alphas_cumprod  # [1000], float32, on the CPU
        z = (abar[t0].sqrt() * z0 + (1 - abar[t0]).sqrt() * noise).to(dtype)
        # 4. The image conditioning: the original's latent mode, unscaled; three rows.
        c = vae.encode(to_t(original)).latent_dist.mode().to(dtype)  # [1, 4, h, w]
        cond = torch.cat([c, c, torch.zeros_like(c)])  # [3, 4, h, w]
        text = torch.cat([embed(params.instruction), embed(""), embed("")])  # [3, 77, D]
        # 5. The DDIM steps, with 3-way guidance.
        for t in sched.timesteps:
            eps3 = unet(torch.cat([z.repeat(3, 1, 1, 1), cond], 1), t.to(device), encoder_hidden_states=text).sample
            e_ti, e_i, e_u = eps3.chunk(3)
            eps = e_u + params.guidance_scale * (e_ti - e_i) + params.image_guidance_scale * (e_i - e_u)
            z = sched.step(eps, t, z).prev_sample
        # 6. Decode, map to [0, 1], clamp.
        out = (vae.decode((z / scale).to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1)  # [1, 3, H, W]
    return out[0].permute(1, 2, 0).cpu().numpy(), T
