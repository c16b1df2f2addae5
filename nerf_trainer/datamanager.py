"""The in2n data manager: all training images in one buffer that edits are swapped into.

nerfstudio's VanillaDataManager re-reads its cached batch every step; here the
batch is taken once, sorted so that buffer row i holds camera i, and kept as
`images` ([N, H, W, 3] float32). The captured images stay aside, unchanged, in
`original_images`: they are the image conditioning of every edit. Rays are
sampled from the current buffer at every step, so supervision mixes edited
and not yet edited views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple, Type

import torch
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig


@dataclass
class In2nDataManagerConfig(VanillaDataManagerConfig):
    """Training images in a swappable buffer, originals kept aside."""

    _target: Type = field(default_factory=lambda: In2nDataManager)
    """Target class to instantiate."""
    dataparser: NerfstudioDataParserConfig = field(default_factory=NerfstudioDataParserConfig)
    """Reads the scene (nerfstudio format: transforms.json and images)."""


class In2nDataManager(VanillaDataManager):
    """Samples rays from a buffer of training images that edits replace, view by view."""

    config: In2nDataManagerConfig

    def setup_train(self) -> None:
        super().setup_train()
        batch = next(self.iter_train_image_dataloader)
        if not isinstance(batch["image"], torch.Tensor):
            raise ValueError("in2n needs all training images at one resolution (got images of several sizes)")
        order = torch.argsort(batch["image_idx"])
        self.image_batch: Dict[str, torch.Tensor] = {
            "image": batch["image"][order][..., :3].contiguous(),  # [N, H, W, 3] float32 in [0, 1]
            "image_idx": batch["image_idx"][order],  # [N], equal to arange(N)
        }
        self.original_images = self.image_batch["image"].clone()  # [N, H, W, 3], never written

    @property
    def images(self) -> torch.Tensor:
        """The current training images, [N, H, W, 3] float32; row i is camera i."""
        return self.image_batch["image"]

    @property
    def num_views(self) -> int:
        return self.images.shape[0]

    def swap_image(self, view: int, image: torch.Tensor) -> None:
        """Replace view `view`'s training image with `image` ([H, W, 3] float in [0, 1]), in one copy."""
        if image.shape != self.images.shape[1:]:
            raise ValueError(f"image for view {view} has shape {tuple(image.shape)}, expected {tuple(self.images.shape[1:])}")
        self.images[view].copy_(image)

    def next_train(self, step: int) -> Tuple[RayBundle, Dict]:
        self.train_count += 1
        assert self.train_pixel_sampler is not None
        batch = self.train_pixel_sampler.sample(self.image_batch)
        ray_bundle = self.train_ray_generator(batch["indices"])
        return ray_bundle, batch
