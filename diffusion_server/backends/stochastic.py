"""The `stochastic` backend: a stand-in for InstructPix2Pix that is random the way diffusion is.

IP2P, given the same instruction, edits two views of one scene differently: it
samples one of many plausible results. The Iterative Dataset Update (IDU) is
what makes the edits agree, because each edit starts from a *noised render* of
the NeRF, and a diffusion model is mode-seeking: it tends to complete an image
into the result the image already resembles. This backend has exactly these
two properties, with none of the cost, so the claim can be tested offline
(bench/consistency.py, tests/test_consistency.py).

The model, for one call edit(render r, original o, params):

1. **Looks.** K target looks (default K = 3), each a colour gain applied to the
   original: look_k(o) = o * g_k per channel. Default gains: 1.0 on one
   channel, 0.5 on the two others (a red, a green and a blue tint). They are
   symmetric: the original itself is equally far from every look, so without a
   render to follow each look is equally likely.
2. **Colour statistics.** stats(x | o) = log(mean_c(x) / mean_c(o)), c = R, G, B:
   the per-channel log gain of an image relative to the original of its view
   (0 for the original, log g_k for look k, whatever the view shows).
3. **Noise.** A timestep T is drawn uniformly from
   [lower_bound * 1000, upper_bound * 1000] and the render is noised as a
   diffusion model would: z = sqrt(abar_T) * (2r - 1) + sqrt(1 - abar_T) * eps,
   eps ~ N(0, 1) per pixel, abar_T from Stable Diffusion's schedule (scaled
   linear betas 0.00085..0.012 over 1000 steps).
4. **Mode seeking.** What the model "sees" of the render's colour is the
   per-channel mean of the clean-image estimate (z / sqrt(abar_T) + 1) / 2
   (unbiased; its noise grows with T, so at large T the render is barely seen).
   The noise lives in a latent of fixed size, `seen_pixels` values per channel
   (default 4096: Stable Diffusion's 64x64 latent of a 512x512 image), not in
   the render's pixels: how much of the render the model sees depends on T,
   not on the image size (a 32x32 test image is seen as well as a 512x512
   photo). The mean of seen_pixels independent noise values is drawn directly:
   mean_c(r) + sqrt((1 - abar_T) / abar_T) / 2 * N(0, 1) / sqrt(seen_pixels).
   seen_pixels=None puts the noise on the render's own pixels instead.
   d_k = || stats(seen | o) - log g_k ||, and look k is drawn with probability
   softmax(-d_k / temperature) (default temperature 0.25). A render that is
   already look k gets look k with probability ~0.96; the original, 1/K each.
5. **Output.** A blend of the render toward the chosen look, stronger at larger
   T (as IP2P keeps more of the render at small T):
   out = (1 - s) * r + s * look_k(o), s = T / 1000; clipped to [0, 1].

Randomness (T, eps, the look) comes from a numpy Generator seeded by
params.seed when given (the same call then gives the same result); otherwise
from the backend's own Generator (seeded at construction). `last_choice` holds
(look index, T, probabilities) of the latest call, for tests and diagnostics.
The instruction is accepted whatever it says (the looks are the "edit").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffusion_server.backends.base import BackendInfo, EditBackend, EditParams, EditRejected, EditResult

NUM_TRAIN_TIMESTEPS = 1000
_EPS = 1e-4

DEFAULT_GAINS: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.5, 0.5),  # red tint
    (0.5, 1.0, 0.5),  # green tint
    (0.5, 0.5, 1.0),  # blue tint
)
DEFAULT_LOOK_NAMES: tuple[str, ...] = ("red", "green", "blue")


def alphas_cumprod(num_steps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """abar_t of Stable Diffusion's scaled-linear schedule (betas 0.00085..0.012), [num_steps] float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, num_steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def color_stats(image: np.ndarray, original: np.ndarray) -> np.ndarray:
    """Per-channel log gain of `image` relative to `original` ([..., H, W, 3] each): [..., 3] float64."""
    mean = np.asarray(image, dtype=np.float64).mean(axis=(-3, -2))
    ref = np.asarray(original, dtype=np.float64).mean(axis=(-3, -2))
    return np.log(np.maximum(mean, _EPS)) - np.log(np.maximum(ref, _EPS))


@dataclass
class LookChoice:
    """What the latest edit chose (for tests and diagnostics)."""

    look: int
    timestep: int
    probabilities: np.ndarray


class StochasticLookBackend(EditBackend):
    """Picks one of K colour looks per call, preferring the look the noised render already has."""

    name = "stochastic"

    def __init__(
        self,
        gains: Sequence[Sequence[float]] = DEFAULT_GAINS,
        names: Sequence[str] | None = None,
        temperature: float = 0.25,
        seed: int | None = None,
        seen_pixels: int | None = 4096,
    ) -> None:
        gains_array = np.asarray(gains, dtype=np.float64)
        if gains_array.ndim != 2 or gains_array.shape[1] != 3 or len(gains_array) < 2:
            raise ValueError(f"gains must be [K, 3] with K >= 2, got shape {gains_array.shape}")
        if not (gains_array > 0).all() or not (gains_array <= 1).all():
            raise ValueError("gains must be in (0, 1] (a look must not clip the original)")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if seen_pixels is not None and seen_pixels < 1:
            raise ValueError(f"seen_pixels must be a positive count or None, got {seen_pixels}")
        self.seen_pixels = seen_pixels
        self.gains = gains_array
        self.look_stats = np.log(gains_array)  # [K, 3]: stats(look_k(o) | o) for every o
        default_names = DEFAULT_LOOK_NAMES if len(gains_array) == len(DEFAULT_LOOK_NAMES) else ()
        self.names = (
            list(names) if names is not None else (list(default_names) or [f"look{k}" for k in range(len(gains_array))])
        )
        if len(self.names) != len(gains_array):
            raise ValueError(f"{len(self.names)} names for {len(gains_array)} looks")
        self.temperature = float(temperature)
        self.alphas_cumprod = alphas_cumprod()
        self._rng = np.random.default_rng(seed)
        self.last_choice: LookChoice | None = None

    @property
    def num_looks(self) -> int:
        return len(self.gains)

    def info(self) -> BackendInfo:
        looks = ", ".join(f"{n} {tuple(float(x) for x in g)}" for n, g in zip(self.names, self.gains))
        return BackendInfo(
            model=f"stochastic looks (K={self.num_looks}, temperature {self.temperature:g}, seen pixels {self.seen_pixels}): {looks}",
            device="cpu",
            precision="fp64",
            known_instructions=[],
        )

    def look(self, original: np.ndarray, k: int) -> np.ndarray:
        """Target look k of an original image: [H, W, 3] float32 in [0, 1]."""
        return (np.asarray(original, dtype=np.float32) * self.gains[k].astype(np.float32)).clip(0.0, 1.0)

    def probabilities(self, seen_stats: np.ndarray) -> np.ndarray:
        """Softmax over looks of -distance(seen_stats, look stats) / temperature: [K]."""
        d = np.linalg.norm(self.look_stats - np.asarray(seen_stats, dtype=np.float64)[None, :], axis=1)
        logits = -d / self.temperature
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        if render.shape != original.shape or render.ndim != 3 or render.shape[-1] != 3:
            raise EditRejected(
                f"render {tuple(render.shape)} and original {tuple(original.shape)} must both be [H, W, 3]"
            )
        rng = np.random.default_rng(params.seed) if params.seed is not None else self._rng
        lo = round(params.lower_bound * NUM_TRAIN_TIMESTEPS)
        hi = max(lo, min(round(params.upper_bound * NUM_TRAIN_TIMESTEPS), NUM_TRAIN_TIMESTEPS - 1))
        t = int(rng.integers(lo, hi + 1))
        abar = float(self.alphas_cumprod[t])
        r = np.asarray(render, dtype=np.float64)
        if self.seen_pixels is None:  # noise on every pixel of the render
            noised = np.sqrt(abar) * (2.0 * r - 1.0) + np.sqrt(1.0 - abar) * rng.standard_normal(r.shape)
            seen = (noised / np.sqrt(abar) + 1.0) / 2.0  # unbiased estimate of the render, noisier at larger t
        else:  # the channel means of that estimate over a latent of seen_pixels values: [1, 1, 3]
            noise_sd = np.sqrt((1.0 - abar) / abar) / 2.0 / np.sqrt(self.seen_pixels)
            seen = (r.mean(axis=(0, 1)) + noise_sd * rng.standard_normal(3))[None, None, :]
        p = self.probabilities(color_stats(seen, original))
        k = int(rng.choice(self.num_looks, p=p))
        s = t / NUM_TRAIN_TIMESTEPS
        out = ((1.0 - s) * r + s * self.look(original, k)).clip(0.0, 1.0).astype(np.float32)
        self.last_choice = LookChoice(look=k, timestep=t, probabilities=p)
        return EditResult(image=out, timestep=t)


def make_backend(model: str, device: str, precision: str, seed: int, options: object | None = None) -> EditBackend:
    """Registry factory: runs on the CPU, `seed` seeds unseeded calls; model and precision are ignored."""
    from diffusion_server.backends import no_torch_options

    no_torch_options("stochastic", options)  # type: ignore[arg-type]
    return StochasticLookBackend(seed=seed)
