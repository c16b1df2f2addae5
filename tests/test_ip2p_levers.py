"""The editor's speed levers, checked for correctness on the CPU (their GPU figures: bench/gpu/).

- the batched DDIM update equals diffusers' DDIMScheduler.step of each edit's own schedule;
- torch.compile (backend "eager" here, to stay fast) compiles once per batch size, never for new
  timesteps, seeds, instructions or guidance scales, and gives the same edits;
- the server's --max-batch, when not given, is the backend's default (8 for ip2p: batching without
  a flag), 1 for backends that do not batch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_server.backends.base import EditItem
from diffusion_server.backends.ip2p import Ip2pBackend
from diffusion_server.backends.tiny_ip2p import build_tiny_ip2p, tiny_components
from in2n_contract import EditParams
from protos.in2n.v1 import edit_service_pb2 as pb

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op torch thread


def _images(h: int = 32, w: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    render = rng.random((h, w, 3), dtype=np.float32)
    return render, np.clip(render + rng.normal(0, 0.1, (h, w, 3)), 0, 1).astype(np.float32)


def test_batched_ddim_update_equals_each_edits_scheduler_step() -> None:
    """Three edits with different T and step counts' strides, every step including the last
    (where t - stride < 0 and the final alpha is used), against diffusers' step of each."""
    b = build_tiny_ip2p(seed=0)
    steps = 5
    Ts = [7, 480, 999]  # stride 1, 96, 199
    scheds = []
    for T in Ts:
        s = copy.deepcopy(b.scheduler)
        s.register_to_config(num_train_timesteps=T, timestep_spacing="leading")
        s.set_timesteps(steps)
        scheds.append(s)
    timesteps = torch.stack([s.timesteps for s in scheds])  # [3, steps]
    coef = b._ddim_coefficients(timesteps, torch.tensor([T // steps for T in Ts]))
    assert coef.shape == (steps, 4, 3, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(3, 4, 6, 5, generator=g)
    for k in range(steps):
        eps = torch.randn(lat.shape, generator=g)
        expected = torch.cat(
            [s.step(eps[i : i + 1], s.timesteps[k], lat[i : i + 1]).prev_sample for i, s in enumerate(scheds)]
        )
        lat = Ip2pBackend._ddim_step(eps, lat, coef, k)
        torch.testing.assert_close(lat, expected, rtol=0, atol=1e-6)
    assert (timesteps[:, -1] - torch.tensor([T // steps for T in Ts]) < 0).any()  # a last step used the final alpha


def test_a_scheduler_the_batched_update_cannot_follow_is_refused() -> None:
    parts = tiny_components(0)
    parts["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="scheduler.*epsilon"):
        Ip2pBackend(**parts)


def _frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def test_compile_compiles_once_per_batch_size_and_gives_the_same_edits() -> None:
    import torch._dynamo

    plain = build_tiny_ip2p(seed=0)
    compiled = build_tiny_ip2p(seed=0)
    torch._dynamo.reset()
    compiled.optimize(compile=True, compile_backend="eager")  # warm-up edit at the native size, 32 x 32
    after_warmup = _frames_compiled()
    assert after_warmup >= 1
    render, original = _images(32, 32, seed=1)
    edits = [
        EditParams("turn it red", seed=1, diffusion_steps=3),
        EditParams(
            "make it night",
            seed=2,
            diffusion_steps=4,
            guidance_scale=3.0,
            image_guidance_scale=0.5,
            lower_bound=0.8,
            upper_bound=0.95,
        ),
    ]
    for p in edits:  # batch 1: other timesteps, seeds, instructions, guidance: no new graph
        np.testing.assert_allclose(
            compiled.edit(render, original, p).image, plain.edit(render, original, p).image, rtol=0, atol=1e-5
        )
    assert _frames_compiled() == after_warmup
    pair = [
        EditItem(render, original, edits[1]),
        EditItem(original, render, EditParams("other", seed=5, diffusion_steps=4)),
    ]
    compiled.edit_batch(pair)  # batch 2: compiles once
    after_pair = _frames_compiled()
    assert after_pair > after_warmup
    again = [EditItem(original, render, EditParams("third", seed=8, diffusion_steps=4, lower_bound=0.3)),
             EditItem(render, original, EditParams("fourth", seed=9, diffusion_steps=4, guidance_scale=9.0))]  # fmt: skip
    out = compiled.edit_batch(again)
    assert _frames_compiled() == after_pair  # the same batch size again: no recompile
    for item, res in zip(again, out):
        np.testing.assert_allclose(
            res.image, plain.edit(item.render, item.original, item.params).image, rtol=0, atol=1e-5
        )
    torch._dynamo.reset()


def _describe_max_batch(backend, **config) -> int:
    from testing_support import InProcessServer

    with InProcessServer(backend, device="cpu", **config) as server:
        return server.stub.Describe(pb.DescribeRequest(), timeout=10).max_batch


def test_max_batch_defaults_to_the_backends_own() -> None:
    from diffusion_server.backends.palette import PaletteBackend

    tiny = build_tiny_ip2p(seed=0)
    assert tiny.default_max_batch == 8
    assert _describe_max_batch(tiny) == 8  # no flag: ip2p batches what is queued, up to 8
    assert _describe_max_batch(tiny, max_batch=2) == 2  # the flag wins
    assert _describe_max_batch(tiny, max_batch=1) == 1
    assert _describe_max_batch(PaletteBackend()) == 1  # a backend that does not batch
