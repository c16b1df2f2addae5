"""The repository carries its own documentation: nothing points outside it, and its links resolve."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or [text](target#anchor)

# References to places outside the repository, each spelled in parts so this file does not match itself:
# the development workspace's shared folder (relative, or by its docs folder) and absolute paths into someone's
# machine (a workspace, a home folder). Scratch paths a command creates (/tmp/...) and system paths (/usr/bin/env)
# are not references to files the project needs, and are allowed.
OUTSIDE = re.compile(
    "|".join(re.escape(p) for p in (".." + "/shared", "shared" + "/docs", "/" + "work/", "/" + "home/", "/" + "Users/", "/" + "root/", "/" + "mnt/"))
)  # fmt: skip


def _tracked_text_files() -> list[Path]:
    """Every git-tracked file that is text. Excluded, and only these: files a checkout lacks (a deleted but still
    tracked file has nothing to read) and binary files (a NUL byte or not UTF-8: images, archives; no one follows a
    path inside them, and read as text they would match by chance)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        try:
            if b"\0" not in data:
                data.decode("utf-8")
                files.append(path)
        except UnicodeDecodeError:
            pass
    return files


def test_no_file_points_outside_the_repository() -> None:
    files = _tracked_text_files()
    names = {str(f.relative_to(REPO)) for f in files}
    # every kind of tracked text file is read, the ones the earlier check skipped included
    assert {"README.md", "pyproject.toml", ".gitignore", "Makefile"} <= names
    assert any(n.endswith(".json") for n in names) and any(n.endswith(".pyi") for n in names)
    offenders = [
        f"{f.relative_to(REPO)}:{k}: {match.group(0)}"
        for f in files
        for k, line in enumerate(f.read_text().splitlines(), 1)
        for match in OUTSIDE.finditer(line)
    ]
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_the_outside_check_catches_each_kind_of_reference() -> None:
    """The pattern matches what it is meant to, and not the allowed scratch and system paths."""
    for text in ("see .." + "/shared/" + "docs/method.md", "shared" + "/docs/x.md", "cd /" + "work/main", "/" + "home/me/in2n",
                 "/" + "Users/me/x", "/" + "root/.cache/x", "/" + "mnt/data/x"):  # fmt: skip
        assert OUTSIDE.search(text), text
    for text in ("git clone <repo> /tmp/x", "#!/usr/bin/env bash", "docs/method.md", "testing_support/"):
        assert not OUTSIDE.search(text), text


@pytest.mark.parametrize("doc", ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))])
def test_relative_links_resolve(doc: str) -> None:
    path = REPO / doc
    targets = [t for t in LINK.findall(path.read_text()) if "://" not in t and not t.startswith("mailto:")]
    missing = [t for t in targets if not (path.parent / t).exists()]
    assert not missing, f"{doc} links to missing files: {missing}"


def test_method_doc_states_the_noise_timestep() -> None:
    """docs/method.md describes the edit the backend runs: noise at the schedule's first timestep."""
    text = (REPO / "docs/method.md").read_text()
    assert "t0, the schedule's first timestep" in text
    assert "num_train_timesteps = T" in text


def test_option_tables_are_generated_from_the_configs() -> None:
    """docs/options.md is what tools/gen_options.py makes of the config dataclasses as they are."""
    proc = subprocess.run(
        [sys.executable, "tools/gen_options.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def declared_fields(source: str, cls: str) -> list[str]:
    """Fields with a docstring that class `cls` declares in the file `source` (read, not imported)."""
    (node,) = [n for n in ast.parse((REPO / source).read_text()).body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [
        a.target.id for a, doc in zip(node.body, node.body[1:])
        if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and not a.target.id.startswith("_")
        and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "source,cls,prefix",
    [
        ("nerf_trainer/trainer.py", "In2nTrainerConfig", "--"),
        ("nerf_trainer/pipeline.py", "In2nPipelineConfig", "--pipeline."),
        ("nerf_trainer/model.py", "In2nModelConfig", "--pipeline.model."),
        ("diffusion_server/config.py", "ServerConfig", "--"),
    ],
)
def test_option_tables_name_every_option_the_project_declares(source: str, cls: str, prefix: str) -> None:
    """README calls docs/options.md every option: each field a project config declares is a row there."""
    rows = {
        line.split("|")[1].strip()
        for line in (REPO / "docs/options.md").read_text().splitlines()
        if line.startswith("| `--")
    }
    skip = {"datamanager", "model"}  # sub-configs, not options: their own fields have their own rows
    fields = [f for f in declared_fields(source, cls) if f not in skip]
    assert fields, cls
    missing = [f for f in fields if f"`{prefix}{f.replace('_', '-')}`" not in rows]
    assert not missing, f"docs/options.md lacks {cls}'s {missing}: run python tools/gen_options.py"


@pytest.mark.parametrize("page,prefix", [("docs/trainer.md", "--pipeline."), ("docs/server.md", "--")])
def test_hand_written_option_notes_name_only_real_options(page: str, prefix: str) -> None:
    """Every option a page's option table names exists in the generated list (no renamed or removed flag lingers)."""
    generated = set(re.findall(r"`(--[a-z0-9.-]+)`", (REPO / "docs/options.md").read_text()))
    rows = [line for line in (REPO / page).read_text().splitlines() if line.startswith("| `--")]
    named = {
        flag for row in rows for flag in re.findall(r"`(--[a-z0-9.-]+)`", row.split("|")[1]) if flag.startswith(prefix)
    }
    assert len(named) >= 10, named
    assert named <= generated, f"{page} names options that do not exist: {sorted(named - generated)}"
