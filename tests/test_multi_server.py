"""Several edit servers (make run EDIT_DEVICE=a,b,...) and the variant's precision check.

- the pipeline in-process with two scripted servers: its in-flight window grows with the servers it
  can reach, and each server's edits are counted;
- a real server started with another --precision than the variant's: the trainer's one line;
- a real `ns-train in2n-tiny` run against two real servers: edits from both in edit_stats.json.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from conftest import NS_TRAIN, QUIET, make_pipeline

from in2n_client import StreamResult
from protos.in2n.v1 import edit_service_pb2 as pb

pytestmark = pytest.mark.filterwarnings("ignore")


def test_precision_mismatch_is_one_line_naming_the_server_and_both_precisions():
    from nerf_trainer.servers import precision_mismatch

    assert precision_mismatch("fp16", "h:1", "fp16") is None
    assert precision_mismatch("fp16", "h:1", "n/a") is None  # palette, identity: no IP2P, no precision
    assert precision_mismatch("fp16", "h:1", "") is None  # a server that did not say
    line = precision_mismatch("fp32", "gpu-box:50051", "fp16", "cuda:0")
    assert "\n" not in line and "gpu-box:50051" in line and "fp16" in line and "--precision fp32" in line
    # Half precision on the CPU is bf16 (what make run starts there): no note; fp16 itself is the variant's too.
    assert precision_mismatch("fp16", "h:1", "bf16", "cpu") is None
    assert precision_mismatch("fp16", "h:1", "fp16", "cpu") is None
    # Real mismatches still get the line, with the advice make run would follow on that device.
    line = precision_mismatch("fp16", "h:1", "fp32", "cpu")
    assert "runs IP2P in fp32 on cpu" in line and "--precision bf16" in line and "--precision fp16" not in line, line
    line = precision_mismatch("fp16", "h:1", "bf16", "cuda:0")  # on a GPU, fp16 is native: bf16 is not the variant's
    assert "runs IP2P in bf16 on cuda:0" in line and "--precision fp16" in line, line
    line = precision_mismatch("fp32", "h:1", "bf16", "cpu")  # in2n is full precision everywhere
    assert "bf16" in line and "--precision fp32" in line, line


def test_the_advice_is_the_precision_make_run_starts_for_each_variant_and_device():
    """Whatever make run (plan_servers, server_precision) starts for a variant on a device is never a mismatch."""
    from nerf_trainer.servers import precision_mismatch
    from nerf_trainer.variants import VARIANT_PRECISION, server_precision

    for method, precision in VARIANT_PRECISION.items():
        for device in ("cpu", "cuda:0", "cuda:1"):
            assert precision_mismatch(precision, "h:1", server_precision(method, device)[0], device) is None


def test_a_real_server_reports_its_precision_to_the_stream_client(edit_server_factory):
    """tiny-ip2p started with --precision bf16: the stream client's Describe says bf16 on cpu, the fp16 variants'
    precision there (no note), which the fp32 variant names."""
    from in2n_client import StreamClient
    from nerf_trainer.servers import precision_mismatch

    server = edit_server_factory("tiny-ip2p", extra_args=["--precision", "bf16"])
    with StreamClient(server.address) as client:
        deadline = time.monotonic() + 60
        while client.server_info is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.server_info is not None, "no Describe within 60 s"
        assert client.server_info.precision == "bf16" and client.server_info.device == "cpu"
    info = client.server_info
    assert precision_mismatch("fp16", server.address, info.precision, info.device) is None
    assert "bf16" in precision_mismatch("fp32", server.address, info.precision, info.device)


# -- the pipeline with two scripted servers ---------------------------------------------------------


class CappedClient:
    """Stands in for StreamClient: at most `cap` in flight, reachable or not; replies when the test says."""

    def __init__(self, cap: int, reachable: bool = True, precision: str = "fp16") -> None:
        self.cap, self.reachable = cap, reachable
        self.sent = []  # (request_id, view_id, render)
        self.open = []  # request ids in flight
        self.replies = []
        self.server_info = (
            pb.DescribeResponse(backend="tiny-ip2p", device="cpu", precision=precision) if reachable else None
        )
        self.prefix = f"c{id(self)}-"

    @property
    def in_flight(self) -> int:
        return len(self.open)

    @property
    def connected(self) -> bool:
        return self.reachable

    def can_submit(self) -> bool:
        return self.reachable and len(self.open) < self.cap

    def submit(self, view_id, render, original, params, key=None) -> str:
        assert self.can_submit()
        request_id = f"{self.prefix}{len(self.sent)}"
        self.sent.append((request_id, view_id, render))
        self.open.append(request_id)
        return request_id

    def answer_all(self) -> None:
        for request_id, view, render in self.sent:
            if request_id in self.open:
                self.replies.append(StreamResult(request_id, view, render.astype(np.float32) / 255.0))
        self.open = []

    def poll(self):
        replies, self.replies = self.replies, []
        return replies

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def two_server_pipeline(tiny_scene, trainer_env):
    """An in2n pipeline (tiny scene, tiny nerfacto) configured for two servers, variant precision fp16."""
    from nerf_trainer.servers import EditServers

    pipe = make_pipeline(tiny_scene, trainer_env, edit_server="server-a:1,server-b:1", max_in_flight=2,
                         server_precision_hint="fp16")  # fmt: skip
    # One of the two servers unreachable at first; the test brings it up.
    stand_ins = {"server-a:1": CappedClient(2), "server-b:1": CappedClient(2, reachable=False)}
    pipe.edit_servers = EditServers.from_config(pipe.config, make_client=stand_ins.__getitem__)
    pipe.update_dataset(0)  # starts the update: the two stand-in clients
    yield pipe
    pipe.edit_servers.close()


def run_steps(pipe, start: int, count: int) -> int:
    for step in range(start, start + count):
        pipe.update_dataset(step)
    return start + count


def test_the_window_grows_with_the_servers_the_trainer_can_reach(two_server_pipeline, capsys):
    pipe = two_server_pipeline
    # One of the two servers unreachable: the trainer keeps the reachable one's window full, no more.
    up, down = pipe.edit_servers.clients
    step = run_steps(pipe, 1, 12)
    assert (up.in_flight, down.in_flight, len(pipe.schedule.in_flight)) == (2, 0, 2)
    assert [row["state"] for row in pipe.server_metrics()] == ["up", "connecting"]  # never reached: not "down"
    # The second server comes up: the window grows to both servers' and both are kept full.
    down.reachable = True
    down.server_info = pb.DescribeResponse(backend="tiny-ip2p", device="cpu", precision="fp32")
    step = run_steps(pipe, step, 12)
    assert (up.in_flight, down.in_flight, len(pipe.schedule.in_flight)) == (2, 2, 4)
    assert pipe.edit_metrics()["edits_in_flight_peak"] == 4
    # Answers are counted per server, with the device and precision each Describe reported.
    up.answer_all()
    down.answer_all()
    step = run_steps(pipe, step, 1)
    rows = {row["address"]: row for row in pipe.server_metrics()}
    assert [rows[a]["edits_applied"] for a in pipe.edit_servers.addresses] == [2, 2]
    assert [rows[a]["precision"] for a in pipe.edit_servers.addresses] == ["fp16", "fp32"]
    assert all(rows[a]["device"] == "cpu" for a in pipe.edit_servers.addresses)
    # The fp32 server (the variant is fp16) was named once, in one line, whatever the steps after.
    run_steps(pipe, step, 5)
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "runs IP2P in" in line]
    assert len(notes) == 1 and pipe.edit_servers.addresses[1] in notes[0] and "fp32" in notes[0], out
    # The first server goes away: the status line names it down, with its count; the run's end prints the counts.
    up.reachable = False
    step = run_steps(pipe, step, 1)
    a, b = pipe.edit_servers.addresses
    assert [rows["state"] for rows in pipe.server_metrics()] == ["down", "up"]
    pipe._finish(step)  # the end of the run (no run folder: nothing written)
    (final,) = [line for line in capsys.readouterr().out.splitlines() if "by server:" in line]
    assert f"{a} (cpu) 2 down" in final and f"{b} (cpu) 2," not in final and final.rstrip().endswith(f"{b} (cpu) 2")


# -- a real trainer run against two real servers -------------------------------------------------------


def test_ns_train_edits_on_two_servers_and_names_the_one_with_another_precision(
    pretrained, trainer_env, edit_server_factory, tmp_path
):
    """`ns-train in2n-tiny --pipeline.edit-server A,B` with A a tiny IP2P in fp32 (the variant is fp16) and B
    identity with a fixed cost: edits come back from both (edit_stats.json, per server, with its device), the
    status line shows edits per server, and the trainer names A's precision once, in one line."""
    fp32 = edit_server_factory("tiny-ip2p", extra_args=["--precision", "fp32"])
    slow = edit_server_factory("identity", extra_args=["--delay-ms", "100"])
    cmd = [NS_TRAIN, "in2n-tiny", "--load-dir", str(pretrained), "--output-dir", str(tmp_path / "out"),
           "--experiment-name", "tiny", "--timestamp", "edit", "--max-num-iterations", "60",
           "--pipeline.edit-server", f"{fp32.address},{slow.address}",
           "--pipeline.datamanager.train-num-rays-per-batch", "256", "--pipeline.edit-rate", "1",
           "--pipeline.edit-seed", "0", "--pipeline.diffusion-steps", "2", "--pipeline.log-every", "10",
           "--pipeline.instruction", "make it sepia", *QUIET]  # fmt: skip
    proc = subprocess.run(cmd, env=trainer_env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = json.loads(
        (tmp_path / "out" / "tiny" / "in2n-tiny" / "edit" / "edit_report" / "edit_stats.json").read_text()
    )
    servers = {row["address"]: row for row in stats["servers"]}
    assert set(servers) == {fp32.address, slow.address}
    assert servers[fp32.address]["edits_applied"] >= 1 and servers[slow.address]["edits_applied"] >= 1, stats
    assert servers[fp32.address]["backend"] == "tiny-ip2p" and servers[fp32.address]["precision"] == "fp32"
    assert servers[slow.address]["backend"] == "identity" and servers[slow.address]["device"] == "cpu"
    assert sum(row["edits_applied"] for row in stats["servers"]) == stats["edits_applied"]
    notes = [line for line in proc.stdout.splitlines() if "runs IP2P in" in line]
    assert len(notes) == 1 and fp32.address in notes[0] and "fp32" in notes[0] and "fp16" in notes[0], proc.stdout[
        -3000:
    ]
    assert "by server:" in proc.stdout


def test_sync_modes_describe_gives_up_on_a_hung_server_after_the_connect_timeout():
    """A server whose Describe never answers holds sync mode's precision check for describe_timeout_s (the config's
    connect_timeout_s), not for the edit timeout; the check is tried again before the next round."""
    import threading

    from nerf_trainer.servers import EditServers
    from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
    from testing_support import serve_servicer

    release = threading.Event()
    asked = threading.Event()

    class HungDescribe(pb_grpc.EditServiceServicer):
        def Describe(self, request, context):
            asked.set()
            release.wait(120)
            return pb.DescribeResponse(backend="hung", device="cpu", precision="fp32")

    server, address = serve_servicer(HungDescribe())
    servers = EditServers([address], precision_hint="fp16", sync_timeout_s=600.0, describe_timeout_s=0.5)
    try:
        servers.start(sync=True)
        checker = threading.Thread(target=servers.note_sync_describe, daemon=True)
        checker.start()
        assert asked.wait(60), "the server was never asked"
        checker.join(60)  # with the edit timeout (600 s) it would still be waiting
        assert not checker.is_alive(), "sync mode's Describe waited for the edit timeout, not describe_timeout_s"
        assert servers.info == {}, "a Describe that timed out counts as not answered: asked again next round"
    finally:
        release.set()
        servers.close()
        server.stop(None)
