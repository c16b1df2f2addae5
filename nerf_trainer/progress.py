"""The terminal progress table of an edit run: the edit's own steps, its ETA, the edits applied.

nerfstudio's table counts steps from the pretrained checkpoint's step and measures
progress against `max_num_iterations` alone, so a 300-step edit resumed from a
1000-step nerfacto showed "1040 (346.67%)", and its ETA used the variant's 30000
iterations. `EditProgressWriter` shows step k of the run's N steps (0 to 100 %),
and `In2nTrainer.setup` (trainer.py) points the ETA at the run's last step, so the
ETA is the measured step time times the steps left. A column "Edits applied" holds
the latest count the pipeline logged.

`edit_status_line` is the pipeline's own status line (every `--pipeline.log-every`
steps, and once at the end of the run, so a run shorter than that shows its final
counts too): the edit counters, then, with several servers or when one is down, the
edits applied by each server, a server that went down marked "down".
"""

from __future__ import annotations

from typing import Any

from nerfstudio.utils import writer
from nerfstudio.utils.writer import GLOBAL_BUFFER, LocalWriter

EDITS_APPLIED = "Edits/edits_applied"
"""The pipeline's scalar (pipeline._log) shown in the table."""


class EditProgressWriter(LocalWriter):
    """nerfstudio's LocalWriter, with steps and percentage counted from the start of this run."""

    def __init__(self, config: Any, banner_messages: list | None = None) -> None:
        super().__init__(config, banner_messages=banner_messages)
        self.stats_to_track.append(EDITS_APPLIED)
        self.first_step = 0
        """Absolute step at which this run started (the loaded checkpoint's step + 1; 0 from scratch)."""
        self.num_steps: int | None = None
        """Steps of this run (max_num_iterations); None: nerfstudio's own count."""
        self._edits_applied: float | None = None

    def start(self, first_step: int, num_steps: int) -> None:
        """Count this run's steps from `first_step`, `num_steps` in all; the ETA then covers what is left of them."""
        self.first_step, self.num_steps = int(first_step), int(num_steps)
        GLOBAL_BUFFER["max_iter"] = self.first_step + self.num_steps  # ETA = (max_iter - step) x mean step time

    def _consolidate_events(self):  # type: ignore[no-untyped-def]
        latest_map, new_key = super()._consolidate_events()
        if EDITS_APPLIED in latest_map:
            self._edits_applied = latest_map[EDITS_APPLIED]
        elif self._edits_applied is not None:  # logged every 10 steps: keep the column steady in between
            latest_map[EDITS_APPLIED] = self._edits_applied
        return latest_map, new_key

    def write_stats_log(self, step: int) -> None:
        if self.num_steps is None:
            super().write_stats_log(step)
            return
        saved = GLOBAL_BUFFER.get("step"), GLOBAL_BUFFER.get("max_iter")
        GLOBAL_BUFFER["step"] = GLOBAL_BUFFER.get("step", step) - self.first_step + 1  # steps done in this run
        GLOBAL_BUFFER["max_iter"] = self.num_steps
        try:
            super().write_stats_log(step)
        finally:
            GLOBAL_BUFFER["step"], GLOBAL_BUFFER["max_iter"] = saved


def start_run_progress(first_step: int, num_steps: int) -> bool:
    """Tell the active EditProgressWriter (if any) where this run starts; True when one was found."""
    found = False
    for w in writer.EVENT_WRITERS:
        if isinstance(w, EditProgressWriter):
            w.start(first_step, num_steps)
            found = True
    return found


def edit_status_line(metrics: dict[str, float], servers: list[dict]) -> str:
    """The status line: "in2n: edits applied 3, ...", then "; by server: ADDRESS (DEVICE) APPLIED[ down], ..." when
    there are several servers or one is not up (`servers`: EditServers.metrics() rows; a "state" of "down" or
    "connecting" is shown after the count)."""
    line = "in2n: " + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in metrics.items())
    if len(servers) > 1 or any(s.get("state") in ("down", "connecting") for s in servers):
        line += "; by server: " + ", ".join(
            f"{s['address']} ({s['device'] or '?'}) {s['edits_applied']}"
            + (f" {s['state']}" if s.get("state") in ("down", "connecting") else "")
            for s in servers
        )
    return line
