"""The one interface every editing backend implements.

A backend turns (render, original, parameters) into an edited image. It knows
nothing of gRPC: the service validates requests, decodes images and calls
`edit` from a single worker thread, so a backend need not be thread-safe.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from in2n_contract import (
    DEFAULT_DIFFUSION_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
    EditParams,
)

_log = logging.getLogger(__name__)


class EditRejected(ValueError):
    """A request the backend cannot serve (e.g. an instruction it does not know).

    The service answers it with INVALID_ARGUMENT and the message as given.
    """


@dataclass
class EditResult:
    image: np.ndarray
    """Edited image, [H, W, 3] float32 in [0, 1], the size of the render (or uint8 in 0..255, from a
    backend with `accepts_uint8` given a uint8 render: sent as it is)."""
    timestep: int = 0
    """Noise timestep T the edit started from (0..999); 0 for backends without one."""


@dataclass
class BackendInfo:
    """What `Describe` reports about a backend."""

    model: str = ""
    device: str = "cpu"
    precision: str = "n/a"
    known_instructions: list[str] = field(default_factory=list)
    defaults: dict[str, float] = field(default_factory=dict)
    """The backend's own default of each EditParams field it has one for (guidance_scale, image_guidance_scale,
    diffusion_steps, lower_bound, upper_bound); the fields left out take the contract's (Instruct-NeRF2NeRF's)."""
    ignored_fields: list[str] = field(default_factory=list)
    """Request fields the backend does not use (e.g. "image_guidance_scale" for flux-kontext)."""

    def edit_defaults(self) -> dict[str, float]:
        """Every default Describe reports: the contract's, overridden by the backend's `defaults`."""
        contract = {
            "guidance_scale": DEFAULT_GUIDANCE_SCALE,
            "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE,
            "diffusion_steps": DEFAULT_DIFFUSION_STEPS,
            "lower_bound": DEFAULT_LOWER_BOUND,
            "upper_bound": DEFAULT_UPPER_BOUND,
        }
        unknown = set(self.defaults) - set(contract)
        if unknown:
            raise ValueError(f"BackendInfo.defaults: unknown fields {sorted(unknown)}; known: {sorted(contract)}")
        return {**contract, **self.defaults}


@dataclass
class EditItem:
    """One edit of a batch (see `EditBackend.edit_batch`)."""

    render: np.ndarray
    """[H, W, 3] float32 in [0, 1] (or uint8 in 0..255 for a backend with `accepts_uint8`); read-only."""
    original: np.ndarray
    """Same size as `render`, either kind (each image keeps the dtype it travelled in); read-only."""
    params: EditParams
    original_key: Hashable | None = None
    """Identifies `original` when the server caches it (same key: same pixels), so a backend may cache
    what it derives from it (e.g. conditioning latents); None: not cached."""
    is_active: Callable[[], bool] | None = None
    """False once nobody waits for this edit (client gone): a long backend may stop early and raise
    `EditCancelled` (checked by ip2p between diffusion steps). None: always active."""


class EditCancelled(RuntimeError):
    """An edit a backend stopped because nobody waits for it any more (see `EditItem.is_active`)."""


class EditBackend(abc.ABC):
    """Base class of all editing backends.

    Batching is optional: a backend that can run several edits at once sets `supports_batching = True`
    and overrides `edit_batch` (or derives from `GroupedBatchBackend`, which batches edits that can share one model
    call); the others are called one edit at a time.

    Images come as float32 in [0, 1] unless the backend sets `accepts_uint8 = True`: it then gets
    the images of a uint8 request as they travelled (uint8 in 0..255, read-only views of the request's
    bytes, no copy) and converts them itself where that is cheapest (on its GPU: a quarter of the
    bytes to move); `in2n_contract.codec.to_float01` gives the float32 the others get.
    """

    name: str = ""
    """The backend's registry name (`--backend`), which Describe reports; "" for one outside the registry."""
    supports_batching: bool = False
    default_max_batch: int = 1
    """The server's --max-batch when none is given (backends that batch set more)."""
    accepts_uint8: bool = False

    @abc.abstractmethod
    def info(self) -> BackendInfo:
        """Model, device, precision and known instructions of this backend."""

    def check(self, params: EditParams) -> None:
        """Raise `EditRejected` if this backend cannot serve `params`. Default: accepts all."""

    @abc.abstractmethod
    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        """Edit one view.

        Args:
            render: [H, W, 3] float32 in [0, 1], the NeRF's render of the view (uint8 0..255 possible
                with `accepts_uint8`). Read-only: do not edit in place.
            original: the captured image of the view, same size (either kind, with `accepts_uint8`).
            params: validated edit parameters.
        """

    def edit_batch(self, items: Sequence[EditItem]) -> list[EditResult | Exception]:
        """Edit several views; one result (or the exception of that edit) per item, in order.

        Default: `edit` on each item in turn. A batching backend must give each item the result
        `edit` would give it alone (same seed, same numbers, up to floating-point rounding).
        """
        results: list[EditResult | Exception] = []
        for item in items:
            try:
                results.append(self.edit(item.render, item.original, item.params))
            except Exception as e:  # noqa: BLE001 - reported per item
                results.append(e)
        return results


class GroupedBatchBackend(EditBackend):
    """A backend that batches edits which can share one model call (same working size and step count).

    Subclasses give `_prepare(item)` (checks and inputs of one edit; an exception fails that edit alone),
    `_group_key(prepared)` and `_run_group(prepared list)` (one result per edit, in order). A group that fails
    as a whole (e.g. out of memory) is run again one edit at a time, so that each edit gets its own outcome.
    """

    supports_batching = True

    def edit(self, render: np.ndarray, original: np.ndarray, params: EditParams) -> EditResult:
        result = self.edit_batch([EditItem(render, original, params)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @abc.abstractmethod
    def _prepare(self, item: EditItem) -> object:
        """What one edit needs before its group runs; raise to fail this edit alone."""

    @abc.abstractmethod
    def _group_key(self, prepared: object) -> Hashable:
        """Edits with equal keys run in one batch."""

    @abc.abstractmethod
    def _run_group(self, prepared: list) -> Sequence[EditResult | Exception]:
        """Run one batch; one result per edit, in order."""

    def edit_batch(self, items: Sequence[EditItem]) -> list[EditResult | Exception]:
        results: list[EditResult | Exception | None] = [None] * len(items)
        groups: dict[Hashable, list[tuple[int, object]]] = {}  # insertion-ordered: first come, first run
        for i, item in enumerate(items):
            try:
                prepared = self._prepare(item)
            except Exception as e:  # noqa: BLE001 - reported for this edit only
                results[i] = e
                continue
            groups.setdefault(self._group_key(prepared), []).append((i, prepared))
        for members in groups.values():
            outs = self._run_members([p for _, p in members])
            for (i, _), out in zip(members, outs):
                results[i] = out
        return results  # type: ignore[return-value]

    def _run_members(self, members: list) -> list[EditResult | Exception]:
        try:
            return list(self._run_group(members))
        except Exception as e:  # noqa: BLE001 - a whole batch failed: see below
            if len(members) == 1 or isinstance(e, EditCancelled):
                return [e] * len(members)
            _log.warning(
                "batch of %d edits failed (%s: %s); running them one by one", len(members), type(e).__name__, e
            )
        outs: list[EditResult | Exception] = []
        for p in members:
            try:
                outs.append(self._run_group([p])[0])
            except Exception as e1:  # noqa: BLE001 - reported for this edit only
                outs.append(e1)
        return outs
