"""3D consistency, the method's core claim (issue 5): the Iterative Dataset Update makes per-view edits agree.

The `stochastic` backend (diffusion_server/backends/stochastic.py) edits like a
diffusion model in the way that matters: it picks one of K colour looks at
random per call, preferring the look the noised render already has. Its unit
tests are first; then real `ns-train in2n-tiny` runs against it (served
in-process over gRPC) compare (a) the Iterative Dataset Update with (b) editing
every view once, with the metric of bench/consistency.py on the final renders.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import NS_TRAIN, QUIET

from bench.consistency import consistency_metrics, in2n_command, measure_run, run_dir_of
from diffusion_server.backends.stochastic import StochasticLookBackend, alphas_cumprod, color_stats, make_backend
from in2n_contract import EditParams
from testing_support import InProcessServer


def scene_like_image(seed: int = 0, size: int = 32) -> np.ndarray:
    """A smooth colourful [size, size, 3] float32 image in [0.1, 0.9] (stands in for a captured view)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [0.5 + 0.3 * np.sin(2 * np.pi * (f * x + g * y) + p) for f, g, p in rng.uniform(0.3, 2.0, size=(3, 3))]
    return np.stack(channels, axis=-1).astype(np.float32)


def choices(
    backend: StochasticLookBackend, render: np.ndarray, original: np.ndarray, n: int = 300, **params
) -> np.ndarray:
    """Fraction of n seeded edits of `render` that chose each look: [K]."""
    counts = np.zeros(backend.num_looks)
    for seed in range(n):
        backend.edit(render, original, EditParams("x", seed=seed, **params))
        counts[backend.last_choice.look] += 1
    return counts / n


# -- the backend ----------------------------------------------------------------------------------


def test_same_seed_same_edit_and_different_seeds_differ():
    original = scene_like_image(0)
    render = np.clip(original + 0.05, 0, 1)
    backend = StochasticLookBackend()
    first = backend.edit(render, original, EditParams("x", seed=7))
    again = StochasticLookBackend().edit(render, original, EditParams("x", seed=7))  # a fresh backend, same seed
    assert first.timestep == again.timestep
    np.testing.assert_array_equal(first.image, again.image)
    others = {
        (r.timestep, r.image.tobytes())
        for r in (backend.edit(render, original, EditParams("x", seed=s)) for s in range(20))
    }
    assert len(others) == 20  # every seed its own edit
    # Unseeded calls draw from the backend's generator: random, and reproducible from the backend's seed.
    a, b = StochasticLookBackend(seed=3), StochasticLookBackend(seed=3)
    runs_a = [a.edit(render, original, EditParams("x")).image for _ in range(3)]
    runs_b = [b.edit(render, original, EditParams("x")).image for _ in range(3)]
    assert all(np.array_equal(x, y) for x, y in zip(runs_a, runs_b))
    assert not np.array_equal(runs_a[0], runs_a[1])


@pytest.mark.parametrize("shape", [(32, 32, 3), (17, 45, 3), (1, 1, 3)])
def test_output_is_an_image_in_range_of_the_render_size(shape):
    rng = np.random.default_rng(1)
    backend = StochasticLookBackend()
    for render, original in [(rng.random(shape, dtype=np.float32), rng.random(shape, dtype=np.float32)),
                             (np.ones(shape, np.float32), np.ones(shape, np.float32)),
                             (np.zeros(shape, np.float32), np.zeros(shape, np.float32))]:  # fmt: skip
        for seed in range(10):
            result = backend.edit(render, original, EditParams("x", seed=seed))
            assert result.image.shape == shape and result.image.dtype == np.float32
            assert np.isfinite(result.image).all() and result.image.min() >= 0.0 and result.image.max() <= 1.0
            assert 20 <= result.timestep <= 980  # the default bounds 0.02..0.98 of 1000 timesteps


def test_timestep_follows_the_bounds_and_sets_the_edit_strength():
    original = scene_like_image(2)
    backend = StochasticLookBackend()
    low = backend.edit(original, original, EditParams("x", seed=0, lower_bound=0.05, upper_bound=0.05))
    assert low.timestep == 50
    np.testing.assert_allclose(
        low.image, 0.95 * original + 0.05 * backend.look(original, backend.last_choice.look), atol=1e-6
    )
    high = backend.edit(original, original, EditParams("x", seed=0, lower_bound=0.9, upper_bound=0.9))
    assert high.timestep == 900
    np.testing.assert_allclose(
        high.image, 0.1 * original + 0.9 * backend.look(original, backend.last_choice.look), atol=1e-6
    )
    # The noise schedule is Stable Diffusion's: abar decreasing from ~1 to ~0.005.
    abar = alphas_cumprod()
    assert abar[0] > 0.999 and 0.004 < abar[-1] < 0.006 and (np.diff(abar) < 0).all()


def test_look_choice_follows_the_render():
    """Mode seeking: a render already in look k gets look k far more often; the original, every look alike."""
    original = scene_like_image(3)
    backend = StochasticLookBackend()
    for k in range(backend.num_looks):
        look = backend.look(original, k)
        np.testing.assert_allclose(color_stats(look, original), backend.look_stats[k], atol=1e-3)
        p = choices(backend, look, original)
        assert p[k] >= 0.8, (k, p)
        assert np.delete(p, k).max() <= 0.15, (k, p)
        # Half-way toward look k still tips the choice toward k.
        half = choices(backend, 0.5 * original + 0.5 * look, original)
        assert half[k] >= 0.45 and half[k] > 2 * np.delete(half, k).max(), (k, half)
    uniform = choices(backend, original, original)
    assert uniform.min() >= 0.2 and uniform.max() <= 0.47, uniform  # 1/3 each, up to sampling noise


@pytest.mark.parametrize("seen_pixels", [None, 64])
def test_large_timesteps_see_less_of_the_render(seen_pixels):
    """At T near 1000 the render is mostly noise: the choice follows it less than at small T (as in diffusion)."""
    original = scene_like_image(
        4, size=8
    )  # few pixels (or a small latent): the colour estimate of a noised render is noisy
    backend = StochasticLookBackend(seen_pixels=seen_pixels)
    render = 0.6 * original + 0.4 * backend.look(original, 0)
    small_t = choices(backend, render, original, lower_bound=0.1, upper_bound=0.1)[0]
    large_t = choices(backend, render, original, lower_bound=0.98, upper_bound=0.98)[0]
    assert small_t > large_t + 0.1, (small_t, large_t)


def test_what_the_model_sees_does_not_depend_on_the_image_size():
    """The noise lives in a latent of `seen_pixels` values: a flat 4x4 and a flat 64x64 render of the same
    colour, same seed, give the same look probabilities; with noise per pixel (None) they do not."""
    colour = np.array([0.7, 0.4, 0.3], np.float32)
    flat = {side: np.broadcast_to(colour, (side, side, 3)).copy() for side in (4, 64)}
    grey = {side: np.full((side, side, 3), 0.5, np.float32) for side in (4, 64)}
    params = EditParams("x", seed=11, lower_bound=0.9, upper_bound=0.9)
    latent, per_pixel = StochasticLookBackend(), StochasticLookBackend(seen_pixels=None)
    probs = {}
    for name, backend in (("latent", latent), ("per_pixel", per_pixel)):
        for side in (4, 64):
            backend.edit(flat[side], grey[side], params)
            probs[name, side] = backend.last_choice.probabilities
    np.testing.assert_allclose(probs["latent", 4], probs["latent", 64], rtol=1e-9)
    assert np.abs(probs["per_pixel", 4] - probs["per_pixel", 64]).max() > 0.01, probs
    with pytest.raises(ValueError, match="seen_pixels"):
        StochasticLookBackend(seen_pixels=0)


def test_registry_factory_and_info():
    backend = make_backend("", "cpu", "fp32", 5)
    assert isinstance(backend, StochasticLookBackend) and backend.num_looks == 3
    assert "K=3" in backend.info().model and backend.info().device == "cpu"
    with pytest.raises(ValueError):
        StochasticLookBackend(gains=[(1.0, 0.5, 0.5)])
    with pytest.raises(ValueError):
        StochasticLookBackend(temperature=0.0)


def test_metric_on_known_images():
    """The consistency metric reads one look across views as agreement 1, spread 0, distance 0; a mix as spread."""
    backend = StochasticLookBackend()
    originals = np.stack([scene_like_image(s) for s in range(6)])
    same = np.stack([backend.look(o, 1) for o in originals])
    m = consistency_metrics(same, originals, backend.look_stats)
    assert m["agreement"] == 1.0 and m["majority_look"] == 1 and m["spread"] < 1e-3 and m["distance_to_one_look"] < 1e-3
    mixed = np.stack([backend.look(o, i % 3) for i, o in enumerate(originals)])
    m = consistency_metrics(mixed, originals, backend.look_stats)
    assert m["agreement"] == pytest.approx(1 / 3) and m["spread_rel"] > 0.5 and m["distance_rel"] > 0.5
    blend = np.stack([(backend.look(o, 0) + backend.look(o, 2)) / 2 for o in originals])  # consistent, but no look
    m = consistency_metrics(blend, originals, backend.look_stats)
    assert m["spread"] < 1e-2 and m["distance_rel"] > 0.3


# -- IDU against edit-once, real ns-train runs ---------------------------------------------------------


def run_mode(
    pretrained: Path, scene: Path, out: Path, port: int, env: dict, name: str, steps: int, *extra: str
) -> Path:
    cmd = in2n_command(NS_TRAIN, pretrained, scene, out, name, port, steps, 256, 16, 0, extra, QUIET)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir_of(out, name)


def summary(name: str, metrics: dict) -> str:
    return f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in metrics.items() if k != "stats")


def assert_converged_to_one_look(idu: dict) -> None:
    """(a) converged: the final renders agree on one look, hardly spread, and sit near it; most edits have it.

    Single edits still stray (at a large timestep the render is mostly noise and the look random, as
    with diffusion); the NeRF averages the strays out.
    """
    a = idu["after"]
    report = (
        summary("renders", a) + summary("training images", idu["training_images"]) + summary("before", idu["before"])
    )
    assert min(idu["training_images"]["edits_per_view"]) >= 2, report  # every view edited, and again
    assert a["views"] == len(idu["training_images"]["edits_per_view"]), report  # every training view measured
    # The pretrained renders carry no look yet: far from every look.
    assert idu["before"]["distance_rel"] > 0.8, report
    assert a["agreement"] >= 0.9, report
    assert a["spread_rel"] < 0.15, report
    assert a["distance_rel"] < 0.2, report
    assert idu["training_images"]["majority_look"] == a["majority_look"], report
    assert idu["training_images"]["agreement"] >= 0.8, report


# In2n steps of the runs, and the editor's temperature. At the backend's default temperature (0.25)
# the runs settle, but not always by 600 steps: over seeds 1..12 the final renders' distance_rel was
# 0.05..0.16, and one CI machine (its own pretraining) saw 0.28 against the threshold of 0.2. A more
# decisive editor (0.15: it follows the noised render more, as IP2P at a high image guidance does)
# settles every time: over the same seeds 0.044..0.077, the training images' agreement 0.93..1.0
# (2 CPUs, a view started and rendered in the same step, 40 edits a view).
CONSISTENCY_STEPS = 600
CONSISTENCY_TEMPERATURE = 0.15


def idu_and_once_runs(pretrained, scene, env, tmp: Path, steps: int, modes=("idu", "once")) -> dict:
    """Metrics of the runs in `modes` ((a) idu, (b) once), same steps and seed, one in-process stochastic server."""
    backend = StochasticLookBackend(seed=0, temperature=CONSISTENCY_TEMPERATURE)
    extra = {"idu": (), "once": ("--pipeline.max-edits-per-view", "1"), "workers": ("--pipeline.render-devices", "cpu")}
    with InProcessServer(backend, device="cpu") as server:
        runs = {m: run_mode(pretrained, scene, tmp, server.port, env, m, steps, *extra[m]) for m in modes}
    return {m: measure_run(run, backend.look_stats) for m, run in runs.items()}


def test_idu_converges_to_one_look(pretrained, tiny_scene, trainer_env, tmp_path):
    """(a) alone, on the tiny scene: the Iterative Dataset Update brings every view to one look."""
    runs = idu_and_once_runs(pretrained, tiny_scene, trainer_env, tmp_path, CONSISTENCY_STEPS, modes=("idu",))
    assert_converged_to_one_look(runs["idu"])


@pytest.mark.slow
def test_idu_converges_with_a_render_worker(pretrained, tiny_scene, trainer_env, tmp_path):
    """(a) with the views rendered by a render worker process (a copy of the NeRF refreshed every 10 steps): the
    stale renders still converge to one look, and the trainer rendered none of them."""
    runs = idu_and_once_runs(pretrained, tiny_scene, trainer_env, tmp_path, CONSISTENCY_STEPS, modes=("workers",))
    assert_converged_to_one_look(runs["workers"])
    stats = runs["workers"]["stats"]
    assert stats["render_steps"] == 0 and stats["render_worker_views"] >= stats["edits_applied"] > 0


@pytest.mark.slow
def test_idu_is_much_more_consistent_than_editing_once(pretrained, tiny_scene, trainer_env, tmp_path):
    """(a) against (b), same steps and seed: only IDU makes the edits agree and the NeRF take one look.

    (b)'s NeRF, rendered with nerfacto's average appearance, is a consistent *blend* of the random
    looks its views got (its renders may agree on the nearest look): the difference shows as the
    distance to a single look, and as the disagreement of its training images.
    """
    runs = idu_and_once_runs(pretrained, tiny_scene, trainer_env, tmp_path, CONSISTENCY_STEPS)
    idu, once = runs["idu"], runs["once"]
    assert_converged_to_one_look(idu)
    report = summary("IDU renders", idu["after"]) + summary("once renders", once["after"])
    report += summary("IDU training images", idu["training_images"]) + summary(
        "once training images", once["training_images"]
    )
    assert set(once["training_images"]["edits_per_view"]) == {1}, report
    # (b): each view got a look at random and kept it; the views disagree.
    assert once["training_images"]["agreement"] <= 0.75, report
    # The NeRF trained on them is a blend, much further from any single look than IDU's.
    assert idu["after"]["distance_rel"] < 0.6 * once["after"]["distance_rel"], report
