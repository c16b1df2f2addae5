"""Tests of the FLUX.1 Kontext backend on tiny random components (CPU, offline, fp32).

The reference is diffusers' own `FluxKontextInpaintPipeline` on the same components, called with
image = the render, image_reference = the original, an all-ones mask (nothing of the render is kept
by the per-step blend), strength 1.0 and `sigmas` = the backend's unshifted start schedule (the
pipeline shifts them by the same mu), guidance_scale = the request's, and a generator seeded with
the request's seed.

How one seed reproduces the pipeline's draws: the backend draws T first from a CPU generator
seeded with the request's seed (as ip2p does); the test seeds its own generator, makes the same
T draw, and hands that generator to the pipeline. In diffusers 0.42.1 the pipeline encodes both
the render and the reference with the VAE's *mode* (`sample_mode="argmax"`: no draw); its first
draw is the noise (`randn_tensor`, the shape of the render's latents), which the backend draws
next with the same call; the pipeline's one later draw (the VAE sample of the masked image, all
masked out) changes nothing. Order matters: a draw between T and the noise would shift the noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxKontextInpaintPipeline
from PIL import Image

from diffusion_server.backends import BackendUnavailable, create_backend
from diffusion_server.backends.base import EditItem
from diffusion_server.backends.flux_kontext import FluxKontextBackend, WeightsNotFound, start_sigmas
from diffusion_server.backends.tiny_flux_kontext import build_tiny_flux_kontext, save_tiny_flux_kontext
from in2n_contract import EditParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op torch thread


@pytest.fixture(scope="module")
def backend() -> FluxKontextBackend:
    return build_tiny_flux_kontext(seed=0)


@pytest.fixture(scope="module")
def pipeline(backend: FluxKontextBackend) -> FluxKontextInpaintPipeline:
    pipe = FluxKontextInpaintPipeline(
        transformer=backend.transformer,
        vae=backend.vae,
        text_encoder=backend.text_encoder,
        tokenizer=backend.tokenizer,
        text_encoder_2=backend.text_encoder_2,
        tokenizer_2=backend.tokenizer_2,
        scheduler=backend.scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    render = rng.random((h, w, 3), dtype=np.float32)
    original = np.clip(render + rng.normal(0, 0.2, (h, w, 3)), 0, 1).astype(np.float32)
    return render, original


def _pipeline_edit(
    pipe: FluxKontextInpaintPipeline,
    backend: FluxKontextBackend,
    render: np.ndarray,
    original: np.ndarray,
    p: EditParams,
) -> tuple[np.ndarray, int]:
    """diffusers' pipeline, as the module docstring says; the render's size must be a multiple of 16."""
    H, W = render.shape[:2]
    generator = torch.Generator().manual_seed(p.seed)
    T, steps = backend.draw_start(generator, p)  # the seed's first draw: T
    as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None]  # [1, 3, H, W] in [0, 1]
    out = pipe(
        image=as_tensor(render),
        image_reference=as_tensor(original),
        mask_image=Image.new("L", (W, H), 255),  # all ones: repaint everything
        prompt=p.instruction,
        height=H,
        width=W,
        strength=1.0,
        sigmas=start_sigmas(T, steps),
        guidance_scale=p.guidance_scale,
        generator=generator,  # its next draw: the noise
        max_sequence_length=backend.max_sequence_length,
        output_type="pt",
        _auto_resize=False,
    ).images  # [1, 3, H, W] in [0, 1]
    return out[0].permute(1, 2, 0).numpy(), T


@pytest.mark.parametrize("hw,steps,seed", [((32, 32), 4, 11), ((48, 32), 7, 3)])
def test_matches_the_diffusers_pipeline(backend, pipeline, hw, steps, seed) -> None:
    render, original = _images(*hw, seed=seed)
    p = EditParams("turn it into a bronze statue", guidance_scale=3.5, diffusion_steps=steps, seed=seed)
    result = backend.edit(render, original, p)
    reference, T = _pipeline_edit(pipeline, backend, render, original, p)
    assert result.timestep == T and result.image.shape == (*hw, 3)
    assert reference.std() > 0.05  # a real image, not a constant
    np.testing.assert_allclose(result.image, reference, atol=1e-5, rtol=0)


def test_a_batch_of_different_start_levels_matches_the_pipeline(backend, pipeline) -> None:
    """One transformer call per step for the three edits, each with its own T, noise, schedule and guidance."""
    items, refs = [], []
    for k, seed in enumerate((21, 22, 23)):
        render, original = _images(32, 32, seed=seed)
        p = EditParams(f"make it red {k}", guidance_scale=2.0 + k, diffusion_steps=3, seed=seed, lower_bound=0.2)
        items.append(EditItem(render, original, p))
        refs.append(_pipeline_edit(pipeline, backend, render, original, p))
    before = backend.steps_run
    results = backend.edit_batch(items)
    assert backend.steps_run - before == 3  # one group: 3 steps for 3 edits
    assert len({T for _, T in refs}) == 3  # three start levels
    for result, (reference, T) in zip(results, refs):
        assert result.timestep == T
        np.testing.assert_allclose(result.image, reference, atol=1e-5, rtol=0)


def test_start_level_and_schedule(backend) -> None:
    """T / 1000 is the unshifted start time; the schedule runs exactly diffusion_steps Euler steps to 0, shifted
    by the resolution's mu (at t = 1 it is Kontext's own default schedule)."""
    timesteps, sigmas = backend.schedule(500, 4, 512, 512)
    assert len(timesteps) == 4 and len(sigmas) == 5 and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:])  # decreasing
    mu = 0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256)  # 1024 tokens at 512x512
    shifted = np.exp(mu) / (np.exp(mu) + (1 / 0.5 - 1))
    assert float(sigmas[0]) == pytest.approx(shifted, abs=1e-6)  # the start level sigma of T = 500
    _, full = backend.schedule(999, 28, 512, 512)
    pipe_default = np.linspace(1.0, 1 / 28, 28) * 0.999
    expected = np.exp(mu) / (np.exp(mu) + (1 / pipe_default - 1))
    np.testing.assert_allclose(full[:-1].numpy(), expected, atol=1e-6)
    for seed in range(6):
        p = EditParams("x", diffusion_steps=1, seed=seed, lower_bound=0.3, upper_bound=0.6)
        assert 300 <= backend.edit(*_images(16, 16), p).timestep <= 600


def test_any_size_is_edited_at_multiples_of_16_and_returned_at_its_own(backend) -> None:
    assert backend.multiple == 16
    assert backend.model_size(512, 384) == (512, 384)
    assert backend.model_size(37, 45) == (32, 48) and backend.model_size(5, 7) == (16, 16)
    p = EditParams("make it red", diffusion_steps=2, seed=4)
    render, original = _images(37, 45, seed=1)
    odd = backend.edit(render, original, p).image
    assert odd.shape == (37, 45, 3)

    def resized(x: np.ndarray, h: int, w: int) -> np.ndarray:  # the backend's bilinear resize
        t = torch.from_numpy(x).permute(2, 0, 1)[None]
        return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()

    at_model_size = backend.edit(resized(render, 32, 48), resized(original, 32, 48), p).image  # [32, 48, 3]
    np.testing.assert_allclose(odd, np.clip(resized(at_model_size, 37, 45), 0, 1), atol=1e-6, rtol=0)
    big = backend.edit(*_images(512, 384), EditParams("make it red", diffusion_steps=1, seed=1)).image
    assert big.shape == (512, 384, 3) and np.isfinite(big).all()


def test_info_ignored_field_and_caches(backend) -> None:
    info = backend.info()
    assert info.precision == "fp32" and info.ignored_fields == ["image_guidance_scale"]
    assert info.edit_defaults()["guidance_scale"] == 3.5 and info.edit_defaults()["diffusion_steps"] == 28
    render, original = _images(32, 32, seed=9)
    base = {"instruction": "make it a cached sepia", "diffusion_steps": 2, "seed": 2}
    texts, refs = backend.text_encodes, backend.ref_encodes
    a = backend.edit_batch([EditItem(render, original, EditParams(**base), original_key="view-9")])[0]
    b = backend.edit_batch(
        [EditItem(render, original, EditParams(**base, image_guidance_scale=9.0), original_key="view-9")]
    )[0]
    np.testing.assert_array_equal(a.image, b.image)  # image_guidance_scale changes nothing
    assert backend.text_encodes - texts == 1 and backend.ref_encodes - refs == 1  # each encoded once
    c = backend.edit(render, original, EditParams(**base, guidance_scale=9.0)).image
    assert np.abs(c - a.image).max() > 1e-4  # the embedded guidance matters


def test_save_then_from_pretrained_matches(tmp_path) -> None:
    """The real loading code (from_pretrained on a local folder, as for the hub's model) on the tiny model."""
    folder = save_tiny_flux_kontext(tmp_path / "tiny", seed=4)
    loaded = FluxKontextBackend.from_pretrained(folder, precision="fp32")
    built = build_tiny_flux_kontext(seed=4)
    assert loaded.info().model == folder
    render, original = _images(32, 32)
    p = EditParams("make it red", diffusion_steps=2, seed=9)
    loaded_edit, built_edit = loaded.edit(render, original, p).image, built.edit(render, original, p).image
    np.testing.assert_allclose(loaded_edit, built_edit, atol=1e-5, rtol=0)  # same weights (kernels may differ)
    served = create_backend("flux-kontext", model=folder, precision="fp32")  # the server's path: bf16 whatever asked
    assert served.info().precision == "bf16" and served.transformer.dtype == torch.bfloat16


def test_absent_weights_are_one_line_naming_what_to_do(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download in tests
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for model in (str(tmp_path / "nowhere"), "no-such-owner/no-such-kontext"):
        with pytest.raises(BackendUnavailable) as e:
            create_backend("flux-kontext", model=model)
        msg = str(e.value)
        assert "\n" not in msg and model in msg and "gated" in msg and "hf auth login" in msg and "--model" in msg
    (tmp_path / "incomplete").mkdir()
    with pytest.raises(WeightsNotFound, match="not a complete diffusers FLUX.1 Kontext model"):
        FluxKontextBackend.from_pretrained(str(tmp_path / "incomplete"))


def test_tiny_registry_backend_runs_bf16() -> None:
    tiny = create_backend("tiny-flux-kontext", seed=1)
    assert tiny.name == "tiny-flux-kontext" and tiny.info().precision == "bf16"
    out = tiny.edit(*_images(16, 16), EditParams("make it red", diffusion_steps=2, seed=1)).image
    assert out.shape == (16, 16, 3) and np.isfinite(out).all()


def test_uint8_images_are_edited_as_their_float_values(backend) -> None:
    """uint8 requests reach the backend as they travelled (accepts_uint8) and give the edit of x / 255."""
    render, original = (np.rint(x * 255).astype(np.uint8) for x in _images(32, 32, seed=6))
    render.flags.writeable = False  # as a view of the request's bytes
    p = EditParams("make it red", diffusion_steps=2, seed=2)
    from_uint8 = backend.edit(render, original, p).image
    from_float = backend.edit(render.astype(np.float32) / 255, original.astype(np.float32) / 255, p).image
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-6, rtol=0)
