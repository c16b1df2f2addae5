"""InstructPix2Pix editing backend: one Instruct-NeRF2NeRF edit per call.

Built from the diffusers components of an IP2P model (UNet with 8 input
channels, AutoencoderKL, CLIP text encoder and tokenizer) and a DDIM scheduler.
`edit` follows docs/method.md, "One edit (the IP2P call)":

1. T ~ uniform integer in [int(lower_bound * 1000), int(upper_bound * 1000)], kept in
   [1, 999] (an index of the noise schedule); at most T steps are run.
2. The DDIM schedule over [0, T): the scheduler's 1000-step noise schedule is
   kept, and its "leading" spacing is applied to T instead of 1000 (config
   num_train_timesteps := T on a per-call copy, as the reference does), giving
   timesteps k * (T // n) + steps_offset, k = n-1 .. 0; the first, t0, is at most T.
3. z = VAE(render).sample * scaling_factor, noised to t0, the schedule's first
   timestep, so the noise level of the start latents is the one the UNet is
   first told (as the reference does).
4. c = VAE(original).mode, the image conditioning (unscaled, as IP2P does).
5. The `diffusion_steps` DDIM steps of that schedule. Each step runs the UNet
   on 3 copies: (text, c), (empty, c), (empty, 0) and combines
   uncond + g * (text_image - image) + g_img * (image - uncond).
6. Decode z / scaling_factor, map [-1, 1] -> [0, 1], clamp.

Randomness, all from one CPU torch.Generator (seeded by `params.seed` when
given, so a seed draws the same numbers on any device, the numbers
`torch.manual_seed(seed)` gives), in this order: T (torch.randint), the VAE
posterior sample, the noise added at t0.

Batching (`edit_batch`): edits with the same latent size and the same number of
steps run as one UNet call per step (3 x batch rows), each with its own
generator, timestep schedule (its own T), text embedding and guidance scales;
one DDIM update moves all of them per step (per-row coefficients from each
edit's own timesteps, as diffusers' DDIMScheduler.step computes them), with no
Python loop over the edits. An edit gives the same numbers
batched or alone (up to float rounding of the batched kernels). `edit` is a
batch of one. The conditioning latents of an original the server caches
(`EditItem.original_key`) are computed once and kept in a bounded LRU.
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
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from . import DEFAULT_IP2P_MODEL, resolve_device, resolve_precision
from .base import BackendInfo, EditBackend, EditCancelled, EditItem, EditParams, EditResult, GroupedBatchBackend

try:  # not an OSError in huggingface_hub >= 1.0
    from huggingface_hub.errors import EntryNotFoundError as _EntryNotFound
except ImportError:  # pragma: no cover - older huggingface_hub
    _EntryNotFound = OSError

# What a failed load from local files raises (missing folder, file, cache entry, bad config).
_LOAD_ERRORS = (OSError, ValueError, _EntryNotFound)

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TEXT_CACHE_SIZE = 64
_COND_CACHE_SIZE = 512


class WeightsNotFound(RuntimeError):
    """The model's weights are neither in the given folder nor in the Hugging Face cache
    (and could not, or may not, be downloaded)."""


REFERENCE_DDIM_SETTINGS: dict[str, Any] = {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
"""What the reference's DDIM has (built from Stable Diffusion's scheduler config): no x0 clipping (latent
diffusion), the last step to alphas_cumprod[0] rather than 1, timesteps k * (T // n) + 1."""


def ddim_from_config(config: Any) -> DDIMScheduler:
    """A DDIM scheduler with the noise schedule of `config` (any diffusers scheduler's config).

    The settings of `REFERENCE_DDIM_SETTINGS` that the config does not give (absent, or filled in with its
    class's default: diffusers lists those in `_use_default_values`) take the reference's values, not
    DDIM's defaults (clip_sample=True, set_alpha_to_one=True, steps_offset=0: another last step and every
    timestep one lower).
    """
    defaulted = set(config.get("_use_default_values", None) or ())
    overrides = {k: v for k, v in REFERENCE_DDIM_SETTINGS.items() if k not in config or k in defaulted}
    return DDIMScheduler.from_config(config, **overrides)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(model: str) -> bool:
    """True for strings that cannot be a hub id ('owner/name' or 'name')."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or model.endswith(("/", os.sep))
        or model.count("/") > 1
        or os.sep != "/"
        and os.sep in model
    )


@dataclass
class _Prepared:
    """An edit checked and sized, with the numbers that decide its batch group."""

    item: EditItem
    H: int
    W: int
    h8: int
    w8: int
    seed: int  # the generator's seed (drawn at random when params.seed is None)
    T: int
    steps: int


class Ip2pBackend(GroupedBatchBackend):
    """InstructPix2Pix with DDIM, Instruct-NeRF2NeRF style (edits start from the noised render)."""

    DEFAULT_MODEL = DEFAULT_IP2P_MODEL
    name = "ip2p"
    default_max_batch = 8  # --max-batch when not given: what is queued, up to 8 edits, runs as one batch
    accepts_uint8 = True  # uint8 images go to the device as they are and are converted there

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDIMScheduler,
        device: str = "cpu",
        precision: str = "auto",
        model: str = "",
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        if not isinstance(scheduler, DDIMScheduler):  # e.g. the Euler scheduler IP2P ships with
            scheduler = ddim_from_config(scheduler.config)
        cfg = scheduler.config
        if (
            cfg.get("prediction_type", "epsilon") != "epsilon"
            or cfg.get("thresholding", False)
            or cfg.get("clip_sample", False)
        ):
            raise ValueError(
                "scheduler: the batched DDIM update needs prediction_type='epsilon', no thresholding and no clip_sample "
                f"(got {cfg.get('prediction_type')!r}, {cfg.get('thresholding')!r}, {cfg.get('clip_sample')!r})"
            )
        if self.precision == "fp16" and self.device.type == "cpu":
            logger.warning("precision fp16 on the CPU is very slow; use fp32 or bf16 there")
        in_ch = unet.config.in_channels
        lat_ch = vae.config.latent_channels
        if in_ch != 2 * lat_ch:
            raise ValueError(f"unet has {in_ch} input channels; IP2P needs 2 x {lat_ch} (VAE latent channels)")
        self.model = model
        self.unet = self._place(unet)
        self.vae = self._place(vae)
        self.text_encoder = self._place(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # never stepped itself: each edit works on a copy
        self.vae_dtype = self.dtype  # the VAE's own precision (ip2p-xl keeps an fp16-unsafe VAE in fp32)
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._empty_embedding: torch.Tensor | None = None
        self._cond_cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.cond_encodes = 0  # originals encoded by the VAE (cache misses), for tests
        self.unet_steps_run = 0  # denoising steps run (one UNet call each), for tests
        self.options: dict[str, bool] = {}
        try:
            from diffusers.models.attention_processor import AttnProcessor2_0

            processors = list(self.unet.attn_processors.values())
            self.attention = (
                "sdpa" if processors and all(isinstance(p, AttnProcessor2_0) for p in processors) else "other"
            )
        except Exception:  # noqa: BLE001 - informational only
            self.attention = "unknown"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, device: str = "cpu", precision: str = "auto") -> Ip2pBackend:
        """Load an IP2P model in diffusers format from a local folder or a hub id.

        Local files come first (the folder, or the Hugging Face cache for a hub id);
        the hub is tried only when that fails and HF_HUB_OFFLINE is not set.
        Raises WeightsNotFound (one line: what, where, what to do) when absent.
        """
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be a hub id or a folder path, got {model!r}")
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        folder_hint = "pass --model a folder in diffusers format (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"

        def advice(hub_id: str) -> str:
            return f"download it with `hf download {hub_id}` (`huggingface-cli download` on older huggingface_hub) or {folder_hint}"

        dtype = PRECISIONS[prec]
        if os.path.isdir(model):
            try:
                parts = cls._load_components(model, dtype, local_files_only=True)
            except _LOAD_ERRORS as e:
                raise WeightsNotFound(
                    f"folder {model!r} is not a complete diffusers InstructPix2Pix model ({_first_line(e)}); "
                    f"{folder_hint}, or a hub id such as {cls.DEFAULT_MODEL}"
                ) from e
        elif os.path.exists(model) or _looks_like_path(model):
            raise WeightsNotFound(
                f"model folder {model!r} does not exist; check the path, or pass --model {cls.DEFAULT_MODEL} "
                f"(fetch it first with `hf download {cls.DEFAULT_MODEL}` where the machine is offline)"
            )
        else:
            try:
                parts = cls._load_components(model, dtype, local_files_only=True)
            except _LOAD_ERRORS as local_error:
                where = f"the Hugging Face cache ({_hf_cache_dir()})"
                if _hub_offline():
                    raise WeightsNotFound(
                        f"model {model!r} not found in {where} and HF_HUB_OFFLINE is set; {advice(model)}"
                    ) from local_error
                try:
                    parts = cls._load_components(model, dtype, local_files_only=False)
                except Exception as e:  # any failure of the download (network, auth, missing files)
                    raise WeightsNotFound(
                        f"model {model!r} not found in {where} and could not be downloaded ({_first_line(e)}); "
                        f"{advice(model)}"
                    ) from e
        return cls(**parts, device=device, precision=prec, model=model)

    @classmethod
    def _load_components(cls, model: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        with warnings.catch_warnings():  # diffusers passes an argument huggingface_hub deprecated
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            return cls._load_components_unfiltered(model, dtype, local_files_only)

    @classmethod
    def _load_components_unfiltered(cls, model: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        kw: dict = {"local_files_only": local_files_only}
        return {
            "scheduler": ddim_from_config(DDIMScheduler.load_config(model, subfolder="scheduler", **kw)),
            "tokenizer": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw),  # cast later
            "vae": AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kw),
            "unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kw),
        }

    # ------------------------------------------------------------------ interface
    def info(self) -> BackendInfo:
        return BackendInfo(model=self.model, device=str(self.device), precision=self.precision)

    @torch.inference_mode()
    def edit_batch(self, items: Sequence[EditItem]) -> list[EditResult | Exception]:
        return super().edit_batch(items)

    def _group_key(self, p: _Prepared) -> tuple[int, int, int]:
        return (p.h8, p.w8, p.steps)

    def _draw_timestep(self, gen: torch.Generator, params: EditParams) -> tuple[int, int]:
        """(T, steps): T from `gen` (its first draw), steps = min(diffusion_steps, T)."""
        n_train = int(self.scheduler.config.num_train_timesteps)  # 1000
        lo = int(params.lower_bound * n_train + 1e-6)
        hi = int(params.upper_bound * n_train + 1e-6)
        T = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen).item())
        T = min(max(T, 1), n_train - 1)  # a valid index of the noise schedule
        return T, max(1, min(int(params.diffusion_steps), T))

    def _prepare(self, item: EditItem) -> _Prepared:
        _check_image("render", item.render)
        _check_image("original", item.original)
        if item.render.shape != item.original.shape:
            raise ValueError(f"render {item.render.shape} and original {item.original.shape} must have the same shape")
        H, W = item.render.shape[:2]
        h8, w8 = self._vae_size(H, W)
        gen = torch.Generator(device="cpu")
        seed = gen.seed() if item.params.seed is None else int(item.params.seed)
        gen.manual_seed(seed)
        T, steps = self._draw_timestep(gen, item.params)
        return _Prepared(item, H, W, h8, w8, seed, T, steps)

    def _run_group(self, preps: Sequence[_Prepared]) -> list[EditResult]:
        """Edits of one size and step count, as one UNet call per step."""
        B = len(preps)
        h8, w8, steps = preps[0].h8, preps[0].w8, preps[0].steps
        gens = []
        for p in preps:  # fresh generators, replaying the timestep draw of _prepare
            gen = torch.Generator(device="cpu").manual_seed(p.seed)
            T, _ = self._draw_timestep(gen, p.item.params)
            assert T == p.T
            gens.append(gen)

        renders = torch.cat([self._to_model_image(p.item.render, h8, w8) for p in preps])  # [B, 3, h8, w8] in [-1, 1]
        posterior = self.vae.encode(renders).latent_dist
        latents: list[torch.Tensor] = []
        timesteps = []  # per edit, [steps]
        strides = []
        for i, (p, gen) in enumerate(zip(preps, gens)):
            mean, std = posterior.mean[i : i + 1], posterior.std[i : i + 1]
            sample = randn_tensor(
                mean.shape, generator=gen, device=posterior.parameters.device, dtype=posterior.parameters.dtype
            )
            lat = ((mean + std * sample) * self.scaling_factor).to(self.dtype)  # [1, 4, h, w]
            noise = torch.randn(lat.shape, generator=gen, dtype=torch.float32).to(self.device, self.dtype)
            scheduler = copy.deepcopy(self.scheduler)
            scheduler.register_to_config(num_train_timesteps=p.T, timestep_spacing="leading")
            scheduler.set_timesteps(steps)  # timesteps k * (T // steps) + offset, k = steps-1 .. 0
            # Noise at the schedule's first timestep, the one the UNet is first told (not at T).
            latents.append(scheduler.add_noise(lat, noise, scheduler.timesteps[:1]))
            timesteps.append(scheduler.timesteps)
            strides.append(p.T // steps)  # DDIM's step back: t -> t - T // steps
        lat = torch.cat(latents)  # [B, 4, h, w]
        coef = self._ddim_coefficients(torch.stack(timesteps), torch.tensor(strides))  # [steps, 4, B, 1, 1, 1]
        t_rows = torch.stack(timesteps).T.repeat(1, 3).to(self.device)  # [steps, 3B], on the device once
        g_text = (
            torch.tensor([p.item.params.guidance_scale for p in preps]).view(B, 1, 1, 1).to(self.device, self.dtype)
        )
        g_image = (
            torch.tensor([p.item.params.image_guidance_scale for p in preps])
            .view(B, 1, 1, 1)
            .to(self.device, self.dtype)
        )

        image_latents = self._conditioning(preps, h8, w8).to(self.dtype)  # [B, 4, h, w]
        image_cond = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])  # [3B, 4, h, w]
        text_cond, unet_kwargs = self._unet_conditioning(preps, h8, w8)  # [3B, 77, D]

        for k in range(steps):
            if all(p.item.is_active is not None and not p.item.is_active() for p in preps):
                raise EditCancelled(
                    f"nobody waits for {'this edit' if B == 1 else f'these {B} edits'}; stopped after {k} of {steps} steps"
                )
            self.unet_steps_run += 1
            model_in = torch.cat([lat.repeat(3, 1, 1, 1), image_cond], dim=1)  # [3B, 8, h, w]
            eps = self.unet(model_in, t_rows[k], encoder_hidden_states=text_cond, **unet_kwargs).sample
            eps_text_image, eps_image, eps_uncond = eps.chunk(3)  # [B, 4, h, w] each
            guided = eps_uncond + g_text * (eps_text_image - eps_image) + g_image * (eps_image - eps_uncond)
            lat = self._ddim_step(guided, lat, coef, k)

        out = self.vae.decode((lat / self.scaling_factor).to(self.vae_dtype)).sample  # [B, 3, h8, w8] in ~[-1, 1]
        out = (out.float() / 2 + 0.5).clamp(0, 1)
        results: list[EditResult] = []
        for i, p in enumerate(preps):
            o = out[i : i + 1]
            if (h8, w8) != (p.H, p.W):
                o = F.interpolate(o, size=(p.H, p.W), mode="bilinear", align_corners=False).clamp(0, 1)
            if not torch.isfinite(o).all():
                raise RuntimeError(f"the edit produced non-finite values at precision {self.precision}; try fp32")
            image = o[0].permute(1, 2, 0).cpu().numpy().astype(np.float32)  # [H, W, 3]
            results.append(EditResult(image=np.ascontiguousarray(image), timestep=p.T))
        return results

    def _ddim_coefficients(self, timesteps: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) coefficients of every step of every edit, from the 1000-step noise schedule.

        timesteps [B, steps] (each edit's own schedule), strides [B] (T // steps). Returns
        [steps, 4, B, 1, 1, 1] in the latents' dtype on the device: sqrt(1 - abar_t), sqrt(abar_t),
        sqrt(abar_prev), sqrt(1 - abar_prev), computed in float32 as diffusers' DDIMScheduler.step
        does; abar_prev is that of t - stride, or final_alpha_cumprod when t - stride < 0.
        """
        abar = self.scheduler.alphas_cumprod.to(torch.float32)  # [1000]
        final = torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float32)
        prev = timesteps - strides[:, None]  # [B, steps]
        a_t = abar[timesteps]  # [B, steps]
        a_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)  # [B, steps]
        coef = torch.stack([(1 - a_t) ** 0.5, a_t**0.5, a_prev**0.5, (1 - a_prev) ** 0.5])  # [4, B, steps]
        return coef.permute(2, 0, 1)[..., None, None, None].to(self.device, self.dtype)  # [steps, 4, B, 1, 1, 1]

    @staticmethod
    def _ddim_step(eps: torch.Tensor, lat: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
        """Step k of DDIM (eta 0, epsilon prediction, no clipping) for all edits at once: [B, 4, h, w]."""
        sqrt_beta_t, sqrt_a_t, sqrt_a_prev, sqrt_beta_prev = coef[k]  # [B, 1, 1, 1] each
        x0 = (lat - sqrt_beta_t * eps) / sqrt_a_t  # predicted original latents
        return sqrt_a_prev * x0 + sqrt_beta_prev * eps

    def _unet_conditioning(self, preps: Sequence[_Prepared], h8: int, w8: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Text conditioning of the 3B UNet rows (text, empty, empty) and any other UNet arguments."""
        B = len(preps)
        empty = self._empty()
        texts = torch.cat([self._text_embedding(p.item.params.instruction) for p in preps])  # [B, 77, D]
        return torch.cat([texts] + [empty.expand(B, -1, -1)] * 2), {}

    def _conditioning(self, preps: Sequence[_Prepared], h8: int, w8: int) -> torch.Tensor:
        """VAE(original).mode of each edit, [B, 4, h, w]; those of cached originals come from an LRU."""
        found: list[torch.Tensor | None] = []
        missing: list[int] = []
        for i, p in enumerate(preps):
            key = None if p.item.original_key is None else (p.item.original_key, h8, w8)
            cached = self._cond_cache.get(key) if key is not None else None
            if cached is not None:
                self._cond_cache.move_to_end(key)
            else:
                missing.append(i)
            found.append(cached)
        if missing:
            originals = torch.cat([self._to_model_image(preps[i].item.original, h8, w8) for i in missing])
            encoded = self.vae.encode(originals).latent_dist.mode()
            self.cond_encodes += len(missing)
            for j, i in enumerate(missing):
                found[i] = encoded[j : j + 1]
                if preps[i].item.original_key is not None:
                    self._cond_cache[(preps[i].item.original_key, h8, w8)] = found[i]
                    if len(self._cond_cache) > _COND_CACHE_SIZE:
                        self._cond_cache.popitem(last=False)
        return torch.cat(found)  # type: ignore[arg-type]

    def optimize(
        self,
        channels_last: bool = False,
        compile: bool = False,
        cpu_offload: bool = False,
        compile_mode: str | None = None,
        warmup_side: int | None = None,
        compile_backend: str = "inductor",
    ) -> None:
        """Speed and memory options (all off by default); raises RuntimeError/ImportError when unusable.

        compile: torch.compile the UNet with static shapes (dynamic=False): one graph per
        (batch size, latent size), never a dynamic-shape one; the timestep goes in as a device
        tensor, so new timesteps, seeds, instructions and guidance scales never recompile. One
        warm-up edit at `warmup_side` pixels (default: the UNet's native size, sample_size x the
        VAE factor: 512 for Stable Diffusion 1.5) compiles batch 1 at start-up; each other batch
        size compiles once, on its first use. compile_mode: torch.compile's mode (None: default;
        "max-autotune" adds CUDA graphs); compile_backend: torch.compile's backend (tests use "eager").
        """
        if cpu_offload:
            if self.device.type != "cuda":
                raise RuntimeError(f"--cpu-offload needs a CUDA device, not {self.device}")
            from accelerate import cpu_offload as offload

            for module in (self.unet, self.vae, self.text_encoder):
                offload(module.to("cpu"), execution_device=self.device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            import torch._dynamo as dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # one graph per batch size: allow many
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
            self.unet = torch.compile(self.unet, dynamic=False, mode=compile_mode, backend=compile_backend)
            side = int(warmup_side or int(getattr(self.unet.config, "sample_size", 8) or 8) * self.vae_factor)
            rng = np.random.default_rng(0)
            probe = rng.random((side, side, 3), dtype=np.float32)
            self.edit(
                probe, probe, EditParams(instruction="warm-up", diffusion_steps=2, seed=0)
            )  # compiles now, fails now
        self.options = {"channels_last": channels_last, "compile": compile, "cpu_offload": cpu_offload}

    # ------------------------------------------------------------------ helpers
    def _place(self, module: torch.nn.Module) -> Any:
        """Move to the device; cast only when needed (diffusers warns on every dtype cast)."""
        module = module.to(self.device)
        if any(p.dtype != self.dtype for p in module.parameters()):
            module = module.to(dtype=self.dtype)
        return module.eval()

    def _vae_size(self, H: int, W: int) -> tuple[int, int]:
        """Nearest multiples of the VAE's downsampling factor (at least one factor)."""
        f = self.vae_factor
        return max(f, math.floor(H / f + 0.5) * f), max(f, math.floor(W / f + 0.5) * f)

    def _to_model_image(self, img: np.ndarray, h: int, w: int) -> torch.Tensor:
        """[H, W, 3] uint8 (0..255) or float in [0, 1] -> [1, 3, h, w] in [-1, 1] on the device."""
        if img.dtype == np.uint8:  # move the bytes, convert there: x / 255 in float32, as codec.to_float01
            x = torch.from_numpy(img.copy() if not img.flags.writeable else img).to(self.device)
            x = x.to(torch.float32).div_(255.0).permute(2, 0, 1)[None]  # [1, 3, H, W]
        else:
            x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1)[None].to(self.device)
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        return (x * 2 - 1).to(self.device, self.vae_dtype)

    def _encode_text(self, text: str) -> torch.Tensor:
        tok = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = (
            tok.attention_mask.to(self.device)
            if getattr(self.text_encoder.config, "use_attention_mask", False)
            else None
        )
        return self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)[0]  # [1, 77, D]

    def _text_embedding(self, instruction: str) -> torch.Tensor:
        """Embedding of `instruction`, from a bounded LRU cache."""
        emb = self._text_cache.get(instruction)
        if emb is None:
            emb = self._encode_text(instruction)
            self._text_cache[instruction] = emb
            if len(self._text_cache) > _TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        else:
            self._text_cache.move_to_end(instruction)
        return emb

    def _empty(self) -> torch.Tensor:
        """Embedding of the empty prompt, computed once."""
        if self._empty_embedding is None:
            self._empty_embedding = self._encode_text("")
        return self._empty_embedding


def _check_image(name: str, img: Any) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
        raise ValueError(f"{name} must be a [H, W, 3] numpy array, got {getattr(img, 'shape', type(img))}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - very old huggingface_hub
        return "~/.cache/huggingface/hub"


def make_backend(model: str, device: str, precision: str, seed: int, options: Any | None = None) -> EditBackend:
    """Registry factory: load `model` (a hub id already in the cache, or a local diffusers folder); `seed` is unused."""
    from . import BackendUnavailable, apply_torch_options, check_device_available, check_torch_options

    check_device_available(device)
    check_torch_options(device, options)
    try:
        backend = Ip2pBackend.from_pretrained(model, device, precision)
    except WeightsNotFound as e:
        raise BackendUnavailable(str(e).strip().splitlines()[0] if str(e).strip() else "ip2p weights not found") from e
    return apply_torch_options(backend, options)
