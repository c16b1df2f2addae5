"""The trainer's connections to its diffusion servers: addresses, token and TLS, readiness, the client pool.

`EditServers` owns one `StreamClient` per server (async mode) or one `EditClient` to the first
server (sync mode), routes each edit to the least loaded server, counts edits per server and
says once, in one line, when a server runs another IP2P precision than the variant's (asked of
the stream clients' Describe, or in sync mode of the blocking client's, before the first edit), and
gives each edit the parameters the user set and, for the rest, that server's backend defaults (its
Describe; saying once which), the contract's for a server that reports none.
The clients are made by `make_client` / `make_sync_client`, so tests can pass stand-ins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from nerfstudio.utils.rich_utils import CONSOLE

from in2n_client import EditClient, EditFailed, StreamClient, StreamResult
from in2n_contract import (
    DEFAULT_DIFFUSION_STEPS,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_IMAGE_GUIDANCE_SCALE,
    DEFAULT_LOWER_BOUND,
    DEFAULT_UPPER_BOUND,
)
from nerf_trainer.variants import FIXED_PRECISION, precision_on

CONTRACT_DEFAULTS: dict[str, float] = {
    "guidance_scale": DEFAULT_GUIDANCE_SCALE,
    "image_guidance_scale": DEFAULT_IMAGE_GUIDANCE_SCALE,
    "diffusion_steps": DEFAULT_DIFFUSION_STEPS,
    "lower_bound": DEFAULT_LOWER_BOUND,
    "upper_bound": DEFAULT_UPPER_BOUND,
}
"""The edit parameters a user may leave unset (None in the pipeline's config), with the contract's (IP2P's)
defaults: what is sent to a server whose Describe reports no defaults of its own."""


def edit_settings(config, defaults: dict[str, float] | None) -> dict[str, float | int]:
    """The edit parameters to send: each of `config`'s (an In2nPipelineConfig) the user set, else the server's
    backend default (`defaults`, from its Describe), else the contract's."""
    chosen = {**CONTRACT_DEFAULTS, **(defaults or {})}
    settings: dict[str, float | int] = {}
    for name, default in chosen.items():
        value = getattr(config, name)
        value = default if value is None else value
        settings[name] = int(value) if name == "diffusion_steps" else float(value)
    return settings


def described_defaults(info) -> dict[str, float] | None:
    """A DescribeResponse's backend defaults (rounded off float32's noise: 0.02, not 0.0199999995), None from a
    server older than the field."""
    if not info.HasField("defaults"):
        return None
    return {name: round(float(getattr(info.defaults, name)), 6) for name in CONTRACT_DEFAULTS}


def precision_mismatch(expected: str, address: str, reported: str, device: str = "", backend: str = "") -> str | None:
    """The one line a trainer prints when the server at `address` runs another IP2P precision than its variant's.

    None when they agree, when a half-precision (fp16) variant's server runs bf16 on the CPU (the project's CPU
    stand-in for fp16: nerf_trainer/variants.py), when the server's backend has no precision ("n/a": palette,
    identity), or when its `backend` runs one precision whatever the variant and reports it (flux-kontext: bf16,
    `FIXED_PRECISION`). `device` is the server's (its Describe); the advice is what `make run` would start there.
    """
    advice = precision_on(expected, device)  # what make run starts on that device for this variant
    if not reported or reported == "n/a" or reported in (expected, advice) or FIXED_PRECISION.get(backend) == reported:
        return None
    return (
        f"in2n: the server at {address} runs IP2P in {reported}{f' on {device}' if device else ''}, this variant is "
        f"defined with {expected}{f' ({advice} on the CPU)' if advice != expected else ''} "
        f"(start the server with --precision {advice}); editing goes on"
    )


def parse_addresses(edit_server: str) -> list[str]:
    """The server addresses of a comma-separated pipeline.edit_server (checked when editing starts)."""
    return [a.strip() for a in edit_server.split(",") if a.strip()]


class EditServers:
    """The diffusion servers one trainer edits with, and what it counts per server."""

    def __init__(
        self,
        addresses: list[str],
        max_in_flight: int = 2,
        precision_hint: str = "fp32",
        tls: bool = False,
        root_cert: Path | None = None,
        token: str | None = None,
        sync_timeout_s: float = 3600.0,
        describe_timeout_s: float = 30.0,
        make_client: Callable[[str], object] | None = None,
        make_sync_client: Callable[[str], object] | None = None,
    ) -> None:
        """make_client(address) -> a started StreamClient (or a stand-in with can_submit, in_flight, submit, poll,
        close, server_info, and optionally connected); make_sync_client(address) -> an EditClient (or a stand-in with
        edit, close)."""
        self.addresses = list(addresses)
        self.max_in_flight = max_in_flight
        self.precision_hint = precision_hint
        self.connection = {"token": token, "root_cert": root_cert, "tls": tls}
        self.sync_timeout_s = sync_timeout_s
        self.describe_timeout_s = describe_timeout_s  # sync mode's Describe: short, a hung server holds no round long
        self.make_client = make_client or self._stream_client
        self.make_sync_client = make_sync_client or self._edit_client
        self.clients: list = []  # one per address once started (async mode)
        self.sync_client = None  # an EditClient to the first server (sync mode)
        self.sent: dict[str, int] = {}  # address -> edits sent to it
        self.counts: dict[str, dict[str, int]] = {}  # address -> {"edits_applied": n, "edits_failed": n}
        self.info: dict[str, dict[str, str]] = {}  # address -> backend, device, precision (its first Describe)
        self.seen_up: set[str] = set()  # addresses whose stream was open at some point (a server that went down was)
        self.defaults: dict[str, dict[str, float] | None] = {}  # address -> its backend's defaults (its Describe)
        self.ignored: dict[str, list[str]] = {}  # address -> request fields its backend ignores (its Describe)
        self._said_defaults: set[str] = set()  # servers whose defaults the trainer has said it uses

    @classmethod
    def from_config(cls, config, **factories) -> EditServers:
        """From an In2nPipelineConfig; the bearer token comes from $IN2N_TOKEN (never saved in config.yml)."""
        return cls(
            parse_addresses(config.edit_server), max_in_flight=config.max_in_flight,
            precision_hint=config.server_precision_hint, tls=config.edit_server_tls,
            root_cert=config.edit_server_root_cert, token=os.environ.get("IN2N_TOKEN") or None,
            sync_timeout_s=config.edit_timeout_s or 3600.0, describe_timeout_s=config.connect_timeout_s or 30.0,
            **factories,
        )  # fmt: skip

    def _stream_client(self, address: str) -> StreamClient:
        return StreamClient(address, max_in_flight=self.max_in_flight, **self.connection).start()

    def _edit_client(self, address: str) -> EditClient:
        return EditClient(address, timeout_s=self.sync_timeout_s, **self.connection)

    def check(self) -> None:
        """Raise ValueError when no server is named (before editing starts)."""
        if not self.addresses:
            raise ValueError("pipeline.edit_server names no server")

    def wait_ready(self, timeout_s: float) -> None:
        """Raise RuntimeError unless every server answers within timeout_s (pipeline.require_server)."""
        for address in self.addresses:
            with EditClient(address, **self.connection) as probe:
                try:
                    probe.wait_ready(timeout_s=timeout_s)
                except TimeoutError:
                    raise RuntimeError(
                        f"in2n: no diffusion server ready at {address} after {timeout_s:.0f} s "
                        f"(pipeline.require_server is on); start one with "
                        f"`python -m diffusion_server --port {address.rsplit(':', 1)[-1]}`"
                    ) from None

    def start(self, sync: bool = False) -> None:
        """Connect: one stream client per server, or (sync) one blocking client to the first server."""
        if sync:
            self.sync_client = self.make_sync_client(self.addresses[0])
        else:
            self.clients = [self.make_client(a) for a in self.addresses]

    def free_client(self) -> tuple[str, object] | None:
        """(address, client) of the connected client with the fewest edits in flight, the one sent the fewest so far
        among equals (so every server gets work even when one could keep up alone); servers that went away are
        routed around. None when no client can take an edit."""
        free = [(a, c) for a, c in zip(self.addresses, self.clients) if c.can_submit()]
        return min(free, key=lambda ac: (ac[1].in_flight, self.sent.get(ac[0], 0))) if free else None

    def free_slots(self) -> int:
        """Edits the connected servers can still take, over all of them (each up to its max_in_flight)."""
        return sum(
            max(0, getattr(c, "max_in_flight", self.max_in_flight) - c.in_flight)
            for c in self.clients
            if c.can_submit()
        )

    def forget(self, address: str, request_id: str) -> None:
        """Give up a request at the server `address` (past the edit timeout): its client frees the slot and drops
        a late answer (clients without `forget`, stand-ins, are left as they are)."""
        if address in self.addresses and self.clients:
            forget = getattr(self.clients[self.addresses.index(address)], "forget", None)
            if forget is not None:
                forget(request_id)

    def any_idle(self) -> bool:
        """Whether a connected server has no edit at it (it is waiting for the trainer's next render)."""
        return any(c.can_submit() and c.in_flight == 0 for c in self.clients)

    def note_sent(self, address: str) -> None:
        self.sent[address] = self.sent.get(address, 0) + 1

    def count(self, address: str, name: str) -> None:
        """Add one to a server's edits_applied or edits_failed."""
        counts = self.counts.setdefault(address, {"edits_applied": 0, "edits_failed": 0})
        counts[name] += 1

    def poll(self) -> Iterator[tuple[str, StreamResult]]:
        """(address, result) of every answer that has arrived, over all servers."""
        return iter([(a, r) for a, c in zip(self.addresses, self.clients) for r in c.poll()])

    def note_describes(self) -> None:
        """Record each server's Describe on its first connection; say once if its precision is not the variant's."""
        for address, client in zip(self.addresses, self.clients):
            if getattr(client, "connected", False):
                self.seen_up.add(address)
            info = getattr(client, "server_info", None)  # the StreamClient's latest Describe (None before one)
            if info is not None and address not in self.info:
                self._note(address, info)

    def note_sync_describe(self) -> None:
        """Sync mode: ask the server's Describe until it answers once (a server not up yet is asked again next
        time); say once if its precision is not the variant's."""
        address = self.addresses[0]
        if self.sync_client is None or address in self.info:
            return
        try:
            info = self.sync_client.describe(timeout_s=self.describe_timeout_s)
        except EditFailed as e:  # not up yet, gone or hung: the edits say so; asked again before the next round
            if e.code == grpc.StatusCode.UNIMPLEMENTED:  # a server without Describe: nothing to check, not asked again
                self.info[address] = {"backend": "", "device": "", "precision": ""}
            return
        self._note(address, info)

    def _note(self, address: str, info) -> None:
        self.info[address] = {"backend": info.backend, "device": info.device, "precision": info.precision}
        self.defaults[address] = described_defaults(info)
        self.ignored[address] = list(info.ignored_fields)
        note = precision_mismatch(self.precision_hint, address, info.precision, info.device, info.backend)
        if note is not None:
            CONSOLE.print(note, soft_wrap=True)  # one line, whatever the terminal's width

    def state(self, address: str) -> str:
        """ "up" (its stream is open), "down" (it was, and is not now: the server died or went away), "connecting"
        (never reached yet), or "" (no stream client: sync mode, not started, or a stand-in that does not say)."""
        client = dict(zip(self.addresses, self.clients)).get(address)
        connected = getattr(client, "connected", None)
        if connected is None:
            return ""
        if connected:
            self.seen_up.add(address)
            return "up"
        return "down" if address in self.seen_up or address in self.info else "connecting"

    def edit_settings(self, config, address: str) -> dict[str, float | int]:
        """The edit parameters to send to `address` (`edit_settings` with its backend's defaults, once its Describe
        has answered); says once per server, in one line, which of its backend's defaults stand in for parameters
        the user left unset and which parameters the user set that its backend ignores."""
        if address not in self.info and self.clients:
            self.note_describes()  # a server that connected since the last look
        defaults = self.defaults.get(address)
        settings = edit_settings(config, defaults)
        if defaults is not None and address not in self._said_defaults:
            self._said_defaults.add(address)
            ignored = set(self.ignored.get(address, []))
            taken = [  # only those that differ from what an IP2P server gets
                f"{n} {settings[n]:g}"
                for n in CONTRACT_DEFAULTS
                if getattr(config, n) is None and n not in ignored and settings[n] != CONTRACT_DEFAULTS[n]
            ]
            unused = [n for n in CONTRACT_DEFAULTS if getattr(config, n) is not None and n in ignored]
            backend = self.info.get(address, {}).get("backend") or "its backend"
            parts = [f"its defaults for what you left unset: {', '.join(taken)}"] if taken else []
            parts += [f"it ignores {', '.join(unused)}, which you set"] if unused else []
            if parts:
                CONSOLE.print(f"in2n: the server at {address} runs {backend}; {'; '.join(parts)}", soft_wrap=True)
        return settings

    def metrics(self) -> list[dict]:
        """Per server: address, the backend, device and precision its Describe reported ("" before it answered),
        its state now (see `state`), edits sent to it, applied and failed."""
        rows = []
        for address in self.addresses:
            info = self.info.get(address, {"backend": "", "device": "", "precision": ""})
            counts = self.counts.get(address, {"edits_applied": 0, "edits_failed": 0})
            rows.append(
                {"address": address, **info, "state": self.state(address), "edits_sent": self.sent.get(address, 0),
                 **counts}
            )  # fmt: skip
        return rows

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.clients = []
        if self.sync_client is not None:
            self.sync_client.close()
            self.sync_client = None
