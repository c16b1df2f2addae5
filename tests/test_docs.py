"""The repository carries its own documentation: nothing points outside it, and its links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = ".." + "/shared"  # spelled in two parts so this file does not match itself
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or [text](target#anchor)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = []
    for name in out.splitlines():
        path = REPO / name
        if path.is_file() and path.suffix in {".py", ".md", ".proto", ".toml", ".sh", ".txt", ".lock", ".yaml", ".yml", ""}:
            files.append(path)
    return files


def test_no_file_points_outside_the_repository() -> None:
    files = _tracked_text_files()
    assert any(f.name == "README.md" for f in files)
    offenders = [str(f.relative_to(REPO)) for f in files if OUTSIDE in f.read_text(errors="replace")]
    assert not offenders, f"files that refer to {OUTSIDE}: {offenders}"


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
    """docs/options.md is what tools/gen_options.py makes of the config dataclasses today."""
    proc = subprocess.run([sys.executable, "tools/gen_options.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("page,prefix", [("docs/trainer.md", "--pipeline."), ("docs/server.md", "--")])
def test_hand_written_option_notes_name_only_real_options(page: str, prefix: str) -> None:
    """Every option a page's option table names exists in the generated list (no renamed or removed flag lingers)."""
    generated = set(re.findall(r"`(--[a-z0-9.-]+)`", (REPO / "docs/options.md").read_text()))
    rows = [line for line in (REPO / page).read_text().splitlines() if line.startswith("| `--")]
    named = {flag for row in rows for flag in re.findall(r"`(--[a-z0-9.-]+)`", row.split("|")[1]) if flag.startswith(prefix)}
    assert len(named) >= 10, named
    assert named <= generated, f"{page} names options that do not exist: {sorted(named - generated)}"
