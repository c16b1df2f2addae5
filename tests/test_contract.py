"""The contract's Python side (`in2n_contract`) and the backends' one pattern.

- `in2n_contract` imports without the server, torch or nerfstudio (a client needs only it and the generated code);
- the method defaults a request's unset fields take are the trainer config's defaults;
- every registered backend reports its own name (Describe's `backend` comes from the backend, not the config);
- the recipe of an original's key, as the contract spells it out, is the key the client computes and the server checks.
"""

from __future__ import annotations

import ast
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import in2n_contract
from diffusion_server.backends import BACKEND_NAMES, create_backend
from diffusion_server.backends.identity import IdentityBackend
from in2n_contract import pb
from testing_support import InProcessServer

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("modules", ["in2n_contract, in2n_contract.codec, in2n_contract.messages", "in2n_client"])
def test_contract_and_clients_import_nothing_of_the_server(modules: str) -> None:
    code = (
        f"import sys, {modules}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'diffusion_server', 'nerf_trainer', 'torch', 'nerfstudio'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_no_server_module_imports_a_client() -> None:
    """The layering, read from the source: diffusion_server/ never imports in2n_client (the server needs no client)."""
    offenders = []
    for path in sorted((REPO / "diffusion_server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "in2n_client"]
    assert not offenders, offenders


def test_service_name_is_the_protos() -> None:
    assert (
        in2n_contract.SERVICE_NAME == pb.DESCRIPTOR.services_by_name["EditService"].full_name == "in2n.v1.EditService"
    )


def test_trainer_config_takes_the_contract_defaults() -> None:
    """The trainer's edit parameters are unset (None: the server's backend defaults, from its Describe), and its
    fallback for a server that reports none names the contract's defaults rather than repeating the numbers (read
    from the sources: importing the pipeline pulls in nerfstudio)."""
    tree = ast.parse((REPO / "nerf_trainer" / "pipeline.py").read_text())
    config = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "In2nPipelineConfig")
    defaults = {
        n.target.id: ast.unparse(n.value)
        for n in config.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value
    }
    servers = ast.parse((REPO / "nerf_trainer" / "servers.py").read_text())
    fallback = next(
        n.value for n in servers.body if isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == "CONTRACT_DEFAULTS"
    )
    named = {ast.literal_eval(k): ast.unparse(v) for k, v in zip(fallback.keys, fallback.values)}
    for name in ("guidance_scale", "image_guidance_scale", "diffusion_steps", "lower_bound", "upper_bound"):
        assert defaults[name] == "None", (name, defaults[name])
        assert named[name] == f"DEFAULT_{name.upper()}", (name, named[name])
        assert getattr(in2n_contract.EditParams("x"), name) == getattr(in2n_contract, f"DEFAULT_{name.upper()}")


@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES if n not in ("ip2p", "ip2p-xl", "flux-kontext")])  # weights
def test_backend_reports_its_registry_name(name: str) -> None:
    assert create_backend(name, device="cpu").name == name


def test_describe_reports_the_backends_name_not_the_configs() -> None:
    with InProcessServer(IdentityBackend()) as server:  # its config says backend="palette"
        described = server.stub.Describe(pb.DescribeRequest(), timeout=30)
    assert described.backend == "identity"


def _documented_original_key(height: int, width: int, channels: int, dtype_code: str, data: bytes) -> str:
    """The original's key as the .proto and docs/contract.md spell it out, written from that text alone."""
    header = f"({height}, {width}, {channels})|{dtype_code}|".encode("ascii")
    return hashlib.sha256(header + data).hexdigest()[:32]


def test_the_documented_original_key_is_the_one_the_server_checks() -> None:
    """The recipe of `original_key` in the contract (a client in another language follows it) is what
    `original_key` computes and what the server checks (`wire_original_key`), for every dtype that travels."""
    from in2n_client import make_request, original_key
    from in2n_contract import EditParams
    from in2n_contract.codec import wire_original_key

    rng = np.random.default_rng(0)
    pixels = rng.random((5, 7, 3))  # [H, W, 3] float64
    images = {
        "|u1": np.rint(pixels * 255).astype(np.uint8),
        "<f2": pixels.astype(np.float16),
        "<f4": pixels.astype(np.float32),
        "float64": pixels,  # travels as float32: keyed as the float32 sent
    }
    for name, image in images.items():
        wire = make_request("r", 0, image, image, EditParams("x")).original
        code = {pb.DTYPE_UINT8: "|u1", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_FLOAT32: "<f4"}[wire.dtype]
        expected = _documented_original_key(wire.height, wire.width, wire.channels, code, wire.data)
        assert original_key(image) == wire_original_key(wire) == expected, name
    proto = (REPO / "protos/in2n/v1/edit_service.proto").read_text()
    contract = (REPO / "docs/contract.md").read_text()
    for text in (proto, contract):  # the recipe and the secrecy of client_id are written down
        flat = " ".join(text.replace("//", " ").split())
        assert "SHA-256" in flat and "first 32 characters" in flat and "(H, W, C)|S|" in flat
        assert "client_id` is a capability" in flat and "never logs it in clear" in flat
        assert "chosen by the client" not in flat
