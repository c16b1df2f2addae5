"""Hostile input: a fuzzer (hypothesis) against a real palette server process.

Over 1000 malformed requests, on `Edit` and on `StreamEdit`: random bytes as the serialized message,
truncated messages, messages of another type, and valid requests broken in one to three ways (wrong
shapes and byte counts, zero and huge sizes, unknown dtypes, NaN / infinite / out-of-range numbers,
absurd step counts, missing fields, over-long texts, uncached originals, a message over the size limit).
Every one must get a gRPC error status (unary) or an EditError (stream) with a code from the contract
and a message that says what was wrong (with one break, the message names it); never OK, never a hang
(every call has a deadline), never a crash (the process lives, its log has no traceback). The server's
memory (RSS) stays flat between a warm-up batch and the end, and it serves a valid edit afterwards.

`make test` runs 1000+ requests (derandomized: the same ones every run); `make test-all` also runs the
slow variant with ten times as many. Tests of the inputs the fuzzer found are at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from conftest import EditServerProcess, start_edit_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_palette import expected_look, random_image

from in2n_contract import MAX_CLIENT_ID_CHARS, MAX_INSTRUCTION_CHARS, MAX_REQUEST_ID_CHARS, ORIGINAL_REQUIRED, codec
from protos.in2n.v1 import edit_service_pb2 as pb
from protos.in2n.v1 import edit_service_pb2_grpc as pb_grpc
from testing_support import rss_bytes

MAX_SIDE = 64  # the fuzzed server's --max-image-side: its message limit is then about 4 MiB
MAX_STEPS = 1000  # its --max-diffusion-steps (the default)
MESSAGE_LIMIT = 2 * MAX_SIDE * MAX_SIDE * 3 * 4 + (4 << 20)  # config.max_message_bytes_for(MAX_SIDE)
CALL_TIMEOUT_S = 20.0  # every call's deadline: a hang fails the test instead of wedging it
RSS_GROWTH_LIMIT = 50 << 20

CODE_NUMBERS = {code.value[0]: code for code in grpc.StatusCode}
# What a malformed request may get: the request is wrong (3), it names an original the server does not hold (9),
# or the message is over the size limit (8). INTERNAL (13) would be the server's fault; OK (0) a failure to validate.
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED}


# -- the server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditServerProcess]:
    server = start_edit_server(
        tmp_path_factory.mktemp("fuzz_server"), backend="palette", extra_args=["--max-image-side", str(MAX_SIDE)]
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def channel(fuzz_server: EditServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_server.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


# -- a valid request, and ways to break it -----------------------------------------------------------


def valid_request(
    request_id: str = "fz", view_id: int = 0, dtype: str = "uint8", side: tuple[int, int] = (8, 6)
) -> pb.EditRequest:
    render, original = random_image(1, *side), random_image(2, *side)
    if dtype == "uint8":
        render, original = ((x * 255).round().astype(np.uint8) for x in (render, original))
    elif dtype == "float16":
        render, original = render.astype(np.float16), original.astype(np.float16)
    return pb.EditRequest(
        request_id=request_id,
        view_id=view_id,
        render=codec.encode_image(render),
        original=codec.encode_image(original),
        instruction="make it sepia",
    )


Break = Callable[[pb.EditRequest, st.DataObject], str]
"""Breaks a request in place; returns a word the server's message must contain when this is the only break."""

IMAGE_FIELDS = st.sampled_from(["render", "original"])
U32 = st.integers(0, 2**32 - 1)
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _zero_side(req: pb.EditRequest, data: st.DataObject) -> str:
    name = data.draw(IMAGE_FIELDS)
    setattr(getattr(req, name), data.draw(st.sampled_from(["height", "width"])), 0)
    return "must be positive"


def _huge_side(req: pb.EditRequest, data: st.DataObject) -> str:
    image = getattr(req, data.draw(IMAGE_FIELDS))
    setattr(image, data.draw(st.sampled_from(["height", "width"])), data.draw(st.integers(MAX_SIDE + 1, 2**32 - 1)))
    return "largest side"


def _wrong_channels(req: pb.EditRequest, data: st.DataObject) -> str:
    getattr(req, data.draw(IMAGE_FIELDS)).channels = data.draw(U32.filter(lambda c: c != 3))
    return "channels"


def _wrong_byte_count(req: pb.EditRequest, data: st.DataObject) -> str:
    image = getattr(req, data.draw(IMAGE_FIELDS))
    size = len(image.data)
    new_size = data.draw(st.integers(0, 2 * size).filter(lambda n: n != size))
    image.data = (image.data * 3)[:new_size]
    return "bytes, expected"


def _wrong_shape(req: pb.EditRequest, data: st.DataObject) -> str:
    """The same pixels declared with another height and width (same byte count): original and render differ."""
    other = [(6, 8), (48, 1), (1, 48), (2, 24), (24, 2), (4, 12), (12, 4), (3, 16), (16, 3)]  # render is 8x6
    req.original.height, req.original.width = data.draw(st.sampled_from(other))  # a valid image of another size
    return "must match"


def _unknown_dtype(req: pb.EditRequest, data: st.DataObject) -> str:
    value = data.draw(st.one_of(st.just(pb.DTYPE_UNSPECIFIED), st.integers(4, 2**31 - 1), st.integers(-(2**31), -1)))
    getattr(req, data.draw(IMAGE_FIELDS)).dtype = value
    return "dtype"


def _not_finite_pixels(req: pb.EditRequest, data: st.DataObject) -> str:
    name = data.draw(IMAGE_FIELDS)
    dtype = data.draw(st.sampled_from([np.float16, np.float32]))
    image = random_image(3, 8, 6).astype(dtype)
    image[data.draw(st.integers(0, 7)), data.draw(st.integers(0, 5)), data.draw(st.integers(0, 2))] = data.draw(
        NOT_FINITE
    )
    getattr(req, name).CopyFrom(codec.encode_image(image))
    return "NaN or infinite"


def _out_of_range_pixels(req: pb.EditRequest, data: st.DataObject) -> str:
    image = random_image(4, 8, 6)
    image[0, 0, 0] = data.draw(st.one_of(st.floats(1.001, 1e30), st.floats(-1e30, -0.001)))
    getattr(req, data.draw(IMAGE_FIELDS)).CopyFrom(codec.encode_image(image))
    return "[0, 1]"


def _bad_scale(req: pb.EditRequest, data: st.DataObject) -> str:
    name = data.draw(st.sampled_from(["guidance_scale", "image_guidance_scale"]))
    setattr(req, name, data.draw(st.one_of(NOT_FINITE, st.floats(-1e30, -1e-3), st.floats(100.5, 1e30))))
    return name


def _bad_bound(req: pb.EditRequest, data: st.DataObject) -> str:
    name = data.draw(st.sampled_from(["lower_bound", "upper_bound"]))
    setattr(req, name, data.draw(st.one_of(NOT_FINITE, st.floats(-1e30, -1e-3), st.floats(1.001, 1e30))))
    return name


def _crossed_bounds(req: pb.EditRequest, data: st.DataObject) -> str:
    upper = data.draw(st.floats(0.0, 0.9))
    req.lower_bound, req.upper_bound = upper + 0.05, upper
    return "lower_bound"


def _absurd_steps(req: pb.EditRequest, data: st.DataObject) -> str:
    req.diffusion_steps = data.draw(st.one_of(st.just(0), st.integers(MAX_STEPS + 1, 2**32 - 1)))
    return "diffusion_steps"


def _missing_render(req: pb.EditRequest, data: st.DataObject) -> str:
    req.ClearField("render")
    return "render is required"


def _missing_original(req: pb.EditRequest, data: st.DataObject) -> str:
    req.ClearField("original")
    return ORIGINAL_REQUIRED


def _missing_instruction(req: pb.EditRequest, data: st.DataObject) -> str:
    req.instruction = data.draw(st.sampled_from(["", " ", "\t\n", "\u3000"]))
    return "instruction"


def _unknown_instruction(req: pb.EditRequest, data: st.DataObject) -> str:
    req.instruction = "zz " + data.draw(st.text(max_size=30))  # no palette look starts with "zz"
    return "unknown instruction"


def _too_long_text(req: pb.EditRequest, data: st.DataObject) -> str:
    name, limit = data.draw(
        st.sampled_from(
            [
                ("instruction", MAX_INSTRUCTION_CHARS),
                ("request_id", MAX_REQUEST_ID_CHARS),
                ("client_id", MAX_CLIENT_ID_CHARS),
            ]
        )
    )
    setattr(req, name, "x" * data.draw(st.integers(limit + 1, 4 * limit)))
    return name


def _key_without_client(req: pb.EditRequest, data: st.DataObject) -> str:
    req.client_id = ""
    req.original_key = data.draw(st.text(min_size=1, max_size=20))
    return "client_id is required"


def _uncached_original(req: pb.EditRequest, data: st.DataObject) -> str:
    req.ClearField("original")
    req.client_id = "fuzz-never-sent-an-original"
    req.original_key = data.draw(st.text(min_size=1, max_size=20))
    return "original not cached"


def _over_the_message_limit(req: pb.EditRequest, data: st.DataObject) -> str:
    req.render.data = b"\x00" * (MESSAGE_LIMIT + data.draw(st.integers(1, 1000)))
    return "larger than max"


BREAKS: dict[str, Break] = {
    "zero side": _zero_side,
    "huge side": _huge_side,
    "wrong channels": _wrong_channels,
    "wrong byte count": _wrong_byte_count,
    "wrong shape": _wrong_shape,
    "unknown dtype": _unknown_dtype,
    "NaN/inf pixels": _not_finite_pixels,
    "out-of-range pixels": _out_of_range_pixels,
    "NaN/inf/absurd scale": _bad_scale,
    "NaN/inf/absurd bound": _bad_bound,
    "crossed bounds": _crossed_bounds,
    "absurd steps": _absurd_steps,
    "missing render": _missing_render,
    "missing original": _missing_original,
    "missing instruction": _missing_instruction,
    "unknown instruction": _unknown_instruction,
    "over-long text": _too_long_text,
    "key without client": _key_without_client,
    "uncached original": _uncached_original,
}
STREAM_BREAKS = dict(
    BREAKS, **{"missing request_id": lambda req, data: (req.ClearField("request_id"), "request_id")[1]}
)


def broken_request(
    data: st.DataObject, breaks: dict[str, Break], request_id: str
) -> tuple[pb.EditRequest, str | None, list[str]]:
    """A valid request broken in 1 to 3 ways; returns (request, word its error must contain or None, names)."""
    req = valid_request(
        request_id=request_id,
        view_id=data.draw(st.integers(-(2**63), 2**63 - 1)),
        dtype=data.draw(st.sampled_from(["uint8", "float16", "float32"])),
    )
    names = data.draw(st.lists(st.sampled_from(sorted(breaks)), min_size=1, max_size=3))
    words = [breaks[name](req, data) for name in names]
    return req, (words[0] if len(names) == 1 else None), names


def garbage(data: st.DataObject, message_class: type) -> bytes:
    """Bytes that are not a valid request: random, a valid message truncated, or a message of another type."""
    kind = data.draw(st.sampled_from(["random", "random", "truncated", "other type"]))
    if kind == "random":
        return data.draw(st.binary(max_size=400))
    if kind == "truncated":  # fields 1..5 only: any strict prefix is cut inside a field or loses the instruction
        whole = valid_request().SerializeToString()
        if message_class is pb.StreamEditRequest:
            whole = pb.StreamEditRequest(edit=valid_request()).SerializeToString()
        return whole[: data.draw(st.integers(0, len(whole) - 1))]
    other = data.draw(st.sampled_from([
        pb.EditResponse(request_id="x", edited=codec.encode_image(np.zeros((2, 2, 3), np.uint8))),
        pb.DescribeResponse(backend="palette", max_image_side=7, known_instructions=["a", "b"]),
        pb.StreamEditResponse(request_id="y", error=pb.EditError(code=3, message="m")),
        pb.Timings(queue_ms=1.5, compute_ms=2.5, total_ms=4.0),
    ]))  # fmt: skip
    return other.SerializeToString()


def parsed_request_id(payload: bytes) -> str:
    """The request_id the server reads from `payload` sent on a stream ("" when it does not parse)."""
    try:
        return pb.StreamEditRequest.FromString(payload).edit.request_id
    except Exception:  # noqa: BLE001 - the same parse error the server gets
        return ""


# -- checks ------------------------------------------------------------------------------------------


class Tally:
    """Requests sent and answers seen, per kind and per code."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_kind: dict[str, int] = {}
        self.by_code: dict[str, int] = {}

    def add(self, kind: str, code: grpc.StatusCode) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.by_code[code.name] = self.by_code.get(code.name, 0) + 1


def check_error(code: grpc.StatusCode, message: str, word: str | None, what: str) -> None:
    assert code in ALLOWED, f"{what}: got {code.name} ({message!r})"
    assert message.strip() and "Exception" not in message, f"{what}: unclear message {message!r}"
    if word is not None:
        assert word in message, f"{what}: message {message!r} does not say {word!r}"


def unary_call(raw_edit, payload: bytes, word: str | None, what: str, tally: Tally, kind: str) -> None:
    try:
        reply = raw_edit(payload, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as e:
        assert e.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: no answer within {CALL_TIMEOUT_S} s"
        check_error(e.code(), e.details() or "", word, what)
        tally.add(kind, e.code())
        return
    pytest.fail(f"{what}: got OK with {len(reply)} bytes")


def stream_call(raw_stream, items: list[tuple[bytes, str, str | None, str]], tally: Tally) -> None:
    """Send every item on one StreamEdit call; each must get exactly one EditError, in order (all are refused at once)."""
    try:
        replies = list(raw_stream(iter([payload for payload, *_ in items]), timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as e:
        pytest.fail(f"stream of {[what for *_, what in items]} ended with {e.code().name}: {e.details()!r}")
    assert len(replies) == len(items), f"{len(items)} requests, {len(replies)} responses"
    for raw, (_, request_id, word, what) in zip(replies, items):
        response = pb.StreamEditResponse.FromString(raw)
        assert response.WhichOneof("outcome") == "error", f"{what}: got {response.WhichOneof('outcome')}"
        assert response.request_id == request_id, f"{what}: answered as {response.request_id!r}"
        code = CODE_NUMBERS.get(response.error.code, grpc.StatusCode.UNKNOWN)
        check_error(code, response.error.message, word, what)
        tally.add(f"stream {what.split(':')[0]}", code)


def assert_serves_a_valid_edit(channel: grpc.Channel) -> None:
    render = random_image(9, 8, 6)
    stub = pb_grpc.EditServiceStub(channel)
    request = pb.EditRequest(
        request_id="after", view_id=3, render=codec.encode_image(render), original=codec.encode_image(render),
        instruction="make it sepia",
    )  # fmt: skip
    response = stub.Edit(request, timeout=CALL_TIMEOUT_S)
    assert (response.request_id, response.view_id) == ("after", 3)
    np.testing.assert_allclose(
        codec.decode_image(response.edited, "edited"), expected_look("sepia", render), rtol=0, atol=1e-6
    )
    streamed = list(stub.StreamEdit(iter([pb.StreamEditRequest(edit=request)]), timeout=CALL_TIMEOUT_S))
    assert [r.WhichOneof("outcome") for r in streamed] == ["edited"]


# -- the fuzzer --------------------------------------------------------------------------------------


def run_fuzzer(server: EditServerProcess, channel: grpc.Channel, unary_examples: int, stream_examples: int) -> Tally:
    raw_edit = channel.unary_unary("/in2n.v1.EditService/Edit", request_serializer=None, response_deserializer=None)
    raw_stream = channel.stream_stream(
        "/in2n.v1.EditService/StreamEdit", request_serializer=None, response_deserializer=None
    )
    tally = Tally()
    fuzz_settings = settings(
        derandomize=True, database=None, deadline=None, print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )  # fmt: skip
    unary_breaks = dict(BREAKS, **{"over the message limit": _over_the_message_limit})

    @settings(fuzz_settings, max_examples=unary_examples // 3)
    @given(st.data())
    def fuzz_unary_garbage(data: st.DataObject) -> None:
        payload = garbage(data, pb.EditRequest)
        unary_call(raw_edit, payload, None, f"Edit garbage {payload[:40]!r}", tally, "garbage")

    @settings(fuzz_settings, max_examples=unary_examples - unary_examples // 3)
    @given(st.data())
    def fuzz_unary_broken(data: st.DataObject) -> None:
        req, word, names = broken_request(data, unary_breaks, "fz")
        unary_call(raw_edit, req.SerializeToString(), word, f"Edit broken: {names}", tally, "broken")

    @settings(fuzz_settings, max_examples=stream_examples)
    @given(st.data())
    def fuzz_stream(data: st.DataObject) -> None:
        items = []
        for i in range(data.draw(st.integers(1, 5))):
            if data.draw(st.integers(0, 3)) == 0:
                payload = garbage(data, pb.StreamEditRequest)
                items.append((payload, parsed_request_id(payload), None, f"garbage: {payload[:40]!r}"))
            elif data.draw(st.integers(0, 9)) == 0:
                items.append((b"", "", "edit is required", "no edit: b''"))
            else:
                req, word, names = broken_request(data, STREAM_BREAKS, f"s{i}")
                items.append(
                    (pb.StreamEditRequest(edit=req).SerializeToString(), req.request_id, word, f"broken: {names}")
                )
        stream_call(raw_stream, items, tally)

    fuzz_unary_garbage()
    fuzz_unary_broken()
    fuzz_stream()
    return tally


def fuzz_and_check(
    server: EditServerProcess, channel: grpc.Channel, unary_examples: int, stream_examples: int, minimum: int
) -> None:
    warm = run_fuzzer(server, channel, 60, 20)  # warm-up: the allocator and gRPC reach their working size
    assert_serves_a_valid_edit(channel)
    rss_before = rss_bytes(server.proc.pid)
    tally = run_fuzzer(server, channel, unary_examples, stream_examples)
    assert_serves_a_valid_edit(channel)
    rss_after = rss_bytes(server.proc.pid)
    print(
        f"fuzzed with {tally.requests} malformed requests (+{warm.requests} warm-up): {sorted(tally.by_kind.items())}"
    )
    print(f"codes: {sorted(tally.by_code.items())}; server RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB")
    assert tally.requests >= minimum
    assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"server RSS grew by {(rss_after - rss_before) / 2**20:.1f} MiB"
    assert server.proc is not None and server.proc.poll() is None, "the server died"
    log = server.output()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_fuzzer_1000_malformed_requests_all_refused_clearly(
    fuzz_server: EditServerProcess, channel: grpc.Channel
) -> None:
    fuzz_and_check(fuzz_server, channel, unary_examples=600, stream_examples=150, minimum=1000)


@pytest.mark.slow
def test_fuzzer_many_more_malformed_requests(fuzz_server: EditServerProcess, channel: grpc.Channel) -> None:
    fuzz_and_check(fuzz_server, channel, unary_examples=6000, stream_examples=1500, minimum=10000)


# -- inputs the fuzzer found: each gets a clear error ----------------------------------------------


@pytest.mark.parametrize(
    "payload,words",
    [
        (b"\xff" * 16, ["in2n.v1.EditRequest", "16 bytes", "DecodeError"]),  # not protobuf
        (b"\x0a\x05ab", ["Truncated"]),  # a length past the end
        (b"\x0a\x02\xff\xfe", ["UnicodeDecodeError", "request_id"]),  # bad UTF-8 in a text field
        (b"\x0b" * 5000, ["nested too deeply"]),  # start-group tags, nested past Python's recursion limit
    ],
    ids=["random", "truncated", "bad-utf8", "deep-groups"],
)
def test_undecodable_unary_request_is_invalid_argument(
    channel: grpc.Channel, fuzz_server: EditServerProcess, payload: bytes, words: list[str]
) -> None:
    """Bytes that are no EditRequest: INVALID_ARGUMENT naming the decoder's error, not INTERNAL and a traceback."""
    raw_edit = channel.unary_unary("/in2n.v1.EditService/Edit", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw_edit(payload, timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request is not a valid in2n.v1.EditRequest message")
    for word in words:
        assert word in info.value.details()
    assert "Traceback" not in fuzz_server.output()


def test_undecodable_stream_request_gets_an_edit_error_and_the_stream_stays_open(channel: grpc.Channel) -> None:
    """One undecodable message gets an error answer; the stream goes on (the client's other edits are not lost)."""
    raw_stream = channel.stream_stream(
        "/in2n.v1.EditService/StreamEdit", request_serializer=None, response_deserializer=None
    )
    good = pb.StreamEditRequest(edit=valid_request("good")).SerializeToString()
    replies = [
        pb.StreamEditResponse.FromString(r) for r in raw_stream(iter([b"\xff" * 8, good]), timeout=CALL_TIMEOUT_S)
    ]
    assert [r.WhichOneof("outcome") for r in replies] == ["error", "edited"]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[0].error.message.startswith("request is not a valid in2n.v1.StreamEditRequest message (8 bytes)")
    assert replies[1].request_id == "good"


def test_stream_request_without_edit_says_so(channel: grpc.Channel) -> None:
    """A StreamEditRequest without its edit is told so (not "request_id must be non-empty", which hides why)."""
    stub = pb_grpc.EditServiceStub(channel)
    (reply,) = list(stub.StreamEdit(iter([pb.StreamEditRequest()]), timeout=CALL_TIMEOUT_S))
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert reply.error.message == "edit is required in every StreamEditRequest"


def test_undecodable_describe_request_is_invalid_argument(channel: grpc.Channel) -> None:
    raw = channel.unary_unary("/in2n.v1.EditService/Describe", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\x0a\x05ab", timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "in2n.v1.DescribeRequest" in info.value.details()


def test_huge_request_id_is_not_copied_into_the_log(channel: grpc.Channel, fuzz_server: EditServerProcess) -> None:
    """A refused request's request_id is logged shortened (whole, it would put a megabyte per request in the log)."""
    request = valid_request("q" * (1 << 20))
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.EditServiceStub(channel).Edit(request, timeout=CALL_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()
    assert "q" * 1000 not in fuzz_server.output()
    assert "(1048576 characters)" in fuzz_server.output()
