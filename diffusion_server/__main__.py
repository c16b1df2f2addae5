"""`python -m diffusion_server --backend ... --port ...`: parse the options with tyro and serve."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import tyro

from diffusion_server.backends import BACKEND_NAMES
from diffusion_server.config import ServerConfig
from diffusion_server.server import run_cli


def _unknown_backend(argv: list[str]) -> str | None:
    """The value of --backend if it names no backend (checked before tyro, for a one-line error)."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--backend="):
            value = arg.split("=", 1)[1]
        else:
            continue
        if value not in BACKEND_NAMES:
            return value
    return None


def refuse_unknown_backend(argv: list[str], prog: str) -> bool:
    """Print the one-line error for an unknown --backend (before tyro's long one); True when refused."""
    unknown = _unknown_backend(argv)
    if unknown is not None:
        print(
            f"{prog}: error: --backend {unknown!r} is unknown; choose one of {', '.join(BACKEND_NAMES)}",
            file=sys.stderr,
        )
    return unknown is not None


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if refuse_unknown_backend(args, "diffusion_server"):
        return 2
    config = tyro.cli(ServerConfig, args=args, prog="python -m diffusion_server")
    return run_cli(config)


if __name__ == "__main__":
    sys.exit(main())
