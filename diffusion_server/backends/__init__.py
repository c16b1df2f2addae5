"""Backend registry: backend name -> factory.

Every backend module exports `make_backend(model, device, precision, seed, options)`
and its class a `name`; the registry imports a module only when its backend is
chosen, so choosing `palette` never imports torch or diffusers. Start-up problems a user can fix (missing weights,
no CUDA, a missing package) come out as `BackendUnavailable`, whose message is
one line saying what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from diffusion_server.backends.base import EditBackend

if TYPE_CHECKING:
    import torch

DEFAULT_IP2P_MODEL = "timbrooks/instruct-pix2pix"
"""The ip2p backend's model (hub id) when --model is not given: here, not in the backend's module, so that the
server's config and the demo harness name it without importing torch; not in the contract, since no request carries it."""

DEFAULT_FLUX_KONTEXT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
"""The flux-kontext backend's model (hub id, gated: its licence must be accepted and the user logged in) when
--model is not given."""

Precision = Literal["auto", "fp32", "fp16", "bf16"]
"""Values accepted by `--precision`; `auto` is fp16 on CUDA, fp32 elsewhere."""

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


class BackendUnavailable(RuntimeError):
    """A backend that cannot start here. The message is one line saying what to do."""


def resolve_precision(precision: str, device: Any) -> str:
    """`auto` -> "fp16" on CUDA devices, "fp32" elsewhere; any other value is returned as given.

    `device`: a device string ("cpu", "cuda:1") or a `torch.device`. Raises ValueError naming `precision`.
    """
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}")
    if precision != "auto":
        return precision
    device_type = getattr(device, "type", str(device).split(":")[0])
    return "fp16" if device_type == "cuda" else "fp32"


def check_device_syntax(device: str) -> None:
    """Raise `BackendUnavailable` unless `device` reads like cpu, cuda, cuda:N or mps (no torch needed)."""
    if not _DEVICE_RE.match(device):
        raise BackendUnavailable(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps")


def resolve_device(device: str) -> torch.device:
    """Parse `device` and check that torch can use it on this machine (CUDA present, the index among the
    visible devices, MPS present); raise ValueError naming `device`. Imports torch."""
    import torch

    if not isinstance(device, str) or not device:
        raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device string ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device}: CUDA is not available on this machine; use cpu")
        count = torch.cuda.device_count()
        if (dev.index or 0) >= count:
            raise ValueError(
                f"device {device}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); pick one of them"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: MPS is not available on this machine; use cpu")
    return dev


def check_device_available(device: str) -> None:
    """Raise `BackendUnavailable` if torch cannot use `device` on this machine (`resolve_device`'s checks,
    as a one-line start-up error about --device; imports torch)."""
    check_device_syntax(device)
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"this backend needs torch ({e}); install torch or use --backend palette") from e
    try:
        resolve_device(device)
    except ValueError as e:
        raise BackendUnavailable(f"--{e}") from None


@dataclass(frozen=True)
class TorchOptions:
    """Speed and memory options of the torch backends (--channels-last, --compile, --cpu-offload)."""

    channels_last: bool = False
    compile: bool = False
    cpu_offload: bool = False

    def flags(self) -> str:
        return " ".join(
            f"--{name.replace('_', '-')}" for name in ("channels_last", "compile", "cpu_offload") if getattr(self, name)
        )


def no_torch_options(backend: str, options: TorchOptions | None) -> None:
    """Raise `BackendUnavailable` if `options` sets any torch option: `backend` does not run torch."""
    if options is not None and options.flags():
        raise BackendUnavailable(
            f"{options.flags()}: not supported by the {backend} backend (torch backends only: ip2p, ip2p-xl, tiny-ip2p, flux-kontext, tiny-flux-kontext)"
        )


def check_torch_options(device: str, options: TorchOptions | None) -> None:
    """Raise `BackendUnavailable` for torch options that `device` cannot use (--cpu-offload off CUDA)."""
    if options is not None and options.cpu_offload and not device.startswith("cuda"):
        raise BackendUnavailable(
            f"--cpu-offload needs a CUDA device (weights wait in CPU memory for the GPU); --device is {device}"
        )


def apply_torch_options(backend: EditBackend, options: TorchOptions | None) -> EditBackend:
    """`backend.optimize(...)` with `options` (a torch backend); a failure is one `BackendUnavailable` line."""
    if options is None:
        return backend
    try:
        backend.optimize(channels_last=options.channels_last, compile=options.compile, cpu_offload=options.cpu_offload)  # type: ignore[attr-defined]
    except (RuntimeError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BackendUnavailable(
            f"{options.flags()}: not usable here ({type(e).__name__}: {first}); start without it"
        ) from e
    return backend


BackendFactory = Callable[..., EditBackend]
"""(model, device, resolved precision, seed, options: TorchOptions, **extra) -> backend: a module's `make_backend`."""


def _lazy(module: str, packages: str = "its packages") -> BackendFactory:
    """The `make_backend` of `diffusion_server.backends.<module>`, imported only when the backend is chosen
    (so choosing `palette` never imports torch or diffusers)."""

    def factory(
        model: str, device: str, precision: str, seed: int, options: TorchOptions = TorchOptions(), **extra: Any
    ) -> EditBackend:
        import importlib

        try:
            loaded = importlib.import_module(f"diffusion_server.backends.{module}")
        except ImportError as e:
            name = module.replace("_", "-")
            raise BackendUnavailable(
                f"the {name} backend cannot be imported ({e}); install {packages}, or use --backend palette"
            ) from e
        return loaded.make_backend(model, device, precision, seed, options, **extra)

    return factory


_FACTORIES: dict[str, BackendFactory] = {
    "ip2p": _lazy("ip2p", "diffusers and transformers"),
    "ip2p-xl": _lazy("ip2p_xl", "diffusers and transformers"),
    "tiny-ip2p": _lazy("tiny_ip2p", "diffusers and transformers"),
    "flux-kontext": _lazy("flux_kontext", "diffusers and transformers"),
    "tiny-flux-kontext": _lazy("tiny_flux_kontext", "diffusers and transformers"),
    "palette": _lazy("palette"),
    "stochastic": _lazy("stochastic"),
    "identity": _lazy("identity"),
}
"""The registry: adding a backend is a module under backends/ with a `make_backend` (and a `name`) and one line here."""

BACKEND_NAMES: tuple[str, ...] = tuple(_FACTORIES)
BackendName = Literal[BACKEND_NAMES]  # type: ignore[valid-type]
"""Names accepted by `--backend` (the registry's keys)."""


def create_backend(
    name: str,
    model: str = "",
    device: str = "cpu",
    precision: str = "auto",
    seed: int = 0,
    channels_last: bool = False,
    compile: bool = False,
    cpu_offload: bool = False,
    delay_ms: float = 0.0,
) -> EditBackend:
    """Build the backend called `name`.

    Args:
        name: one of `BACKEND_NAMES`.
        model: model id or local folder (ip2p, ip2p-xl, flux-kontext); ignored by the others.
        device: torch device string, e.g. "cpu", "cuda:1".
        precision: "auto", "fp32", "fp16" or "bf16"; `auto` resolves by device (flux-kontext: always bf16).
        seed: initialisation seed of tiny-ip2p's random weights; stochastic's seed of unseeded edits.
        channels_last, compile, cpu_offload: speed and memory options of the torch backends (off by default).
        delay_ms: identity only: a fixed cost of every edit (a sleep), for load tests; 0: none.

    Raises:
        BackendUnavailable: unknown name, bad device, missing weights or packages (one-line message).
    """
    if name not in _FACTORIES:
        raise BackendUnavailable(f"--backend {name!r} is unknown; choose one of {', '.join(BACKEND_NAMES)}")
    check_device_syntax(device)
    options = TorchOptions(channels_last=channels_last, compile=compile, cpu_offload=cpu_offload)
    if delay_ms and name != "identity":
        raise BackendUnavailable(
            f"--delay-ms: only the identity backend takes it (a fixed cost per edit, for load tests), not {name}"
        )
    extra = {"delay_ms": delay_ms} if delay_ms else {}
    return _FACTORIES[name](model, device, resolve_precision(precision, device), seed, options, **extra)
