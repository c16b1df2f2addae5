"""The contract's Python side (`in2n_contract`) and the backends' one pattern.

- `in2n_contract` imports without the server, torch or nerfstudio (a client needs only it and the generated code);
- the method defaults a request's unset fields take are the trainer config's defaults;
- every registered backend reports its own name (Describe's `backend` comes from the backend, not the config).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import in2n_contract
from diffusion_server.backends import BACKEND_NAMES, create_backend
from diffusion_server.backends.identity import IdentityBackend
from in2n_contract import pb
from testing_support import InProcessServer

REPO = Path(__file__).resolve().parents[1]


def test_contract_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, in2n_contract\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'diffusion_server', 'nerf_trainer', 'torch', 'nerfstudio'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_service_name_is_the_protos() -> None:
    assert in2n_contract.SERVICE_NAME == pb.DESCRIPTOR.services_by_name["EditService"].full_name == "in2n.v1.EditService"


def test_trainer_config_takes_the_contract_defaults() -> None:
    """The trainer's config names the contract's defaults rather than repeating the numbers (read from its source:
    importing the pipeline pulls in nerfstudio)."""
    tree = ast.parse((REPO / "nerf_trainer" / "pipeline.py").read_text())
    config = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "In2nPipelineConfig")
    defaults = {
        n.target.id: ast.unparse(n.value) for n in config.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value
    }
    for name in ("guidance_scale", "image_guidance_scale", "diffusion_steps", "lower_bound", "upper_bound"):
        assert defaults[name] == f"DEFAULT_{name.upper()}", (name, defaults[name])
        assert getattr(in2n_contract.EditParams("x"), name) == getattr(in2n_contract, f"DEFAULT_{name.upper()}")


@pytest.mark.parametrize("name", [n for n in BACKEND_NAMES if n not in ("ip2p", "ip2p-xl")])  # those need weights
def test_backend_reports_its_registry_name(name: str) -> None:
    assert create_backend(name, device="cpu").name == name


def test_describe_reports_the_backends_name_not_the_configs() -> None:
    with InProcessServer(IdentityBackend()) as server:  # its config says backend="palette"
        described = server.stub.Describe(pb.DescribeRequest(), timeout=30)
    assert described.backend == "identity"
