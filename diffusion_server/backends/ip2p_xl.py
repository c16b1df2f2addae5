"""InstructPix2Pix on Stable Diffusion XL (`--backend ip2p-xl`), the same Instruct-NeRF2NeRF edit.

Components of diffusers' StableDiffusionXLInstructPix2PixPipeline family (e.g.
`diffusers/sdxl-instructpix2pix-768`): a UNet with 8 input channels and SDXL's
"text_time" added conditioning, an AutoencoderKL, two CLIP text encoders
(CLIPTextModel and CLIPTextModelWithProjection) with their tokenizers. The edit
is `Ip2pBackend`'s (DDIM over [0, T), the render noised at t0, that schedule's
first timestep; 3-way guidance, batching, cached conditioning latents) with
SDXL's conditioning, as that pipeline builds it:

- text: the penultimate hidden states of both encoders, concatenated on
  features; the pooled (projected) output of the second encoder;
- the empty prompt is all zeros (embeddings and pooled) when the model says
  `force_zeros_for_empty_prompt` (the default), else the encoded "";
- time ids: (height, width, 0, 0, height, width) of the image the VAE sees;
- a VAE marked `force_upcast` runs in fp32 when the rest runs in fp16.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .base import EditBackend
from .ip2p import Ip2pBackend, WeightsNotFound, _Prepared

DEFAULT_XL_MODEL = "diffusers/sdxl-instructpix2pix-768"


class Ip2pXlBackend(Ip2pBackend):
    """InstructPix2Pix-XL with DDIM, Instruct-NeRF2NeRF style."""

    DEFAULT_MODEL = DEFAULT_XL_MODEL
    name = "ip2p-xl"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer_2: CLIPTokenizer,
        scheduler: DDIMScheduler,
        device: str = "cpu",
        precision: str = "auto",
        model: str = "",
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise ValueError(
                "unet has no SDXL 'text_time' added conditioning; this is not an SDXL model (use --backend ip2p)"
            )
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, device=device, precision=precision, model=model)
        self.text_encoder_2 = self._place(text_encoder_2)
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        if self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            self.vae = self.vae.to(dtype=torch.float32)
            self.vae_dtype = torch.float32
        self._pooled_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # ------------------------------------------------------------------ loading
    @classmethod
    def _load_components_unfiltered(cls, model: str, dtype: torch.dtype, local_files_only: bool) -> dict:
        parts = super()._load_components_unfiltered(model, dtype, local_files_only)
        kw: dict = {"local_files_only": local_files_only}
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **kw)
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", **kw)
        index = os.path.join(model, "model_index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                parts["force_zeros_for_empty_prompt"] = bool(json.load(f).get("force_zeros_for_empty_prompt", True))
        return parts

    # ------------------------------------------------------------------ conditioning
    def _encode_text(self, text: str) -> torch.Tensor:
        """[1, 77, D1 + D2]: penultimate hidden states of both encoders; the pooled output is kept aside."""
        states = []
        pooled: torch.Tensor | None = None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(
                text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds [1, P]
                pooled = out[0]
            states.append(out.hidden_states[-2])
        assert pooled is not None, "text_encoder_2 must be a CLIPTextModelWithProjection"
        self._pooled_cache[text] = pooled.to(self.dtype)
        while len(self._pooled_cache) > 256:
            self._pooled_cache.popitem(last=False)
        return torch.cat(states, dim=-1).to(self.dtype)

    def _pooled(self, text: str) -> torch.Tensor:
        if text not in self._pooled_cache:
            self._encode_text(text)
        return self._pooled_cache[text]

    def _empty_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.force_zeros_for_empty_prompt:
            reference = self._text_embedding("")  # shapes only
            return torch.zeros_like(reference), torch.zeros_like(self._pooled(""))
        return self._text_embedding(""), self._pooled("")

    def _unet_conditioning(self, preps: Sequence[_Prepared], h8: int, w8: int) -> tuple[torch.Tensor, dict[str, Any]]:
        B = len(preps)
        empty, empty_pooled = self._empty_pair()
        texts = [p.item.params.instruction for p in preps]
        embeds = torch.cat([self._text_embedding(t) for t in texts])  # [B, 77, D]
        pooled = torch.cat([self._pooled(t) for t in texts])  # [B, P]
        hidden = torch.cat([embeds, empty.expand(B, -1, -1), empty.expand(B, -1, -1)])  # [3B, 77, D]
        text_embeds = torch.cat([pooled, empty_pooled.expand(B, -1), empty_pooled.expand(B, -1)])  # [3B, P]
        time_ids = torch.tensor([[h8, w8, 0, 0, h8, w8]], dtype=self.dtype, device=self.device).expand(3 * B, -1)
        return hidden, {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


def make_backend(model: str, device: str, precision: str, seed: int, options: Any = None) -> EditBackend:
    """Registry factory: load `model` (default DEFAULT_XL_MODEL when empty or the ip2p default)."""
    from . import BackendUnavailable, apply_torch_options, check_device_available, check_torch_options

    check_device_available(device)
    check_torch_options(device, options)
    if not model or model == Ip2pBackend.DEFAULT_MODEL:
        model = DEFAULT_XL_MODEL
    try:
        backend = Ip2pXlBackend.from_pretrained(model, device, precision)
    except WeightsNotFound as e:
        raise BackendUnavailable(
            str(e).strip().splitlines()[0] if str(e).strip() else "ip2p-xl weights not found"
        ) from e
    return apply_torch_options(backend, options)
