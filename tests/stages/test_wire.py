"""The wire format: round trips, strict validation, and a fuzzed decoder that never crashes."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pspnet.core import wire

REQ = wire.Request("r1", "/data/a.jpg", "/data/a.png", 0)
PLACE = wire.Placement(375, 500, 1.0, 62, 0, 375, 500)


def roundtrip(msg: wire.Message) -> wire.Message:
    return wire.decode([bytes(f) for f in wire.encode(msg)])


def test_image_roundtrip_keeps_pixels_and_metadata():
    pixels = np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    out = roundtrip(wire.Image(REQ, PLACE, "executor-0-42", pixels))
    assert out.request == REQ and out.placement == PLACE and out.to == "executor-0-42"
    np.testing.assert_array_equal(out.pixels, pixels)


def test_output_and_result_roundtrip():
    logits = np.random.default_rng(1).standard_normal((21, 63, 63)).astype(np.float32)
    out = roundtrip(wire.Output(REQ, PLACE, "logits", logits))
    np.testing.assert_array_equal(out.data, logits)
    areas = np.arange(84, dtype=np.int64).reshape(4, 21)
    res = roundtrip(wire.Result("r1", 1, wire.OK, "/a", "/m/a.png", None, "post", areas))
    np.testing.assert_array_equal(res.areas, areas)
    assert res.attempt == 1 and res.mask == "/m/a.png"


def test_results_carry_many_answers_and_their_areas_in_one_message():
    """Control per batch: a worker's answers of a few ms in one message, the areas of those
    that have them stacked in one frame, each back on its own answer."""
    rng = np.random.default_rng(2)
    areas = [rng.integers(0, 1000, (4, 21)).astype(np.int64) for _ in range(3)]
    results = (wire.Result("a", 0, wire.OK, "/a", "/m/a.png", None, "postprocess", areas[0]),
               wire.Result("b", 1, wire.ERROR, "/b", None, "unreadable", "preprocess",
                           cause=wire.INCOMPLETE),
               wire.Result("c", 0, wire.OK, "/c", None, None, "postprocess", areas[1]),
               wire.Result("d", 0, wire.OK, "/d", None, None, "postprocess", areas[2]))
    frames = wire.encode(wire.Results(results))
    assert len(frames) == 2                       # the header and one areas frame
    out = wire.decode([bytes(f) for f in frames])
    assert out.ok is not None and out.ok.ids == ["a", "c", "d"]   # the ok ones: columns
    assert out.results == (results[1],)                          # an error: alone
    got = {r.id: r for r in out.each()}
    assert sorted(got) == ["a", "b", "c", "d"] and got["b"] == results[1]
    for rid, sent in zip("acd", areas, strict=True):
        np.testing.assert_array_equal(got[rid].areas, sent)
    no_areas = wire.Results(tuple(wire.Result(i, 0, wire.OK, f"/{i}") for i in "xyz"))
    assert roundtrip(no_areas).each() == no_areas.results


def ok_answers() -> tuple[wire.Result, ...]:
    rng = np.random.default_rng(3)
    return tuple(
        wire.Result(f"r{i}", i % 2, wire.OK, f"/d/{i}.jpg", f"/m/{i}.png" if i % 3 else None,
                    None, "postprocess", rng.integers(0, 99, (4, 21)).astype(np.int64)
                    if i % 2 else None, None, (300 + i, 400 + i),
                    ((0, "background", 900 + i), (15, "person", 40)) if i % 4 else (),
                    f"tok{i}", model="ab12" if i == 2 else "")
        for i in range(8))


def test_ok_answers_go_as_columns_and_come_back_whole():
    """Issue 27: the common answers (ok, no payload) as columns, the class names once per
    message; every field and areas row comes back on its own answer."""
    results = ok_answers()
    frames = wire.encode(wire.Results(results))
    head = msgpack.unpackb(bytes(frames[0]))
    assert head["results"] == [] and head["ok"]["ids"] == [r.id for r in results]
    assert head["ok"]["names"] == ["background", "person"]       # once, not per answer
    out = wire.decode([bytes(f) for f in frames])
    assert out.ok is not None and len(out) == 8 and out.results == ()
    for got, sent in zip(out.each(), results, strict=True):
        assert (got.areas is None) == (sent.areas is None)
        if sent.areas is not None:
            np.testing.assert_array_equal(got.areas, sent.areas)
        assert replace(got, areas=None) == replace(sent, areas=None)


def columns_frames(**change):
    """A valid columnar Results of ok_answers(), its "ok" map's entries replaced."""
    frames = [bytes(f) for f in wire.encode(wire.Results(ok_answers()))]
    head = msgpack.unpackb(frames[0])
    head["ok"].update(change)
    return [msgpack.packb(head, use_bin_type=True), *frames[1:]]


@pytest.mark.parametrize("change, field", [
    ({"ids": ["r0", "r1", 2, "r3", "r4", "r5", "r6", "r7"]}, "ids"),
    ({"ids": ["r0", "", "r2", "r3", "r4", "r5", "r6", "r7"]}, "ids"),
    ({"ids": ["r0", "r1\x00", "r2", "r3", "r4", "r5", "r6", "r7"]}, "ids"),
    ({"attempts": [0, 1, 0, 1, 0, 1, 0, True]}, "attempts"),
    ({"attempts": [0, 1, 0, 1, 0, 1, 0, 101]}, "attempts"),
    ({"tokens": ["t"] * 7 + ["\u00e9"]}, "tokens"),
    ({"tokens": ["t" * 65] * 8}, "tokens"),
    ({"paths": ["/a"] * 7 + [None]}, "paths"),
    ({"masks": [None] * 7 + [""]}, "masks"),
    ({"stages": ["postprocess"] * 7 + [3]}, "stages"),
    ({"models": [""] * 7 + ["xyz"]}, "models"),
    ({"sizes": [1] * 15 + [0]}, "sizes"),
    ({"sizes": [1] * 15 + [-1]}, "sizes"),
    ({"counts": [2] * 8}, "classes"),
    ({"classes": [0, 15] * 5 + [0, 16]}, "classes"),
    ({"pixels": [1] * 11 + [0]}, "pixels"),
    ({"names": ["background", "per\nson"]}, "names"),
    ({"name_ids": [0, 0]}, "name_ids"),
    ({"rows": [-1, 0, -1, 0, -1, 2, -1, 3]}, "rows"),
    ({"rows": [-1, 0, -1, 1, -1, 2, -1, 9]}, "rows"),
    ({"rows": ["x"] * 8}, "rows"),
])
def test_malformed_columns_are_refused_naming_the_column(change, field):
    with pytest.raises(wire.WireError, match=f"column '{field}'"):
        wire.decode(columns_frames(**change))


@pytest.mark.parametrize("field", ["attempts", "tokens", "paths", "masks", "stages",
                                   "models", "counts", "rows", "sizes"])
def test_columns_whose_lengths_disagree_are_refused(field):
    frames = [bytes(f) for f in wire.encode(wire.Results(ok_answers()))]
    head = msgpack.unpackb(frames[0])
    head["ok"][field] = head["ok"][field][:-1]
    with pytest.raises(wire.WireError, match=f"column '{field}' holds"):
        wire.decode([msgpack.packb(head, use_bin_type=True), *frames[1:]])


def test_columns_missing_or_extra_or_an_unnamed_areas_row_are_refused():
    frames = [bytes(f) for f in wire.encode(wire.Results(ok_answers()))]
    head = msgpack.unpackb(frames[0])
    del head["ok"]["names"]
    with pytest.raises(wire.WireError, match="exactly"):
        wire.decode([msgpack.packb(head, use_bin_type=True), *frames[1:]])
    with pytest.raises(wire.WireError, match="no result names"):   # a row left unnamed
        wire.decode(columns_frames(rows=[-1, 0, -1, 1, -1, 2, -1, -1]))
    with pytest.raises(wire.WireError, match="no answer"):
        wire.decode([header(kind="results", results=[], arrays=[])])


@pytest.mark.parametrize("row, words", [(5, "row"), (-1, "row"), ("0", "row"), (None, "no result")])
def test_results_whose_areas_rows_do_not_match_are_refused(row, words):
    areas = np.zeros((1, 4, 21), np.int64)
    fields = {"id": "a", "attempt": 0, "status": "ok", "path": "/a", "mask": None,
              "error": None, "stage": "postprocess", "cause": None, "areas": row}
    frames = [header(kind="results", results=[fields], arrays=[["int64", [1, 4, 21]]]),
              areas.tobytes()]
    with pytest.raises(wire.WireError, match=words):
        wire.decode(frames)


def test_a_worker_id_is_written_and_read_in_one_place():
    wid = wire.WorkerId(wire.Stage.EXECUTOR, 3, 4242)
    assert str(wid) == "executor-3-4242" and wid.encode() == b"executor-3-4242"
    assert wire.WorkerId.parse(wid.encode()) == wid == wire.peer(b"executor-3-4242")
    assert wire.WorkerId.parse("postprocess-0-1").stage is wire.Stage.POSTPROCESS
    for bad in ("executor-3", "gpu-0-1", "executor-x-1", "executor-1-2-3", "executor--1-2",
                "executor-1-" + "9" * 11, "executor-1-2/runner", "", "e" * 100):
        with pytest.raises(wire.WireError, match="worker"):
            wire.WorkerId.parse(bad)


@pytest.mark.parametrize("msg", [
    wire.Dispatch((REQ,), "executor-0-42", "ipc:///run/exec0-in"), wire.Credit(3),
    wire.Dispatch((REQ, wire.Request("y", "/q", None, 1)), "executor-0-42", "ipc:///x"),
    wire.Took(("a", "b")), wire.Handed(("a",), "postprocess-1-43"),
    wire.Handed(("a",), "postprocess-1-43", took=("b", "c")),
    wire.Heartbeat("preprocess", 1, 42, {"processed": 3, "busy_s": 0.5}),
    wire.Heartbeat("executor", 0, 44, {}, inputs="tcp://10.0.0.5:40001",
                   outputs="tcp://10.0.0.5:40002", capacity=32, batch=16,
                   stuck="runner thread inside one call for 12.0 s (allowed 10.0 s)"),
    wire.Peers((("executor-0-44", "tcp://10.0.0.5:40002"),), 8),
    wire.Submit((REQ, wire.Request("y", "/q"))), wire.StatusQuery(),
    wire.Reply("accepted", ("a",), "", {"k": 1}),
    wire.Reload(), wire.Reload("/models/v2", force=True),
    wire.Heartbeat("postprocess", 2, 45, {}, model="0123456789ab"),
    wire.Result("a", 0, wire.OK, "/p", model="0123456789ab"),
])
def test_small_messages_roundtrip(msg):
    assert roundtrip(msg) == msg


def header(**fields):
    return msgpack.packb({"v": wire.WIRE_VERSION, **fields})


def remote_beat(inputs: str, outputs: str) -> bytes:
    """A remote executor's heartbeat header with these addresses."""
    return header(kind="heartbeat", stage="executor", index=100, pid=1, counters={},
                  inputs=inputs, outputs=outputs, capacity=8, batch=4)


def test_a_dispatch_of_path_requests_goes_in_columns_with_the_fronts_tokens_beside():
    """The front's dispatch (wire.Dispatch.tokens): plain path requests as five columns,
    each request's token from `tokens`; decoded, each Request holds its own. A group with
    an upload keeps one map per request, the tokens applied the same."""
    reqs = (wire.Request("a", "/a.jpg"), wire.Request("b", "/b.jpg", "/b.png", 1))
    frames = wire.encode(wire.Dispatch(reqs, "executor-0-42", "ipc:///x", ("t" * 32, "u" * 32)))
    assert "cols" in msgpack.unpackb(frames[0]) and "reqs" not in msgpack.unpackb(frames[0])
    assert wire.decode(frames) == wire.Dispatch(
        (wire.Request("a", "/a.jpg", token="t" * 32),
         wire.Request("b", "/b.jpg", "/b.png", 1, "u" * 32)), "executor-0-42", "ipc:///x")
    upload = wire.Request("c", "/c.jpg", want=wire.WANTS[1], data=b"\xff\xd8")
    frames = wire.encode(wire.Dispatch((reqs[0], upload), "executor-0-42", "ipc:///x",
                                       ("t" * 32, "v" * 32)))
    assert "reqs" in msgpack.unpackb(frames[0])
    got = wire.decode(frames)
    assert [r.token for r in got.requests] == ["t" * 32, "v" * 32]
    assert bytes(got.requests[1].data) == b"\xff\xd8"
    with pytest.raises(ValueError, match="one for one"):
        wire.encode(wire.Dispatch(reqs, "executor-0-42", "ipc:///x", ("t",)))


def _cols(**change):
    cols = {"ids": ["a", "b"], "paths": ["/a", "/b"], "anns": [None, "/b.png"],
            "attempts": [0, 1], "tokens": ["t", ""]} | change
    return header(kind="dispatch", to="executor-0-1", address="ipc:///x",
                  cols=[cols["ids"], cols["paths"], cols["anns"], cols["attempts"],
                        cols["tokens"]])


@pytest.mark.parametrize("frames, words", [
    ([_cols(ids=["a", ""])], "column 'ids'"),
    ([_cols(ids=["a", 2])], "column 'ids'"),
    ([_cols(ids=["a", "b\0"])], "column 'ids'"),
    ([_cols(paths=["/a", "x" * (wire.MAX_STRING_CHARS + 1)])], "column 'paths'"),
    ([_cols(anns=[None, 3])], "column 'anns'"),
    ([_cols(attempts=[0, 101])], "column 'attempts'"),
    ([_cols(attempts=[0, True])], "column 'attempts'"),
    ([_cols(tokens=["t", "x" * 65])], "column 'tokens'"),
    ([_cols(tokens=["t", "\u00e9"])], "ASCII"),
    ([_cols(tokens=["t"])], "one row each"),
    ([_cols(ids=[], paths=[], anns=[], attempts=[], tokens=[])], "1..4096"),
    ([header(kind="dispatch", to="executor-0-1", address="ipc:///x", cols=[["a"]] * 4)],
     "5 lists"),
    ([header(kind="dispatch", to="executor-0-1", address="ipc:///x", cols={"ids": ["a"]})],
     "5 lists"),
    ([_cols(), b"stray"], "array frame"),
])
def test_malformed_dispatch_columns_are_refused_naming_the_column(frames, words):
    with pytest.raises(wire.WireError, match=words):
        wire.decode(frames)


@pytest.mark.parametrize("frames, words", [
    ([], "empty"),
    ([b"\xc1"], "msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([msgpack.packb({"v": 99, "kind": "dispatch"})], "version"),
    ([header(kind="pickle")], "unknown message kind"),
    ([header(kind="dispatch", reqs=[{"id": "a", "path": 5, "attempt": 0}], to="e-0-1",
             address="ipc:///x")], "path"),
    ([header(kind="dispatch", reqs=[{"id": "", "path": "/x", "attempt": 0}], to="e-0-1",
             address="ipc:///x")], "id"),
    ([header(kind="dispatch", reqs=[{"id": "a", "path": "/x", "attempt": 0}], to="x" * 65,
             address="ipc:///x")], "worker name"),
    ([header(kind="took", ids="a")], "list of ids"),
    ([header(kind="handed", ids=["a"], to="postprocess-0-1", took="b")], "'took'.*list of ids"),
    ([header(kind="handed", ids=["a"], to="postprocess-0-1", took=["b", 7])], "took"),
    ([header(kind="handed", ids=["a"], to="postprocess-0-1", took=None)], "'took'"),
    ([header(kind="credit", credits=0)], "credits"),
    ([header(kind="peers", executors=[["e-0-1"]], credits=2)], "name, address"),
    ([header(kind="heartbeat", stage="executor", index=0, pid=1, counters={},
             inputs="", outputs="", capacity=-1, batch=0)], "capacity"),
    # addresses every worker handed them would fail to connect to (and die on, before)
    *(([remote_beat(inputs=inputs, outputs=outputs)], f"'{bad}' must be tcp://HOST:PORT")
      for inputs, outputs, bad in (("no-such-transport://x:1", "", "inputs"),
                                   ("tcp://10.0.0.5:1", "tcp://10.0.0.5", "outputs"),
                                   ("tcp://127.0.0.1:99999", "", "inputs"),
                                   ("tcp://[::1]:0", "", "inputs"))),
    ([header(kind="peers", executors=[["executor-0-1", "tcp://h:1 x"]], credits=2)],
     "'address' must be tcp://HOST:PORT"),
    ([header(kind="image", req={"id": "a", "path": "/x", "attempt": 0}, to="e-0-1",
             place=[10, 10, 1.0, 0, 0, 10, 10], arrays=[["uint8", [10, 10, 3]]]), b"\0" * 7],
     "bytes"),
    ([header(kind="image", req={"id": "a", "path": "/x", "attempt": 0}, to="e-0-1",
             place=[10, 10, 1.0, 0, 0, 10, 10], arrays=[["object", [1]]]), b"\0"], "dtype"),
    ([header(kind="image", req={"id": "a", "path": "/x", "attempt": 0}, to="e-0-1",
             place=[10, 10, 1.0, 5, 0, 10, 10], arrays=[["uint8", [10, 10, 3]]]),
      b"\0" * 300], "outside"),
    ([header(kind="output", req={"id": "a", "path": "/x", "attempt": 0},
             place=[10, 10, 1.0, 0, 0, 10, 10], head="labels",
             arrays=[["uint8", [100000, 100000]]]), b""], "shape"),
    ([b"\0" * (wire.MAX_HEADER_BYTES + 1)], "header of"),
    ([header(kind="reload", model="/m", force="yes")], "force"),
    ([header(kind="result", id="a", attempt=0, status="ok", path="/p", stage="front",
             model="../x",
             arrays=[])],
     "model version"),
])
def test_malformed_messages_are_refused_with_a_reason(frames, words):
    with pytest.raises(wire.WireError, match=words):
        wire.decode(frames)


def test_wire_error_carries_the_request_id_when_readable():
    frames = [header(kind="image", req={"id": "abc", "path": "/x", "attempt": 0},
                     place="nonsense", arrays=[])]
    with pytest.raises(wire.WireError) as info:
        wire.decode(frames)
    assert info.value.request_id == "abc"


def test_no_pickle_on_the_wire():
    import pathlib
    root = pathlib.Path(wire.__file__).parent.parent
    runtime = [*root.glob("stages/**/*.py"), *root.glob("daemon/**/*.py")]
    assert len(runtime) > 10
    for path in runtime:
        text = path.read_text()
        assert "recv_pyobj" not in text and "send_pyobj" not in text, path
        assert "import pickle" not in text, path


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=512), min_size=0, max_size=5))
def test_decoder_survives_random_frames(frames):
    try:
        wire.decode(frames)
    except wire.WireError:
        pass


valid = [bytes(f) for f in wire.encode(wire.Image(REQ, PLACE, "executor-0-42",
                                                   np.zeros((500, 500, 3), np.uint8)))]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(valid[0]) - 1), st.integers(0, 255), st.booleans())
@example(position=124, value=0x95, truncate=False)   # the dtype string made an array: found
def test_decoder_survives_mutated_headers(position, value, truncate):
    head = bytearray(valid[0])
    if truncate:
        head = head[:position]
    else:
        head[position] = value
    try:
        msg = wire.decode([bytes(head), valid[1]])
    except wire.WireError:
        return
    assert isinstance(msg, wire.Image)        # a mutation that still parses is a valid image


def test_decode_as_refuses_another_kind():
    frames = [bytes(f) for f in wire.encode(wire.Took(("x",)))]
    assert wire.decode_as(frames, wire.Took) == wire.Took(("x",))
    with pytest.raises(wire.WireError, match="expected Image, got Took"):
        wire.decode_as(frames, wire.Image)


@pytest.mark.parametrize("kind", ["image", "output"])
def test_a_placement_over_max_pixels_costs_its_frame(kind):
    """Issue 23: a frame claiming a 2^20 x 2^20 placement made postprocess try to allocate
    4 TB (uncaught, 4 restarts). decode refuses it against the stage's --max-pixels, with
    the request id, before anything allocates; the same frame under the bound is read."""
    huge = wire.Placement(1 << 20, 1 << 20, 1.0, 0, 0, 8, 8)
    request = wire.Request("victim", "/x.jpg")
    pixels = np.zeros((8, 8, 3), np.uint8)
    msg = (wire.Image(request, huge, "executor-0-1", pixels) if kind == "image"
           else wire.Output(request, huge, "labels", pixels[:, :, 0]))
    frames = [bytes(f) for f in wire.encode(msg)]
    with pytest.raises(wire.WireError, match="placement claims") as caught:
        wire.decode(frames)
    assert caught.value.request_id == "victim"
    with pytest.raises(wire.WireError, match="placement claims"):
        wire.decode_as(frames, type(msg), max_pixels=(1 << 40) - 1)
    assert wire.decode_as(frames, type(msg), max_pixels=1 << 40).placement == huge


def test_a_placement_box_beyond_any_model_input_is_refused():
    box = wire.Placement(100, 100, 1.0, 0, 0, wire.MAX_SIDE_PIXELS + 1, 8)
    frames = [bytes(f) for f in wire.encode(
        wire.Output(wire.Request("r", "/x"), box, "labels", np.zeros((8, 8), np.uint8)))]
    with pytest.raises(wire.WireError, match="placement box"):
        wire.decode(frames)
