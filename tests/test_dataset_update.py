"""The Iterative Dataset Update's bookkeeping: order, pacing, and what may touch the dataset."""

import numpy as np
import pytest

from nerf_trainer.dataset_update import DatasetUpdateSchedule

SHAPE = (8, 6, 3)


def good_image(value: float = 0.5) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


def test_order_is_a_random_permutation_edited_cyclically():
    schedule = DatasetUpdateSchedule(num_views=7, edit_rate=1, edit_count=1, max_in_flight=1, seed=3)
    assert sorted(schedule.order) == list(range(7))
    assert schedule.order != list(range(7))  # randomised once (seed 3 gives a non-identity order)
    taken = []
    for step in range(14):
        view = schedule.next_view(step)
        taken.append(view)
        schedule.submitted(f"r{step}", view, step)
        assert schedule.accept(f"r{step}", view, good_image(), SHAPE) is not None
    assert taken == schedule.order * 2


def test_edit_rate_and_count_bound_new_edits_per_window():
    schedule = DatasetUpdateSchedule(num_views=10, edit_rate=5, edit_count=2, max_in_flight=100)
    started = 0
    for step in range(20):
        while schedule.may_start(step):
            view = schedule.next_view(step)
            schedule.submitted(f"r{started}", view, step)
            started += 1
    assert started == 2 * (20 // 5)


def test_in_flight_window_bounds_outstanding_edits():
    schedule = DatasetUpdateSchedule(num_views=10, edit_rate=1, edit_count=10, max_in_flight=3)
    for i in range(3):
        assert schedule.may_start(0)
        schedule.submitted(f"r{i}", schedule.next_view(0), 0)
    assert not schedule.may_start(0)
    assert not schedule.may_start(0, reserved=0)
    schedule.accept("r0", schedule.in_flight["r0"].view, good_image(), SHAPE)
    assert schedule.may_start(0)
    assert not schedule.may_start(0, reserved=1)


@pytest.mark.parametrize(
    "image, why",
    [
        (np.full((8, 5, 3), 0.5, dtype=np.float32), "shape"),
        (np.full(SHAPE, np.nan, dtype=np.float32), "NaN"),
        (np.full(SHAPE, 1.5, dtype=np.float32), "outside"),
        (None, "no image"),
    ],
)
def test_bad_results_are_rejected_and_their_view_requeued_first(image, why, caplog):
    schedule = DatasetUpdateSchedule(num_views=5, edit_rate=1, edit_count=1, max_in_flight=2, seed=0)
    view = schedule.next_view(0)
    schedule.submitted("bad", view, 0)
    assert schedule.accept("bad", view, image, SHAPE) is None
    assert schedule.stats.rejected == 1 and schedule.stats.applied == 0
    assert why in caplog.text
    assert schedule.next_view(1) == view  # re-queued ahead of the order


def test_an_undecodable_result_counts_as_rejected_not_failed(caplog):
    """A result the client refused when decoding it (NaN, out of range, no pixels) is a rejected edit."""
    schedule = DatasetUpdateSchedule(num_views=5, edit_rate=1, edit_count=1, max_in_flight=2, seed=0)
    view = schedule.next_view(0)
    schedule.submitted("bad", view, 0)
    schedule.reject("bad", "bad response: edited: contains NaN or infinite values")
    assert (schedule.stats.rejected, schedule.stats.failed, schedule.stats.applied) == (1, 0, 0)
    assert "rejected" in caplog.text and "NaN" in caplog.text
    assert not schedule.in_flight and schedule.next_view(1) == view  # slot freed, view re-queued first


def test_result_naming_another_view_is_rejected():
    schedule = DatasetUpdateSchedule(num_views=5, edit_rate=1, edit_count=1, max_in_flight=2, seed=0)
    view = schedule.next_view(0)
    schedule.submitted("r", view, 0)
    assert schedule.accept("r", (view + 1) % 5, good_image(), SHAPE) is None
    assert schedule.stats.rejected == 1


def test_older_edit_arriving_after_a_newer_one_is_dropped():
    schedule = DatasetUpdateSchedule(num_views=1, edit_rate=1, edit_count=5, max_in_flight=5)
    schedule.submitted("old", 0, 0)
    schedule.submitted("new", 0, 1)
    assert schedule.accept("new", 0, good_image(0.2), SHAPE) is not None
    assert schedule.accept("old", 0, good_image(0.8), SHAPE) is None
    assert schedule.stats.stale == 1 and schedule.stats.applied == 1


def test_failed_request_requeues_view_and_frees_its_slot():
    schedule = DatasetUpdateSchedule(num_views=4, edit_rate=1, edit_count=4, max_in_flight=1, seed=1)
    view = schedule.next_view(0)
    schedule.submitted("r", view, 0)
    assert not schedule.may_start(0)
    schedule.failed("r", "UNAVAILABLE: server went away")
    assert schedule.stats.failed == 1
    assert schedule.may_start(0)
    assert schedule.next_view(0) == view


@pytest.mark.parametrize("kwargs", [{"num_views": 0}, {"edit_rate": 0}, {"edit_count": 0}, {"max_in_flight": 0}])
def test_bad_arguments_name_themselves(kwargs):
    args = {"num_views": 3, "edit_rate": 1, "edit_count": 1, "max_in_flight": 1} | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DatasetUpdateSchedule(**args)


def test_max_edits_per_view_edits_each_view_that_often_then_stops():
    schedule = DatasetUpdateSchedule(
        num_views=4, edit_rate=1, edit_count=1, max_in_flight=2, seed=0, max_edits_per_view=1
    )
    taken = []
    step = 0
    while schedule.may_start(step):
        view = schedule.next_view(step)
        schedule.submitted(f"r{step}", view, step)
        taken.append(view)
        if step % 2:  # leave one in flight now and then: in-flight edits count toward the limit
            for rid, sub in list(schedule.in_flight.items()):
                schedule.accept(rid, sub.view, good_image(), SHAPE)
        step += 1
    for rid, sub in list(schedule.in_flight.items()):
        schedule.accept(rid, sub.view, good_image(), SHAPE)
    assert sorted(taken) == [0, 1, 2, 3]
    assert schedule.finished and not schedule.may_start(step + 1)


def test_max_edits_per_view_still_retries_a_failed_view():
    schedule = DatasetUpdateSchedule(
        num_views=2, edit_rate=1, edit_count=1, max_in_flight=1, seed=0, max_edits_per_view=1
    )
    first = schedule.next_view(0)
    schedule.submitted("a", first, 0)
    schedule.failed("a", "UNAVAILABLE")
    assert schedule.may_start(1) and schedule.next_view(1) == first


def test_evolution_sheet_labels_its_columns() -> None:
    """The sheet's header band names the columns: text (dark pixels) above the original, the edits and the render."""
    import torch

    from nerf_trainer.report import HEADER_HEIGHT, EvolutionRecorder

    originals = torch.full((3, 16, 16, 3), 0.5)
    rec = EvolutionRecorder(views=[0, 2], originals=originals)
    for v in (0, 2):
        rec.record_edit(v, torch.full((16, 16, 3), 0.2))
        rec.record_edit(v, torch.full((16, 16, 3), 0.8))
        rec.record_after(v, torch.full((16, 16, 3), 0.7))
    sheet = rec.evolution_sheet()  # [header + rows, 4 columns of 128 px + padding, 3]
    cell = (sheet.shape[1] - 2) // 4
    band = sheet[:HEADER_HEIGHT]
    for col in (0, 1, 3):  # original | edits over time -> (over columns 1-2) | current render
        assert (band[:, 2 + col * cell : (col + 1) * cell] < 128).any(), f"no label above column {col}"
    assert (sheet[HEADER_HEIGHT + 2 : HEADER_HEIGHT + 10, 2:20] == 128).all()  # the original's pixels start below it
