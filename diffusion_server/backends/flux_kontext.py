"""FLUX.1 Kontext editing backend: the Iterative Dataset Update's edit on a flow-matching transformer.

The IP2P edit's idea (start from the noised render, condition on the original) in this model's
terms (docs/method.md, "The flux-kontext backend"):

1. T ~ uniform integer in [int(lower_bound * 1000), int(upper_bound * 1000)], kept in [1, 999],
   drawn first from the edit's generator as ip2p draws it; t = T / 1000.
2. The schedule: `n = diffusion_steps` sigmas t * (1 - k / n), k = 0 .. n-1 (Kontext's own default
   schedule linspace(1, 1/n, n) is the case t = 1), shifted by the scheduler's resolution shift
   (mu from the latent token count, as Kontext shifts its schedule), then 0: exactly n Euler steps.
3. x0 = (VAE(render).mode - shift) * scale; x_sigma = (1 - sigma0) * x0 + sigma0 * noise, the noise
   the generator's next draw (`randn_tensor`, as the pipeline draws it).
4. Each step runs the transformer on [x_sigma tokens | reference tokens], the reference being the
   original capture's latents (VAE mode, as Kontext encodes its context image) at position id 1,
   with the instruction's T5 sequence and CLIP pooled embedding and the embedded guidance
   `guidance_scale`; the velocity of the x tokens moves them by (sigma_next - sigma) * v.
5. Decode (latents / scale + shift), map [-1, 1] -> [0, 1], clamp.

That is diffusers' `FluxKontextInpaintPipeline` called with image = the render, image_reference =
the original, an all-ones mask, `sigmas` = step 2's unshifted list and strength 1.0 (the test
tests/test_flux_kontext_backend.py matches them within 1e-5 in fp32). `image_guidance_scale` has no
meaning here and is ignored (Describe says so).

Sizes: a render of any size is edited at the nearest multiple of 16 pixels per side (the VAE's 8
times a 2x2 patch; at least 16), resized bilinearly there, and the edit is resized back to the
render's size. Batching: edits with the same model size and step count run as one transformer call
per step, each with its own generator, schedule, instruction and guidance. The text encoders' output
is cached per instruction, the reference latents per cached original.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from . import DEFAULT_FLUX_KONTEXT_MODEL, resolve_device, resolve_precision
from .base import BackendInfo, EditBackend, EditCancelled, EditItem, EditParams, EditResult, GroupedBatchBackend
from .ip2p import (
    _LOAD_ERRORS,
    PRECISIONS,
    WeightsNotFound,
    _check_image,
    _first_line,
    _hf_cache_dir,
    _hub_offline,
    _looks_like_path,
)

logger = logging.getLogger(__name__)

KONTEXT_DEFAULTS: dict[str, float] = {
    "guidance_scale": 3.5,  # diffusers' FluxKontext pipelines' default embedded guidance
    "image_guidance_scale": 0.0,  # ignored (no such guidance in Kontext)
    "diffusion_steps": 28,  # Kontext's default step count
    "lower_bound": 0.02,
    "upper_bound": 0.98,
}
"""The parameters this backend edits with when the trainer leaves them unset (Describe reports them)."""
IGNORED_FIELDS = ["image_guidance_scale"]
"""Request fields this backend ignores (Describe reports them)."""
SERVED_PRECISION = "bf16"
"""What flux-kontext runs in, whatever --precision: FLUX overflows in fp16, and fp32 needs about 48 GB for the
12B transformer alone."""
_TEXT_CACHE_SIZE = 64
_REF_CACHE_SIZE = 512
_FOLDER_LAYOUT = "transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/"


def served_precision(requested: str, backend: str = "flux-kontext") -> str:
    """bf16, whatever `requested` (--precision, `auto` already resolved by device); says so in the log when that
    is another one."""
    if requested != SERVED_PRECISION:
        logger.info(
            "%s runs %s (FLUX overflows in fp16; fp32 needs about 48 GB for the transformer alone): "
            "--precision (%s here) does not apply",
            backend,
            SERVED_PRECISION,
            requested,
        )
    return SERVED_PRECISION


def start_sigmas(T: int, steps: int) -> list[float]:
    """The unshifted sigmas of an edit starting at timestep T (1..999) with `steps` steps: t (1 - k / steps),
    k = 0 .. steps-1, t = T / 1000 (the `sigmas` a FluxKontext pipeline is given; it shifts them by mu)."""
    t = T / 1000.0
    return [t * (1.0 - k / steps) for k in range(steps)]


def resolution_shift(image_seq_len: int, config: Any) -> float:
    """mu of the dynamic shift for `image_seq_len` latent tokens: linear from base_shift at base_image_seq_len
    to max_shift at max_image_seq_len (the scheduler's config), as FLUX pipelines compute it."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 latent patches as tokens, row-major (FLUX's packing)."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w], the inverse of `pack`."""
    B, _, D = tokens.shape
    x = tokens.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return x.reshape(B, D // 4, h, w)


def position_ids(h: int, w: int, index: float, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """[(h/2)(w/2), 3] rotary position ids of packed latents: (index, row, column); 0 for the image being
    denoised, 1 for Kontext's context image."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class _Prepared:
    """An edit checked and sized, with the numbers that decide its batch group."""

    item: EditItem
    H: int
    W: int
    h: int  # model size (multiples of 16 for FLUX)
    w: int
    seed: int
    T: int
    steps: int


class FluxKontextBackend(GroupedBatchBackend):
    """FLUX.1 Kontext, the render noised to a start level and denoised with the original as context."""

    DEFAULT_MODEL = DEFAULT_FLUX_KONTEXT_MODEL
    name = "flux-kontext"
    default_max_batch = 4
    accepts_uint8 = True

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: T5TokenizerFast,
        scheduler: FlowMatchEulerDiscreteScheduler,
        device: str = "cpu",
        precision: str = "bf16",
        model: str = "",
        max_sequence_length: int = 512,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(f"scheduler must be a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        cfg = scheduler.config
        unsupported = [
            k
            for k in (
                "stochastic_sampling",
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
            )
            if cfg.get(k, False)
        ]
        if unsupported or cfg.get("shift_terminal"):
            raise ValueError(
                f"scheduler: the batched Euler update needs a plain flow-matching schedule; {unsupported} set"
            )
        lat_ch = vae.config.latent_channels
        if transformer.config.in_channels != 4 * lat_ch:
            raise ValueError(
                f"transformer has {transformer.config.in_channels} input channels; FLUX packs 2x2 patches of "
                f"{lat_ch} VAE latent channels: 4 x {lat_ch}"
            )
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be an int in [1, 512], got {max_sequence_length!r}")
        self.model = model
        self.transformer = self._place(transformer)
        self.vae = self._place(vae)
        self.text_encoder = self._place(text_encoder)
        self.text_encoder_2 = self._place(text_encoder_2)
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler = scheduler  # never stepped itself: each edit's schedule is set on a copy
        self.max_sequence_length = max_sequence_length
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.multiple = 2 * self.vae_factor  # a 2x2 patch of latents per token: 16 pixels for FLUX
        self._text_cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._ref_cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.text_encodes = 0  # instructions encoded (cache misses), for tests
        self.ref_encodes = 0  # originals encoded by the VAE (cache misses), for tests
        self.steps_run = 0  # transformer calls, for tests
        self.options: dict[str, bool] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = SERVED_PRECISION
    ) -> FluxKontextBackend:
        """Load FLUX.1 Kontext in diffusers format from a local folder or a hub id (local files first: the folder,
        or the Hugging Face cache; the hub only when that fails and HF_HUB_OFFLINE is not set). Weights load in
        `precision` directly (no fp32 copy). Raises WeightsNotFound (one line: what, where, what to do)."""
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a hub id or a folder path, got {model!r}")
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        dtype = PRECISIONS[prec]
        folder_hint = f"point --model at a local folder in diffusers format ({_FOLDER_LAYOUT})"

        def gated(hub_id: str) -> str:
            return (
                f"the hub repository is gated: accept its licence at https://huggingface.co/{hub_id}, log in with "
                f"`hf auth login` and fetch it with `hf download {hub_id}`, or {folder_hint}"
            )

        if os.path.isdir(model):
            try:
                parts = cls._load_components(model, dtype, local_files_only=True)
            except _LOAD_ERRORS as e:
                raise WeightsNotFound(
                    f"folder {model!r} is not a complete diffusers FLUX.1 Kontext model ({_first_line(e)}); "
                    f"{folder_hint}, or give a hub id such as {cls.DEFAULT_MODEL}"
                ) from e
        elif os.path.exists(model) or _looks_like_path(model):
            raise WeightsNotFound(
                f"model folder {model!r} does not exist; check the path, or use --model {cls.DEFAULT_MODEL}: "
                f"{gated(cls.DEFAULT_MODEL)}"
            )
        else:
            try:
                parts = cls._load_components(model, dtype, local_files_only=True)
            except _LOAD_ERRORS as local_error:
                where = f"the Hugging Face cache ({_hf_cache_dir()})"
                if _hub_offline():
                    raise WeightsNotFound(
                        f"model {model!r} not found in {where} and HF_HUB_OFFLINE is set; {gated(model)}"
                    ) from local_error
                try:
                    parts = cls._load_components(model, dtype, local_files_only=False)
                except Exception as e:  # any failure of the download (network, licence not accepted, missing files)
                    raise WeightsNotFound(
                        f"model {model!r} not found in {where} and could not be downloaded ({_first_line(e)}); "
                        f"{gated(model)}"
                    ) from e
        return cls(**parts, device=device, precision=prec, model=model)

    @classmethod
    def _load_components(cls, model: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        kw: dict = {"local_files_only": local_files_only}
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return {
                "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler", **kw),
                "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw),
                "tokenizer_2": T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_2", **kw),
                "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype, **kw),
                "text_encoder_2": T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2", dtype=dtype, **kw),
                "vae": AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kw),
                "transformer": FluxTransformer2DModel.from_pretrained(
                    model, subfolder="transformer", torch_dtype=dtype, **kw
                ),
            }

    # ------------------------------------------------------------------ interface
    def info(self) -> BackendInfo:
        return BackendInfo(
            model=self.model,
            device=str(self.device),
            precision=self.precision,
            defaults=dict(KONTEXT_DEFAULTS),
            ignored_fields=list(IGNORED_FIELDS),
        )

    @torch.inference_mode()
    def edit_batch(self, items: Sequence[EditItem]) -> list[EditResult | Exception]:
        return super().edit_batch(items)

    def _group_key(self, p: _Prepared) -> tuple[int, int, int]:
        return (p.h, p.w, p.steps)

    # ------------------------------------------------------------------ the edit
    def model_size(self, H: int, W: int) -> tuple[int, int]:
        """The size an H x W render is edited at: each side the nearest multiple of `multiple` (16), at least one."""
        m = self.multiple
        return max(m, math.floor(H / m + 0.5) * m), max(m, math.floor(W / m + 0.5) * m)

    def draw_start(self, gen: torch.Generator, params: EditParams) -> tuple[int, int]:
        """(T, steps): T from `gen` (its first draw, as ip2p draws it), kept in [1, 999]; steps = diffusion_steps."""
        n_train = int(self.scheduler.config.num_train_timesteps)  # 1000
        lo = int(params.lower_bound * n_train + 1e-6)
        hi = int(params.upper_bound * n_train + 1e-6)
        T = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen).item())
        return min(max(T, 1), n_train - 1), max(1, int(params.diffusion_steps))

    def schedule(self, T: int, steps: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps [steps], sigmas [steps + 1]) of an edit at model size h x w, float32 on the CPU: the scheduler's
        own `set_timesteps(sigmas=start_sigmas(T, steps), mu=...)`, so they are the numbers the pipeline runs."""
        scheduler = copy.deepcopy(self.scheduler)
        seq_len = (h // self.multiple) * (w // self.multiple)
        mu = resolution_shift(seq_len, scheduler.config) if scheduler.config.use_dynamic_shifting else None
        scheduler.set_timesteps(sigmas=start_sigmas(T, steps), mu=mu)
        return scheduler.timesteps.float().cpu(), scheduler.sigmas.float().cpu()

    def _prepare(self, item: EditItem) -> _Prepared:
        _check_image("render", item.render)
        _check_image("original", item.original)
        if item.render.shape != item.original.shape:
            raise ValueError(f"render {item.render.shape} and original {item.original.shape} must have the same shape")
        H, W = item.render.shape[:2]
        h, w = self.model_size(H, W)
        gen = torch.Generator(device="cpu")
        seed = gen.seed() if item.params.seed is None else int(item.params.seed)
        gen.manual_seed(seed)
        T, steps = self.draw_start(gen, item.params)
        return _Prepared(item, H, W, h, w, seed, T, steps)

    def _run_group(self, preps: Sequence[_Prepared]) -> list[EditResult]:
        """Edits of one model size and step count, as one transformer call per step."""
        B = len(preps)
        h, w, steps = preps[0].h, preps[0].w, preps[0].steps
        lh, lw = h // self.vae_factor, w // self.vae_factor  # latent size
        gens = []
        for p in preps:  # fresh generators, replaying the start draw of _prepare
            gen = torch.Generator(device="cpu").manual_seed(p.seed)
            assert self.draw_start(gen, p.item.params)[0] == p.T
            gens.append(gen)

        renders = torch.cat([self._to_model_image(p.item.render, h, w) for p in preps])  # [B, 3, h, w] in [-1, 1]
        x0 = (self.vae.encode(renders).latent_dist.mode() - self.shift_factor) * self.scaling_factor  # [B, C, lh, lw]
        schedules = [self.schedule(p.T, steps, h, w) for p in preps]
        noised = []
        for i, (gen, (_, sigmas)) in enumerate(zip(gens, schedules)):
            noise = randn_tensor((1, *x0.shape[1:]), generator=gen, device=self.device, dtype=self.dtype)
            sigma0 = sigmas[0].to(self.device, self.dtype)
            noised.append(sigma0 * noise + (1.0 - sigma0) * x0[i : i + 1])  # x_sigma, [1, C, lh, lw]
        lat = pack(torch.cat(noised))  # [B, S, 4C]
        S = lat.shape[1]
        ref = self._references(preps, h, w)  # [B, S, 4C]
        img_ids = torch.cat(
            [position_ids(lh, lw, 0, self.device, self.dtype), position_ids(lh, lw, 1, self.device, self.dtype)]
        )  # [2S, 3]
        pooled, text = (torch.cat(x) for x in zip(*(self._text(p.item.params.instruction) for p in preps)))
        txt_ids = torch.zeros(text.shape[1], 3, device=self.device, dtype=self.text_encoder.dtype)  # [L, 3]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([float(p.item.params.guidance_scale) for p in preps], dtype=torch.float32)
            guidance = guidance.to(self.device)  # [B]
        timesteps = torch.stack([t for t, _ in schedules]).to(self.device)  # [B, steps]
        sigmas = torch.stack([s for _, s in schedules]).to(self.device)  # [B, steps + 1]

        for k in range(steps):
            if all(p.item.is_active is not None and not p.item.is_active() for p in preps):
                raise EditCancelled(
                    f"nobody waits for {'this edit' if B == 1 else f'these {B} edits'}; stopped after {k} of {steps} steps"
                )
            self.steps_run += 1
            velocity = self.transformer(
                hidden_states=torch.cat([lat, ref], dim=1),  # [B, 2S, 4C]: the edit's tokens, then the context's
                timestep=timesteps[:, k].to(self.dtype) / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=text,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0][:, :S]  # [B, S, 4C]
            dt = (sigmas[:, k + 1] - sigmas[:, k]).view(B, 1, 1)  # float32, negative
            lat = (lat.to(torch.float32) + dt * velocity).to(velocity.dtype)  # Euler, in float32 as the scheduler

        latents = unpack(lat, lh, lw) / self.scaling_factor + self.shift_factor  # [B, C, lh, lw]
        out = self.vae.decode(latents).sample  # [B, 3, h, w] in ~[-1, 1]
        out = (out * 0.5 + 0.5).clamp(0, 1).float()
        results: list[EditResult] = []
        for i, p in enumerate(preps):
            o = out[i : i + 1]
            if (h, w) != (p.H, p.W):
                o = F.interpolate(o, size=(p.H, p.W), mode="bilinear", align_corners=False).clamp(0, 1)
            if not torch.isfinite(o).all():
                raise RuntimeError(f"the edit produced non-finite values at precision {self.precision}")
            image = o[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)  # [H, W, 3]
            results.append(EditResult(image=np.ascontiguousarray(image), timestep=p.T))
        return results

    def _references(self, preps: Sequence[_Prepared], h: int, w: int) -> torch.Tensor:
        """Packed latents of each edit's original (VAE mode, shifted and scaled), [B, S, 4C]; those of cached
        originals come from an LRU."""
        found: list[torch.Tensor | None] = []
        missing: list[int] = []
        for p in preps:
            key = None if p.item.original_key is None else (p.item.original_key, h, w)
            cached = self._ref_cache.get(key) if key is not None else None
            if cached is not None:
                self._ref_cache.move_to_end(key)
            else:
                missing.append(len(found))
            found.append(cached)
        if missing:
            originals = torch.cat([self._to_model_image(preps[i].item.original, h, w) for i in missing])
            latents = (self.vae.encode(originals).latent_dist.mode() - self.shift_factor) * self.scaling_factor
            packed = pack(latents)  # [len(missing), S, 4C]
            self.ref_encodes += len(missing)
            for j, i in enumerate(missing):
                found[i] = packed[j : j + 1]
                if preps[i].item.original_key is not None:
                    self._ref_cache[(preps[i].item.original_key, h, w)] = found[i]
                    if len(self._ref_cache) > _REF_CACHE_SIZE:
                        self._ref_cache.popitem(last=False)
        return torch.cat(found)  # type: ignore[arg-type]

    def _text(self, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP pooled [1, Dp], T5 sequence [1, L, Dt]) of `instruction`, from a bounded LRU cache."""
        cached = self._text_cache.get(instruction)
        if cached is not None:
            self._text_cache.move_to_end(instruction)
            return cached
        ids = self.tokenizer(
            instruction,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.text_encoder(ids.to(self.device), output_hidden_states=False).pooler_output
        ids_2 = self.tokenizer_2(
            instruction,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        sequence = self.text_encoder_2(ids_2.to(self.device), output_hidden_states=False)[0]
        cached = (pooled.to(self.text_encoder.dtype), sequence.to(self.text_encoder_2.dtype))
        self.text_encodes += 1
        self._text_cache[instruction] = cached
        if len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return cached

    def optimize(self, channels_last: bool = False, compile: bool = False, cpu_offload: bool = False) -> None:
        """Memory options: cpu_offload keeps the weights in CPU memory, each module on the GPU while it runs;
        channels_last and compile are not offered for this transformer (RuntimeError)."""
        if channels_last or compile:
            raise RuntimeError("--channels-last and --compile are not offered by flux-kontext")
        if cpu_offload:
            if self.device.type != "cuda":
                raise RuntimeError(f"--cpu-offload needs a CUDA device, not {self.device}")
            from accelerate import cpu_offload as offload

            for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
                offload(module.to("cpu"), execution_device=self.device)
        self.options = {"channels_last": False, "compile": False, "cpu_offload": cpu_offload}

    # ------------------------------------------------------------------ helpers
    def _place(self, module: torch.nn.Module) -> Any:
        """Move to the device; cast only when needed."""
        module = module.to(self.device)
        if any(p.dtype != self.dtype for p in module.parameters()):
            module = module.to(dtype=self.dtype)
        return module.eval()

    def _to_model_image(self, img: np.ndarray, h: int, w: int) -> torch.Tensor:
        """[H, W, 3] uint8 (0..255) or float in [0, 1] -> [1, 3, h, w] in [-1, 1], in the model's dtype."""
        if img.dtype == np.uint8:
            x = torch.from_numpy(img.copy() if not img.flags.writeable else img).to(self.device)
            x = x.to(torch.float32).div_(255.0).permute(2, 0, 1)[None]  # [1, 3, H, W]
        else:
            x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None].to(self.device)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return (2.0 * x - 1.0).to(self.dtype)


def make_backend(model: str, device: str, precision: str, seed: int, options: Any | None = None) -> EditBackend:
    """Registry factory: load `model` (a hub id in the cache or downloadable, or a local diffusers folder) in bf16,
    whatever `precision` (logged when another was asked for); `seed` is unused."""
    from . import (
        DEFAULT_IP2P_MODEL,
        BackendUnavailable,
        apply_torch_options,
        check_device_available,
        check_torch_options,
    )

    check_device_available(device)
    check_torch_options(device, options)
    if not model or model == DEFAULT_IP2P_MODEL:  # the server's --model default is IP2P's: Kontext's own here
        model = DEFAULT_FLUX_KONTEXT_MODEL
    try:
        backend = FluxKontextBackend.from_pretrained(model, device, served_precision(precision))
    except WeightsNotFound as e:
        lines = str(e).strip().splitlines()
        raise BackendUnavailable(lines[0] if lines else "FLUX.1 Kontext weights not found") from e
    return apply_torch_options(backend, options)
