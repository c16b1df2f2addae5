"""Tests of the InstructPix2Pix backend on a tiny random model (CPU, offline).

The `slow` test (deselected by default in pyproject.toml; run with `pytest -m slow`)
loads the real timbrooks/instruct-pix2pix and skips when it is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_server.backends.ip2p import Ip2pBackend, WeightsNotFound
from diffusion_server.backends.tiny_ip2p import build_tiny_ip2p
from in2n_contract import EditParams
from in2n_contract.codec import to_float01
from testing_support.ip2p_reference import reference_edit
from testing_support.tiny_ip2p import save_tiny_ip2p

FEW = 4  # diffusion steps where the count does not matter


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op torch thread


@pytest.fixture(scope="module")
def backend() -> Ip2pBackend:
    return build_tiny_ip2p(seed=0)


def _images(h: int = 32, w: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    render = rng.random((h, w, 3), dtype=np.float32)
    original = np.clip(render + rng.normal(0, 0.1, (h, w, 3)), 0, 1).astype(np.float32)
    return render, original


@pytest.mark.parametrize("hw", [(64, 64), (30, 46), (31, 45)])
def test_edit_shape_range_dtype(backend: Ip2pBackend, hw: tuple[int, int]) -> None:
    render, original = _images(*hw)
    res = backend.edit(render, original, EditParams("make it red", diffusion_steps=FEW, seed=3))
    assert res.image.shape == (*hw, 3)
    assert res.image.dtype == np.float32
    assert np.isfinite(res.image).all()
    assert res.image.min() >= 0.0 and res.image.max() <= 1.0


def test_resize_to_vae_multiple(backend: Ip2pBackend) -> None:
    assert backend.vae_factor == 2  # 2-block tiny VAE
    assert backend._vae_size(31, 45) == (32, 46)
    assert backend._vae_size(30, 46) == (30, 46)


def test_seed_reproducible_and_timestep_in_bounds(backend: Ip2pBackend) -> None:
    render, original = _images()
    p = EditParams("make it red", diffusion_steps=FEW, seed=7, lower_bound=0.3, upper_bound=0.6)
    a, b = backend.edit(render, original, p), backend.edit(render, original, p)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.timestep == b.timestep
    c = backend.edit(
        render, original, EditParams("make it red", diffusion_steps=FEW, seed=8, lower_bound=0.3, upper_bound=0.6)
    )
    assert not np.array_equal(a.image, c.image)
    small_r, small_o = _images(8, 8)
    for seed in range(8):
        p = EditParams("x", diffusion_steps=1, seed=seed, lower_bound=0.3, upper_bound=0.6)
        assert 300 <= backend.edit(small_r, small_o, p).timestep <= 600
    fixed = EditParams("x", diffusion_steps=1, seed=1, lower_bound=0.5, upper_bound=0.5)
    assert backend.edit(small_r, small_o, fixed).timestep == 500


def test_unseeded_edits_differ(backend: Ip2pBackend) -> None:
    render, original = _images()
    p = EditParams("make it red", diffusion_steps=FEW)
    assert not np.array_equal(backend.edit(render, original, p).image, backend.edit(render, original, p).image)


def _reference_edit(b: Ip2pBackend, render: np.ndarray, original: np.ndarray, p: EditParams) -> tuple[np.ndarray, int]:
    """The published procedure (testing_support/ip2p_reference.py, the GPU benchmark's anchor too)."""
    ref, T = reference_edit(b, render, original, p)
    n, stride = p.diffusion_steps, T // p.diffusion_steps  # the schedule the reference ran: leading spacing over T
    sched = DDIMScheduler.from_config(b.scheduler.config, num_train_timesteps=T)
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == [k * stride + 1 for k in reversed(range(n))]
    return ref, T


@pytest.mark.parametrize("steps,seed,hw", [(20, 11, (32, 32)), (7, 3, (32, 32)), (20, 4, (24, 40))])
def test_matches_independent_reference(backend: Ip2pBackend, steps: int, seed: int, hw: tuple[int, int]) -> None:
    render, original = _images(*hw, seed=5)
    p = EditParams("turn the sky red", guidance_scale=7.5, image_guidance_scale=1.5, diffusion_steps=steps, seed=seed)
    res = backend.edit(render, original, p)
    ref, T = _reference_edit(backend, render, original, p)
    assert res.timestep == T
    np.testing.assert_allclose(res.image, ref, atol=1e-5, rtol=0)


def test_batched_edits_match_the_reference(backend: Ip2pBackend) -> None:
    """In a batch, each edit keeps its own T, noise and schedule: each equals the reference run alone."""
    from diffusion_server.backends.base import EditItem

    items, refs = [], []
    for seed in (21, 22, 23):
        render, original = _images(32, 32, seed=seed)
        p = EditParams("turn the sky red", diffusion_steps=FEW, seed=seed, lower_bound=0.2, upper_bound=0.9)
        items.append(EditItem(render, original, p))
        refs.append(_reference_edit(backend, render, original, p))
    results = backend.edit_batch(items)
    assert len({T for _, T in refs}) > 1  # the batch mixes timestep schedules
    for res, (ref, T) in zip(results, refs):
        assert res.timestep == T
        np.testing.assert_allclose(res.image, ref, atol=1e-5, rtol=0)


def test_ddim_from_a_config_without_the_reference_settings_takes_them() -> None:
    """A scheduler config that leaves out clip_sample, set_alpha_to_one and steps_offset (absent, or filled in
    with its class's defaults) gives the reference's DDIM, not DDIM's defaults: no clipping, the last step to
    alphas_cumprod[0], timesteps k * (T // n) + 1 (docs/method.md); what a config does say is kept."""
    from diffusers import EulerAncestralDiscreteScheduler

    from diffusion_server.backends.ip2p import ddim_from_config
    from diffusion_server.backends.tiny_ip2p import tiny_components

    schedule = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
    euler = EulerAncestralDiscreteScheduler(**schedule)  # its config holds steps_offset=0, a default filled in
    parts = tiny_components(0)
    parts["scheduler"] = euler
    from_backend = Ip2pBackend(**parts).scheduler  # a non-DDIM scheduler goes through ddim_from_config
    T, n = 700, 20
    for ddim in (ddim_from_config(dict(schedule)), ddim_from_config(euler.config), from_backend):
        assert ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
        assert float(ddim.final_alpha_cumprod) == float(ddim.alphas_cumprod[0])
        ddim = DDIMScheduler.from_config(ddim.config, num_train_timesteps=T)  # the edit's schedule over [0, T)
        ddim.set_timesteps(n)
        assert ddim.timesteps.tolist() == [k * (T // n) + 1 for k in reversed(range(n))]
    said = ddim_from_config(dict(schedule, steps_offset=0, set_alpha_to_one=True))
    assert said.config.steps_offset == 0 and float(said.final_alpha_cumprod) == 1.0


@pytest.mark.parametrize("hw", [(32, 32), (31, 45)])
def test_uint8_images_are_edited_as_their_float_values(backend: Ip2pBackend, hw: tuple[int, int]) -> None:
    """The server hands ip2p uint8 requests as they travelled (accepts_uint8); converted on the device,
    they give the edit of x / 255, read-only arrays included (they are views of the request's bytes)."""
    assert backend.accepts_uint8
    render, original = (np.rint(x * 255).astype(np.uint8) for x in _images(*hw, seed=6))
    render.flags.writeable = False
    p = EditParams("turn the sky red", diffusion_steps=FEW, seed=2)
    from_uint8 = backend.edit(render, original, p)
    from_float = backend.edit(to_float01(render), to_float01(original), p)
    assert from_uint8.timestep == from_float.timestep
    np.testing.assert_allclose(from_uint8.image, from_float.image, atol=1e-6, rtol=0)


def test_guidance_scales_matter(backend: Ip2pBackend) -> None:
    render, original = _images()
    base = {"instruction": "make it red", "diffusion_steps": FEW, "seed": 2}
    a = backend.edit(render, original, EditParams(**base)).image
    b = backend.edit(render, original, EditParams(**base, guidance_scale=2.0)).image
    c = backend.edit(render, original, EditParams(**base, image_guidance_scale=3.0)).image
    assert np.abs(a - b).max() > 1e-3
    assert np.abs(a - c).max() > 1e-3


def test_instruction_and_original_matter(backend: Ip2pBackend) -> None:
    render, original = _images()
    p = EditParams("make it red", diffusion_steps=FEW, seed=2)
    a = backend.edit(render, original, p).image
    assert (
        np.abs(a - backend.edit(render, original, EditParams("make it blue", diffusion_steps=FEW, seed=2)).image).max()
        > 1e-3
    )
    assert np.abs(a - backend.edit(render, 1 - original, p).image).max() > 1e-3


def test_same_seed_same_weights() -> None:
    a, b, c = build_tiny_ip2p(seed=1), build_tiny_ip2p(seed=1), build_tiny_ip2p(seed=2)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(x, name).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_save_then_from_pretrained_matches(tmp_path) -> None:
    folder = save_tiny_ip2p(tmp_path / "tiny", seed=4)
    loaded = Ip2pBackend.from_pretrained(folder)
    built = build_tiny_ip2p(seed=4)
    assert loaded.info().model == folder and loaded.info().precision == "fp32"
    render, original = _images()
    p = EditParams("make it red", diffusion_steps=FEW, seed=9)
    np.testing.assert_array_equal(loaded.edit(render, original, p).image, built.edit(render, original, p).image)


def test_missing_folder_raises(tmp_path) -> None:
    with pytest.raises(WeightsNotFound) as e:
        Ip2pBackend.from_pretrained(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "nowhere" in msg and "does not exist" in msg and "--model" in msg and "\n" not in msg


def test_incomplete_folder_raises(tmp_path) -> None:
    (tmp_path / "model").mkdir()
    with pytest.raises(WeightsNotFound, match="not a complete diffusers"):
        Ip2pBackend.from_pretrained(str(tmp_path / "model"))


def test_unknown_hub_id_offline_raises(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound) as e:
        Ip2pBackend.from_pretrained("no-such-owner/no-such-ip2p-model")
    msg = str(e.value)
    assert "no-such-owner/no-such-ip2p-model" in msg and "HF_HUB_OFFLINE" in msg
    assert "download no-such-owner/no-such-ip2p-model" in msg and "\n" not in msg


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="device"):
        build_tiny_ip2p(device="gpu")
    with pytest.raises(ValueError, match="precision"):
        build_tiny_ip2p(precision="fp8")
    with pytest.raises(ValueError, match="device"):
        Ip2pBackend.from_pretrained("whatever", device="not-a-device")


def test_image_validation(backend: Ip2pBackend) -> None:
    render, original = _images()
    with pytest.raises(ValueError, match="render"):
        backend.edit(render[..., :2], original, EditParams("x", diffusion_steps=1))
    with pytest.raises(ValueError, match="same shape"):
        backend.edit(render, original[:16], EditParams("x", diffusion_steps=1))


def test_info() -> None:
    info = build_tiny_ip2p().info()
    assert (info.device, info.precision) == ("cpu", "fp32")
    assert build_tiny_ip2p(precision="auto").info().precision == "fp32"  # auto: fp32 on CPU


def test_text_embedding_computed_once_per_instruction() -> None:
    b = build_tiny_ip2p(seed=0)
    calls = []
    hook = b.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        render, original = _images(16, 16)
        p = EditParams("make it red", diffusion_steps=1, seed=0)
        b.edit(render, original, p)
        assert len(calls) == 2  # the instruction and the empty prompt
        b.edit(render, original, p)
        b.edit(render, original, EditParams("make it red", diffusion_steps=2, seed=5))
        assert len(calls) == 2
        b.edit(render, original, EditParams("make it blue", diffusion_steps=1, seed=0))
        assert len(calls) == 3
    finally:
        hook.remove()


@pytest.mark.slow
def test_real_instruct_pix2pix_loads_and_edits(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never download in tests
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        b = Ip2pBackend.from_pretrained(Ip2pBackend.DEFAULT_MODEL, device=device)
    except WeightsNotFound as e:
        pytest.skip(str(e))
    render, original = _images(64, 64)
    res = b.edit(render, original, EditParams("make it look like a painting", diffusion_steps=FEW, seed=0))
    assert res.image.shape == (64, 64, 3) and np.isfinite(res.image).all()
    assert b.unet.config.in_channels == 8 and b.vae_factor == 8


# -- batching and cached conditioning ------------------------------------------------------------


def test_batched_edits_equal_the_same_edits_alone(backend: Ip2pBackend) -> None:
    from diffusion_server.backends.base import EditItem

    items = []
    for i, (hw, params) in enumerate(
        [
            ((32, 32), EditParams("turn it red", seed=1, diffusion_steps=FEW)),
            (
                (32, 32),
                EditParams("make it night", seed=2, diffusion_steps=FEW, guidance_scale=3.0, image_guidance_scale=0.5),
            ),
            ((30, 46), EditParams("turn it red", seed=3, diffusion_steps=FEW)),  # another size: another group
            ((32, 32), EditParams("the end", seed=4, diffusion_steps=2, lower_bound=0.5)),  # other step count
            ((32, 32), EditParams("and then", seed=5, diffusion_steps=FEW, lower_bound=0.9, upper_bound=0.95)),
        ]
    ):
        render, original = _images(*hw, seed=10 + i)
        items.append(EditItem(render, original, params))
    batched = backend.edit_batch(items)
    assert len(batched) == len(items)
    timesteps = set()
    for item, result in zip(items, batched):
        assert not isinstance(result, Exception), result
        alone = backend.edit(item.render, item.original, item.params)
        assert result.timestep == alone.timestep
        timesteps.add(result.timestep)
        assert result.image.shape == item.render.shape
        np.testing.assert_allclose(result.image, alone.image, rtol=0, atol=1e-5)
    assert len(timesteps) == len(items)  # different T in one batch, each with its own schedule


def test_batch_reports_a_bad_item_alone(backend: Ip2pBackend) -> None:
    from diffusion_server.backends.base import EditItem

    render, original = _images(seed=3)
    good = EditItem(render, original, EditParams("ok", seed=1, diffusion_steps=2))
    bad = EditItem(render, original[:16], EditParams("ok", seed=1, diffusion_steps=2))
    first, second = backend.edit_batch([good, bad])
    assert not isinstance(first, Exception)
    np.testing.assert_allclose(first.image, backend.edit(render, original, good.params).image, rtol=0, atol=1e-5)
    assert isinstance(second, ValueError) and "same shape" in str(second)


def test_conditioning_latents_of_a_cached_original_are_encoded_once() -> None:
    from diffusion_server.backends.base import EditItem

    backend = build_tiny_ip2p(seed=0)
    render, original = _images(seed=4)
    params = EditParams("turn it red", seed=9, diffusion_steps=2)
    uncached = backend.edit(render, original, params)
    assert backend.cond_encodes == 1
    key = ("client", 7, "key-of-original")
    first = backend.edit_batch([EditItem(render, original, params, key)])[0]
    second = backend.edit_batch([EditItem(render, original, params, key)])[0]
    assert backend.cond_encodes == 2  # the second edit of the cached original reused its latents
    np.testing.assert_array_equal(first.image, uncached.image)
    np.testing.assert_array_equal(second.image, uncached.image)


def test_channels_last_gives_the_same_edit(backend: Ip2pBackend) -> None:
    render, original = _images(seed=6)
    p = EditParams("turn it red", seed=2, diffusion_steps=2)
    other = build_tiny_ip2p(seed=0)
    other.optimize(channels_last=True)
    assert other.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(
        other.edit(render, original, p).image, backend.edit(render, original, p).image, rtol=0, atol=1e-5
    )


def test_cpu_offload_refused_off_cuda(backend: Ip2pBackend) -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        build_tiny_ip2p(seed=0).optimize(cpu_offload=True)
