"""The terminal table of an edit run counts the run's own steps (0 to 100 %), its ETA covers the steps left;
the status line shows the edits per server, and names a server that is down."""

from __future__ import annotations

import re

import pytest
from nerfstudio.configs.base_config import LocalWriterConfig, LoggingConfig
from nerfstudio.utils import writer
from nerfstudio.utils.writer import EventName

from nerf_trainer.progress import EDITS_APPLIED, EditProgressWriter, edit_status_line, start_run_progress


@pytest.fixture
def table(capsys):
    """A run resumed at step 1001 (a 1000-step nerfacto) for 300 steps, 0.5 s a step; the printed lines by step."""
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()
    logging = LoggingConfig(local_writer=LocalWriterConfig(_target=EditProgressWriter, enable=True, max_log_size=0))
    writer.setup_local_writer(logging, max_iter=30000)  # the variant's max_num_iterations, as nerfstudio sets it
    try:
        assert start_run_progress(first_step=1001, num_steps=300)
        for step in range(1001, 1301):
            writer.put_time(EventName.ITER_TRAIN_TIME, 0.5, step, update_eta=True)
            if step % 10 == 0:
                writer.put_scalar(EDITS_APPLIED, step // 10 - 100, step)
            writer.write_out_storage()
        yield capsys.readouterr().out
    finally:
        writer.EVENT_WRITERS.clear()
        writer.EVENT_STORAGE.clear()


def test_steps_and_percent_are_the_runs_own(table: str) -> None:
    rows = re.findall(r"^(\d+) \((\d+\.\d+)%\)", table, flags=re.MULTILINE)
    assert rows, table
    percents = [float(p) for _, p in rows]
    assert max(percents) <= 100.0
    assert rows[-1] == ("300", "100.00")  # the last step of the run is 100 %
    assert int(rows[0][0]) <= 10  # counted from the run's first step, not the checkpoint's


def test_eta_covers_the_steps_left_and_edits_are_shown(table: str) -> None:
    assert EDITS_APPLIED in table.splitlines()[0]  # a column header
    line_150 = next(line for line in table.splitlines() if line.startswith("150 ("))
    assert "1 m, 15 s" in line_150  # (1300 - 1150) steps x 0.5 s, not (30000 - 1150) x 0.5 s
    assert re.search(r"\b15\.0000\b", line_150)  # edits applied as logged at step 1150 (1150 // 10 - 100)


def row(address: str, applied: int, state: str = "up", device: str = "cpu") -> dict:
    return {"address": address, "backend": "palette", "device": device, "precision": "n/a", "state": state,
            "edits_sent": applied, "edits_applied": applied, "edits_failed": 0}  # fmt: skip


def test_the_status_line_names_a_server_that_is_down_and_the_counts_of_each() -> None:
    metrics = {"edits_applied": 7, "edits_failed": 1}
    line = edit_status_line(metrics, [row("a:1", 5), row("b:2", 2, state="down", device="cuda:1")])
    assert line.startswith("in2n: edits applied 7, edits failed 1; by server: ")
    assert line.endswith("a:1 (cpu) 5, b:2 (cuda:1) 2 down"), line
    # One server: no per-server part while it is up; named when it is down, or not reached yet.
    assert edit_status_line(metrics, [row("a:1", 7)]) == "in2n: edits applied 7, edits failed 1"
    assert edit_status_line(metrics, [row("a:1", 7, state="down")]).endswith("; by server: a:1 (cpu) 7 down")
    assert edit_status_line(metrics, [row("a:1", 0, state="connecting", device="")]).endswith("a:1 (?) 0 connecting")
