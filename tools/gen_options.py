"""Write docs/options.md, the option tables of the trainer and the server, from their config dataclasses.

The tables are what `ns-train in2n --help` and `python -m diffusion_server --help` print,
generated from the same source (each field, its default and the docstring under it), so
they cannot drift from the code: `tests/test_docs.py` fails when the file is out of date.

    python tools/gen_options.py          # rewrite docs/options.md
    python tools/gen_options.py --check  # exit 1 when docs/options.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "options.md"


def field_docs(cls: type) -> dict:
    """{field name: the docstring under it} for the fields `cls` itself declares."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str, Path)):
        return f"`{value}`" if str(value) else '`""`'
    return type(value).__name__


def rows(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(flag, default, meaning) of each documented field `cls` declares, in declaration order."""
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name in skip or f.name not in docs:
            continue
        out.append((f"`{prefix}{f.name.replace('_', '-')}`", _default(f), docs[f.name].replace("|", "\\|")))
    return out


def table(entries: list[tuple[str, str, str]]) -> str:
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| {flag} | {default} | {meaning} |" for flag, default, meaning in entries]
    return "\n".join(lines)


def render() -> str:
    sys.path.insert(0, str(REPO))
    from diffusion_server.config import ServerConfig
    from nerf_trainer.model import In2nModelConfig
    from nerf_trainer.pipeline import In2nPipelineConfig
    from nerf_trainer.trainer import In2nTrainerConfig

    return f"""# Options

Generated from the config dataclasses by `python tools/gen_options.py` (do not edit by hand;
`make test` checks that this page is up to date). The same text is the `--help` of each command.

## The trainer: `ns-train in2n` (and `in2n-small`, `in2n-tiny`)

Every option in2n adds to nerfstudio's: the run's, the edit's (`--pipeline.*`) and the model's
(`--pipeline.model.*`). nerfstudio's own options (`--max-num-iterations`, `--load-dir`,
`--pipeline.datamanager.*`, nerfacto's `--pipeline.model.*`, ...) are in `ns-train in2n --help`.
The defaults below are the dataclasses'; each variant sets some of them (its IP2P precision in
`--pipeline.server-precision-hint`, LPIPS, patch size; see the variant table in
[method.md](method.md#the-three-variants)).

### The run (`In2nTrainerConfig`)

{table(rows(In2nTrainerConfig, "--"))}

### The edit (`In2nPipelineConfig`)

{table(rows(In2nPipelineConfig, "--pipeline.", skip=("datamanager", "model")))}

### The model's losses (`In2nModelConfig`)

{table(rows(In2nModelConfig, "--pipeline.model."))}

## The diffusion server: `python -m diffusion_server`

{table(rows(ServerConfig, "--"))}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/options.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(
                f"{OUTPUT.relative_to(REPO)} is out of date with the config dataclasses: run python tools/gen_options.py"
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
