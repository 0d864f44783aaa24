"""Inference capture: every answered request of every model, on both fronts, as Parquet
segments written off the request path; nothing lost silently, SIGTERM flushes.

The writer on its own first (fsspec's in-memory filesystem), then a real endpoint serving
two models with ``capture`` on a local folder, under load from 8 threads over REST and gRPC,
stopped with SIGTERM while requests are still coming.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from types import SimpleNamespace

import fsspec
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from onnxflow.serving.capture import Capture
from onnxflow.serving.launcher import stop_background
from onnxflow.serving.settings import ServingSettings
from tests.serving import models
from tests.serving.conftest import TOKEN, _example, serving, wait_for


def _read(fs, root: str):
    import pyarrow.dataset as ds

    return ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive").to_table()


def _settings(url: str, **kw) -> ServingSettings:
    return ServingSettings(model="m@champion", capture=url, capture_flush_interval_s=0.05, **kw)


# --- the writer on its own -----------------------------------------------------------------


def test_the_writer_keeps_every_accepted_record_by_name_and_counts_the_rest():
    import fsspec

    url = "memory://capture-unit"
    fs = fsspec.filesystem("memory")
    capture = Capture(_settings(url, capture_segment_bytes=1024, capture_queue_bytes=65536))
    model = SimpleNamespace(name="m", version="3", output_names=["p", "label"])
    capture.start()
    rng = np.random.default_rng(0)
    sent = {}
    for i in range(200):
        x = rng.normal(size=(2, 4)).astype(np.float32)
        p, label = x * 2, np.array(["a", "b"], dtype=object)
        capture.offer(model, f"id-{i}", {"x": x}, [p, label], 0.001)
        sent[f"id-{i}"] = x
        if i % 50 == 49:  # in rounds: each round a row group, and a segment past 1 KiB
            wait_for(lambda: capture.written[("m", "3")] == 2 * capture.accepted[("m", "3")])
            # feedback finds every id: in a closed file, or in memory until its file closes
            closed = set(_read(fs, "/capture-unit")["request_id"].to_pylist())
            in_memory = set(capture.rows_of_ids("m", set(sent)))
            assert not closed & in_memory
            assert len(closed | in_memory) == capture.accepted[("m", "3")]
    capture.stopping()
    capture.stop()
    table = _read(fs, "/capture-unit")
    accepted = capture.accepted[("m", "3")]
    dropped = sum(capture.dropped.values())
    assert accepted + dropped == 200 and accepted > 0  # nothing silently lost
    assert table.num_rows == 2 * accepted == capture.written[("m", "3")]
    assert capture.segments_rolled > 1  # rolled by size
    assert not [p for p in fs.find("/capture-unit") if p.rsplit("/", 1)[1].startswith(".")]
    rows = table.to_pylist()
    first = next(r for r in rows if r["request_id"] == "id-0" and r["row"] == 1)
    assert first["model"] == "m" and str(first["version"]) == "3" and first["latency_ms"] == 1.0
    np.testing.assert_allclose(first["input.x"], sent["id-0"][1])
    np.testing.assert_allclose(first["output.p"], sent["id-0"][1] * 2)
    assert first["output.label"] == ["b"]
    assert {r["date"] for r in rows} and {str(r["version"]) for r in rows} == {"3"}
    # after stop nothing more is taken, and that is counted too
    capture.offer(model, None, {"x": np.zeros((1, 4), np.float32)}, [np.zeros(1)] * 2, 0)
    assert capture.dropped[("m", "stopped")] == 1


def test_inputs_named_in_another_order_land_in_their_own_columns():
    """V2 clients may list a model's inputs in any order: each value goes to its column."""
    import fsspec

    url = "memory://capture-order"
    capture = Capture(_settings(url))
    model = SimpleNamespace(name="m", version="1", output_names=["y"])
    capture.start()
    a, b = np.full((1, 2), 1.0, np.float32), np.full((1, 3), 2.0, np.float32)
    for i in range(6):
        feeds = {"a": a * i, "b": b * i} if i % 2 else {"b": b * i, "a": a * i}
        capture.offer(model, f"r{i}", feeds, [a], 0.001)
    capture.stopping()
    capture.stop()
    rows = {
        r["request_id"]: r for r in _read(fsspec.filesystem("memory"), "/capture-order").to_pylist()
    }
    assert len(rows) == 6
    for i in range(6):
        assert rows[f"r{i}"]["input.a"] == [float(i)] * 2
        assert rows[f"r{i}"]["input.b"] == [2.0 * i] * 3


def test_a_segment_keeps_statistics_for_the_request_columns_and_a_reader_prunes_by_time(
    tmp_path,
):
    """Row groups carry min/max of ``time`` (and the other per-request columns), which a
    reader's filter uses to skip them; the tensors' values carry none."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    capture = Capture(_settings(str(tmp_path)))
    model = SimpleNamespace(name="m", version="1", output_names=["y"])
    capture.start()
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    for i in range(3):
        capture.offer(model, f"r{i}", {"x": x}, [x[:, :2]], 0.001)
    capture.stopping()
    capture.stop()
    (path,) = tmp_path.rglob("part-*.parquet")
    meta = pq.ParquetFile(path).metadata.row_group(0)
    stats = {meta.column(i).path_in_schema: meta.column(i).is_stats_set for i in range(6)}
    assert stats == {
        "request_id": True,
        "row": True,
        "time": True,
        "latency_ms": True,
        "input.x.list.element": False,
        "output.y.list.element": False,
    }
    fragment = next(ds.dataset(path, format="parquet").get_fragments())
    assert fragment.subset(ds.field("time") < _timestamp(0)).num_row_groups == 0
    assert fragment.subset(ds.field("time") > _timestamp(0)).num_row_groups == 1


def _timestamp(seconds: float):
    import pyarrow as pa

    return pa.scalar(int(seconds * 1e6), pa.timestamp("us", tz="UTC"))


@pytest.fixture(params=["C", "Python"])
def request_path(request, monkeypatch):
    """The capture's request path: the C extension's ``append`` (counted, so a test can
    tell it ran), or the Python path alone (an install without a C compiler)."""
    from onnxflow.serving import capture as module

    if request.param == "Python":
        monkeypatch.setattr(module, "native", None)
        return None
    if module.native is None:
        pytest.fail("the capture's C extension (serving/_capture.c) was not built: see README")
    calls, real = {"appended": 0, "declined": 0}, module.native.append

    def append(*args):
        taken = real(*args)
        calls["appended" if taken else "declined"] += 1
        return taken

    monkeypatch.setattr(module, "native", SimpleNamespace(append=append, offer=module.native.offer))
    return calls


def test_number_tensors_are_copied_and_every_shape_and_type_comes_back(request_path):
    """Number tensors are copied into the batch's buffers on the request path. A model
    whose tensors have at most one dynamic axis is stored from those bytes alone (a
    scalar and a batch-less output repeat on every row); requests of other shapes, a view
    that is not contiguous, and strings are kept right too; a tensor of another type is
    refused and counted, the batch as it was."""
    import fsspec

    from onnxflow.serving.tensors import TensorSpec

    url = f"memory://capture-shapes-{request_path is None}"
    capture = Capture(_settings(url))
    specs = {
        "inputs": [TensorSpec("x", "FP32", (-1, 3))],
        "outputs": [
            TensorSpec("y", "INT64", (-1, 2)),
            TensorSpec("scale", "FP32", ()),
            TensorSpec("bias", "FP64", (4,)),
        ],
    }
    model = SimpleNamespace(name="m", version="1", output_names=["y", "scale", "bias"], **specs)
    capture.start()
    sent = {}

    def offer(rid, rows, view=False):
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + len(sent)
        if view:
            x = np.asfortranarray(x)
        outputs = [
            (x[:, :2] * 10).astype(np.int64),
            np.float32(len(sent)),
            np.full(4, len(sent), np.float64),
        ]
        outputs[1] = np.asarray(outputs[1])
        sent[rid] = (x, outputs)
        capture.offer(model, rid, {"x": x}, outputs, 0.001)

    for i in range(5):
        offer(f"same{i}", 2)  # one shape: from the bytes alone
    wait_for(lambda: capture.written[("m", "1")] == 10)  # that batch is written
    offer("three", 3)  # a new batch
    offer("view", 2, view=True)  # copied; from here the batch keeps every request's shapes
    offer("one", 1)
    bad = np.zeros((1, 3), np.float64)  # the wrong type: refused, counted
    capture.offer(model, "bad", {"x": bad}, sent["one"][1], 0.001)
    capture.stopping()
    capture.stop()
    assert capture.dropped == {("m", "error"): 1}
    if request_path is not None:  # C took each batch's requests until the view
        assert request_path == {"appended": 5 + 1, "declined": 1}
    rows = _read(fsspec.filesystem("memory"), url.removeprefix("memory:/")).to_pylist()
    assert len(rows) == 5 * 2 + 2 + 3 + 1
    for row in rows:
        x, (y, scale, bias) = sent[row["request_id"]]
        assert row["input.x"] == x[row["row"]].tolist()
        assert row["output.y"] == y[row["row"]].tolist()
        assert row["output.scale"] == [float(scale)]
        assert row["output.bias"] == bias.tolist()


def test_the_c_append_adds_a_request_whole_like_the_python_path_or_not_at_all():
    """``append`` (serving/_capture.c) fills a batch byte for byte as :meth:`_Batch.take`
    and :meth:`_Batch.add` do; a request it cannot take as the batch's first (another
    type of the same byte size, a view, another shape, one tensor too many, not a
    buffer) changes nothing; a column that cannot grow puts back those that grew."""
    from onnxflow.serving import capture as module
    from onnxflow.serving.capture import _Batch

    if module.native is None:
        pytest.fail("the capture's C extension (serving/_capture.c) was not built: see README")
    x, y = np.arange(8, dtype=np.float32).reshape(2, 4), np.array([1, 2], np.int64)
    c, python = (_Batch(("m", "1"), ("x",), ("y",), [x, y], exact=True) for _ in range(2))

    def state(batch):
        return [bytes(column) for column in (*batch.columns[0], *batch.columns[3:7])]

    for i in range(3):
        assert module.native.append(c.columns, [x + i, y + i], f"r{i}-é", 1.5 + i, 0.25) is True
        python.take([x + i, y + i])
        python.add(f"r{i}-é", 1.5 + i, 0.25)
    assert state(c) == state(python) and c.requests == 3
    assert c.ids().to_pylist() == ["r0-é", "r1-é", "r2-é"]
    before = state(c)
    for arrays in (
        [np.ascontiguousarray(x.astype(np.float64)[:, :2]), y],  # 32 bytes, but float64
        [np.asfortranarray(x), y],
        [x[:1], y[:1]],
        [x, y, y],
        [x.tolist(), y],
    ):
        assert module.native.append(c.columns, arrays, "no", 0.0, 0.0) is False
    assert state(c) == before
    with memoryview(c.latency):  # exported: the last column cannot grow
        with pytest.raises(BufferError):
            module.native.append(c.columns, [x, y], "r", 0.0, 0.0)
    assert state(c) == before
    with pytest.raises(TypeError):
        module.native.append(c.columns[:3], [x, y], "r", 0.0, 0.0)
    assert [t.to_pylist() for _, t, _, _ in c.tables(c.counts())] == [
        t.to_pylist() for _, t, _, _ in python.tables(python.counts())
    ]


def test_request_ids_are_the_process_prefix_and_a_counter_made_in_c():
    """A new request id is the process's random prefix (16 hex characters) and a counter
    of 16 digits, as the Python f-string made them; ``start_ids`` refuses a prefix or a
    first number of another length, and keeps the ids it makes."""
    from onnxflow.serving import capture as module

    if module.native is None:
        pytest.fail("the capture's C extension (serving/_capture.c) was not built: see README")
    assert module.new_request_id is module.native.new_id
    ids = [module.new_request_id() for _ in range(1000)]
    assert all(len(i) == 32 and i[:16] == module._ID_PREFIX and i[16:].isdigit() for i in ids)
    assert [int(i[16:]) for i in ids] == list(range(int(ids[0][16:]), int(ids[0][16:]) + 1000))
    for prefix, first in (("short", 10**15), ("x" * 16, 5), ("x" * 16, 10**16), (None, 10**15)):
        with pytest.raises(ValueError):
            module.native.start_ids(prefix, first)
    assert module.new_request_id() == f"{module._ID_PREFIX}{int(ids[-1][16:]) + 1}"


def test_on_a_loop_varied_requests_are_kept_and_every_id_is_known_until_written():
    """As in the endpoint: offers on an event loop, batches built there. Requests of 1 to 3
    rows whose second axis varies (a dynamic dimension) share batches; more than a batch's
    worth is offered; feedback finds every id, whether its batch is open, built or
    written, with its rows."""
    import asyncio

    import fsspec

    from onnxflow.serving import capture as module

    url = "memory://capture-loop"
    capture = Capture(_settings(url))
    model = SimpleNamespace(name="m", version="2", output_names=["y"])
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    capture.start(loop)
    total = module.BATCH_REQUESTS * 2 + 10
    sent = {}

    def offer_all():
        for i in range(total):
            x = np.full((1 + i % 3, 4 + i % 2), i, np.float32)
            sent[f"r{i}"] = x
            capture.offer(model, f"r{i}", {"x": x}, [x[:, :1] * 2], 0.002)

    try:
        loop.call_soon_threadsafe(offer_all)
        wait_for(lambda: capture.accepted[("m", "2")] == total)
        known = asyncio.run_coroutine_threadsafe(
            _async(lambda: capture.rows_of_ids("m", set(sent))), loop
        ).result(30)
        assert known == {rid: x.shape[0] for rid, x in sent.items()}
        wait_for(lambda: capture.written[("m", "2")] == sum(x.shape[0] for x in sent.values()))
        known = asyncio.run_coroutine_threadsafe(
            _async(lambda: capture.rows_of_ids("m", {"r0", "r1", "nope"})), loop
        ).result(30)
        assert known == {"r0": 1, "r1": 2}
    finally:
        capture.stopping()
        capture.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    assert capture.build_cpu_s > 0 and not capture.dropped
    assert not capture.rows_of_ids("m", set(sent))  # every segment closed: the files know
    rows = _read(fsspec.filesystem("memory"), "/capture-loop").to_pylist()
    assert len(rows) == sum(x.shape[0] for x in sent.values())
    for row in rows:
        x = sent[row["request_id"]]
        assert row["input.x"] == x[row["row"]].tolist()
        assert row["output.y"] == [2.0 * x[0, 0]]


def test_on_a_loop_c_takes_the_requests_like_their_batch_first_and_python_the_rest():
    """In the endpoint (offers on its loop) a request like its batch's first is taken by
    one C call (``_capture.offer``); the batch's first request, the one that fills it, a
    request of another shape, one over the queue's budget and every one after stopping go
    to Python, which counts what it refuses. Every accepted row comes back as sent."""
    import asyncio

    import fsspec

    from onnxflow.serving import capture as module
    from onnxflow.serving.tensors import TensorSpec

    if module.native is None:
        pytest.fail("the capture's C extension (serving/_capture.c) was not built: see README")
    url = "memory://capture-c-loop"
    capture = Capture(_settings(url, capture_queue_bytes=module.BATCH_REQUESTS * 2 * 48))
    model = SimpleNamespace(
        name="m",
        version="1",
        output_names=["y"],
        inputs=[TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))],
        outputs=[TensorSpec("y", "FP64", (-1, 2))],
    )
    python = []
    to_python = capture._offer

    def counted(*args):
        python.append(args[1])
        return to_python(*args)

    capture._offer = counted
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    capture.start(loop)
    sent = {}

    def offer(rid, rows=1):
        a = np.full((rows, 2), len(sent), np.float32)
        b = np.arange(rows, dtype=np.int64) + len(sent)
        sent[rid] = (a, b, a.astype(np.float64) * 2)
        capture.offer(model, rid, {"b": b, "a": a}, [sent[rid][2]], 0.001)

    def offer_all():
        for i in range(module.BATCH_REQUESTS + 5):  # 32 bytes a request
            offer(f"r{i}")
        offer("two-rows", rows=2)  # another shape: from here the batch is Python's
        offer("after")

    try:
        asyncio.run_coroutine_threadsafe(_async(offer_all), loop).result(60)
        first, fills, other = "r0", f"r{module.BATCH_REQUESTS - 1}", f"r{module.BATCH_REQUESTS}"
        assert python == [first, fills, other, "two-rows", "after"]
        wait_for(lambda: capture.written[("m", "1")] == module.BATCH_REQUESTS + 8)
        # every byte C and Python offered is counted, and out of the budget once written
        wait_for(lambda: capture._offered_bytes == capture._taken_bytes)
        assert capture._offered_bytes == (module.BATCH_REQUESTS + 8) * 32
        python.clear()

        def over_budget():  # a new batch, then a queue over its budget: refused in Python
            offer("new")
            capture._taken_bytes -= module.BATCH_REQUESTS * 2 * 48
            offer("full")
            capture._taken_bytes += module.BATCH_REQUESTS * 2 * 48

        asyncio.run_coroutine_threadsafe(_async(over_budget), loop).result(30)
        assert python == ["new", "full"] and capture.dropped[("m", "queue_full")] == 1
        capture.stopping()
        asyncio.run_coroutine_threadsafe(_async(lambda: offer("late")), loop).result(30)
        assert python == ["new", "full", "late"] and capture.dropped[("m", "stopped")] == 1
    finally:
        capture.stopping()
        capture.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
    rows = _read(fsspec.filesystem("memory"), "/capture-c-loop").to_pylist()
    assert len(rows) == module.BATCH_REQUESTS + 9 and not capture.dropped.keys() - {
        ("m", "queue_full"),
        ("m", "stopped"),
    }
    for row in rows:
        a, b, y = sent[row["request_id"]]
        assert row["input.a"] == a[row["row"]].tolist()
        assert row["input.b"] == [b[row["row"]]]
        assert row["output.y"] == y[row["row"]].tolist()


async def _async(call):
    return call()


def test_a_batch_across_midnight_lands_in_both_dates():
    from onnxflow.serving.capture import _Batch

    batch = None
    midnight = 86400 * 20_000  # 2024-10-04T00:00:00Z
    for i, (rows, at) in enumerate([(2, midnight - 0.5), (1, midnight - 0.1), (3, midnight + 0.2)]):
        x = np.full((rows, 2), i, np.float32)
        arrays = [x, x[:, :1]]  # the second a view: taken as a copy
        batch = batch or _Batch(("m", "1"), ("x",), ("y",), arrays, exact=True)
        batch.take(arrays)
        batch.add(f"r{i}", at, 0.001)
    days = {day: (table, n) for day, table, _, n in batch.tables(batch.counts())}
    assert sorted(days) == ["2024-10-03", "2024-10-04"]
    before, after = days["2024-10-03"], days["2024-10-04"]
    assert before[1] == 2 and before[0]["request_id"].to_pylist() == ["r0", "r0", "r1"]
    assert after[1] == 1 and after[0]["row"].to_pylist() == [0, 1, 2]
    assert after[0]["output.y"].to_pylist() == [[2.0]] * 3


def test_two_writers_on_one_folder_keep_each_others_segments():
    """Replicas capture into one folder or bucket, often with the same pid (a container's):
    segments started in the same second must not share a name and overwrite each other."""
    import fsspec

    url = "memory://capture-replicas"
    model = SimpleNamespace(name="m", version="1", output_names=["p"])
    replicas = [Capture(_settings(url)) for _ in range(2)]
    for capture in replicas:
        capture.start()
    for i in range(10):
        for n, capture in enumerate(replicas):
            x = np.full((2, 4), i, np.float32)
            capture.offer(model, f"r{n}-{i}", {"x": x}, [x], 0.001)
    for capture in replicas:
        capture.stopping()
        capture.stop()
    assert all(c.accepted[("m", "1")] == 10 for c in replicas)
    table = _read(fsspec.filesystem("memory"), "/capture-replicas")
    assert table.num_rows == 40
    assert {r["request_id"] for r in table.to_pylist()} == {
        f"r{n}-{i}" for n in range(2) for i in range(10)
    }


def test_any_replica_takes_labels_for_another_ones_requests_while_its_segment_is_open():
    """Replicas behind one address (a Kubernetes Service) capture into one folder: a label
    may reach a replica that did not answer. It finds the request in the other replica's
    id files while that segment is still open, then in the closed segment; a label one
    replica stored is refused as a repeat by the other."""
    import fsspec

    from onnxflow.serving.errors import Conflict, NotFound
    from onnxflow.serving.feedback import FeedbackStore, Label

    url = "memory://capture-two"
    fs = fsspec.filesystem("memory")
    model = SimpleNamespace(name="m", version="1", output_names=["p"])
    a, b = Capture(_settings(url)), Capture(_settings(url))
    a.start()
    for i in range(5):
        x = np.full((1 + i % 2, 3), i, np.float32)
        a.offer(model, f"a{i}", {"x": x}, [x], 0.001)
    wait_for(lambda: a.written[("m", "1")] == 7)
    # the segment is open: nothing readable yet, only hidden files
    assert all(p.rsplit("/", 1)[1].startswith(".") for p in fs.find("/capture-two"))
    at_b, at_a = FeedbackStore(b), FeedbackStore(a)
    assert not b.rows_of_ids("m", {"a1"})  # b never saw it
    assert at_b.submit("m", [Label("a1", 1, "0"), Label("a0", 0, "1")]) == 2
    with pytest.raises(Conflict, match="already stored"):
        at_a.submit("m", [Label("a1", 1, "2")])
    with pytest.raises(NotFound, match="nope"):
        at_b.submit("m", [Label("nope", 0, "0")])
    a.stopping()
    a.stop()  # the segment closes and its id files go
    assert not [p for p in fs.find("/capture-two") if "/.ids-" in p]
    assert at_b.submit("m", [Label("a3", 1, "1")]) == 1  # now from the closed segment
    with pytest.raises(Exception, match="row out of range"):
        at_b.submit("m", [Label("a2", 1, "1")])  # a2 had one row


def test_a_full_queue_drops_and_counts_instead_of_waiting():
    capture = Capture(_settings("memory://capture-full", capture_queue_bytes=65536))
    model = SimpleNamespace(name="m", version="1", output_names=["p"])
    big = np.zeros((1, 4096), np.float32)  # 16 KiB in, 16 KiB out: two fit
    for _ in range(5):  # the writer is not started: nothing is taken off the queue
        capture.offer(model, None, {"x": big}, [big], 0.0)
    assert capture.accepted[("m", "1")] == 2 and capture.dropped[("m", "queue_full")] == 3


def test_retention_deletes_date_partitions_older_than_its_days():
    import datetime as dt

    import fsspec

    fs = fsspec.filesystem("memory")
    today = dt.datetime.now(dt.UTC).date()
    days = {n: (today - dt.timedelta(days=n)).isoformat() for n in (0, 6, 8, 40)}
    for day in days.values():
        fs.pipe(f"/capture-old/model=m/version=1/date={day}/part-x.parquet", b"x")
    from onnxflow.serving.capture_writer import SegmentWriter

    SegmentWriter("memory://capture-old", 1 << 20, 300.0, retention_days=7)._apply_retention()
    left = {p.split("date=")[1].split("/")[0] for p in fs.find("/capture-old")}
    assert left == {days[0], days[6]}


_DIES = """
import os, signal, sys, time
import numpy as np
from types import SimpleNamespace
from onnxflow.serving.capture import Capture
from onnxflow.serving.settings import ServingSettings

capture = Capture(ServingSettings(model="m@champion", capture=sys.argv[1],
                                  capture_flush_interval_s=0.05))
capture.start()
model = SimpleNamespace(name="m", version="1", output_names=["y"])
for i in range(500):
    x = np.full((1, 3), i, np.float32)
    capture.offer(model, f"r{i}", {"x": x}, [x * 2], 0.001)
deadline = time.monotonic() + 60
while capture.written[("m", "1")] < 500 and time.monotonic() < deadline:
    time.sleep(0.01)
print(capture._writer.process.pid, capture.written[("m", "1")], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the endpoint dies, its segment still open
"""


def test_the_writer_process_closes_its_segments_when_the_endpoint_dies(tmp_path):
    """The writer runs in a process of its own: an endpoint killed (SIGKILL) with its
    segment still open leaves no unfinished file: the writer sees the pipe close and
    rolls the segment, and every request it wrote can be read; no id file is left over."""
    import subprocess
    import sys

    folder = tmp_path / "captured"
    run = subprocess.run(
        [sys.executable, "-c", _DIES, str(folder)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == -9, run.stderr
    writer_pid, written = (int(v) for v in run.stdout.split())
    assert written == 500
    wait_for(lambda: not os.path.exists(f"/proc/{writer_pid}"), timeout=60)
    # no .inprogress, no .ids- file; the writer gave its lock up
    assert not [p.name for p in folder.rglob(".*") if p.name != ".writers"]
    assert not list((folder / ".writers").iterdir())
    table = _read(None, str(folder))
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(500))


def test_a_writer_process_that_dies_is_counted_and_replaced(tmp_path):
    """The writer process killed: the requests in its open segment and in the batch it
    was sent are counted as dropped (write_error), a new writer takes the next ones, and
    the figures of both add up."""
    from types import SimpleNamespace

    # the sender never flushes on its own here: each flush is this test's (_timed_write),
    # so nothing is in flight when the writer is killed
    settings = ServingSettings(
        model="m@champion",
        capture=str(tmp_path),
        capture_flush_interval_s=3600,
        capture_writer_nice=7,
    )
    capture = Capture(settings)
    model = SimpleNamespace(name="m", version="1", output_names=["y"])
    capture.start()
    pid = capture._writer.process.pid
    assert capture.status()["writer"] == f"process {pid}, nice 7"
    # the writer lowered its own priority, by the setting (the endpoint's stays)
    assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7

    def offer(start: int) -> None:
        for i in range(start, start + 100):
            x = np.full((1, 3), i, np.float32)
            capture.offer(model, f"r{i}", {"x": x}, [x * 2], 0.001)
        capture._timed_write()  # a flush: it returns once the writer answered (or ended)

    try:
        offer(0)
        assert capture.written[("m", "1")] == 100
        first = capture._writer.process
        first.kill()
        first.wait(30)
        offer(100)  # sent to the dead writer: lost, and counted
        assert capture.dropped[("m", "write_error")] == 200
        assert capture._writer.process.pid != first.pid
        assert "capture writer" in capture.last_error
        offer(200)
        assert capture.written[("m", "1")] == 200
    finally:
        capture.stopping()
        capture.stop()
    table = _read(None, str(tmp_path))
    assert sorted(table["request_id"].to_pylist()) == sorted(f"r{i}" for i in range(200, 300))
    assert capture.accepted[("m", "1")] == 300 and capture.segments_rolled == 1


def test_without_a_writer_process_the_capture_writes_from_a_thread(tmp_path, monkeypatch, caplog):
    """Where no writer process can be started (here: no Python to start it with), the
    capture says so and writes from a thread; nothing is lost."""
    import sys
    from types import SimpleNamespace

    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    capture = Capture(_settings(str(tmp_path / "captured")))
    with caplog.at_level("WARNING", logger="onnxflow.serving.capture"):
        capture.start()
    assert capture.status()["writer"] == "thread" and "no writer process" in caplog.text
    model = SimpleNamespace(name="m", version="1", output_names=["y"])
    x = np.ones((1, 3), np.float32)
    capture.offer(model, "only", {"x": x}, [x], 0.001)
    capture.stopping()
    capture.stop()
    assert _read(None, str(tmp_path / "captured"))["request_id"].to_pylist() == ["only"]


def test_an_unknown_filesystem_is_refused_by_name():
    with pytest.raises(ValueError, match="capture location 'nosuchfs://x'"):
        Capture(_settings("nosuchfs://x"))


# --- a real endpoint: two models, both fronts, load, SIGTERM --------------------------------


@pytest.fixture(scope="module")
def captured(registry, tmp_path_factory):
    root = tmp_path_factory.mktemp("capture-models")
    assert registry.register("cap_a", models.mlp(root / "a" / "model.onnx"), _example()) == "1"
    multi = models.multi_io(root / "b" / "model.onnx")
    assert registry.register("cap_b", multi, models.multi_example()) == "1"
    state = tmp_path_factory.mktemp("capture-endpoint")
    folder = state / "captured"
    with serving(
        registry,
        state,
        "cap_a",
        model="cap_a@champion,cap_b@champion",
        capture=str(folder),
        token=TOKEN,
        poll_interval_s=0,
    ) as endpoint:
        yield SimpleNamespace(url=endpoint.url, grpc=endpoint.grpc, folder=folder, state=state)


def _rest(http: httpx.Client, i: int, rid: str | None) -> tuple[int, str | None, int]:
    x = np.random.default_rng(i).normal(size=(1 + i % 3, 64)).astype(np.float32)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": list(x.shape)}]}
    body["inputs"][0]["data"] = x.ravel().tolist()
    headers = {"x-request-id": rid} if rid else {}
    response = http.post("/v2/models/cap_a/infer", json=body, headers=headers)
    if response.status_code != 200:
        return response.status_code, None, x.shape[0]
    # the id is the V2 body's; the header only echoes the client's
    assert response.headers.get("x-request-id") == rid
    return response.status_code, response.json().get("id"), x.shape[0]


def _grpc(client, i: int) -> tuple[int, str, int]:
    import tritonclient.grpc as grpcclient

    example = models.multi_example(rows=2, seed=i)
    tensors = []
    for name, array in example.items():
        datatype = {"O": "BYTES", "b": "BOOL"}.get(array.dtype.kind) or {
            np.float32: "FP32",
            np.int32: "INT32",
            np.float16: "FP16",
            np.uint8: "UINT8",
            np.float64: "FP64",
        }.get(array.dtype.type)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    given = f"grpc-{i}" if i % 2 else ""
    result = client.infer(
        "cap_b", tensors, request_id=given, headers={"authorization": f"Bearer {TOKEN}"}
    )
    answered = result.get_response().id
    assert not given or answered == given
    return 200, answered, 2


def _metric(text: str, name: str) -> dict:
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_feedback_joins_labels_by_id_and_refuses_bad_ones_whole(captured, tmp_path):
    import subprocess
    import sys

    import pyarrow.dataset as ds

    headers = {"authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=captured.url, headers=headers, timeout=30) as http:
        assert _rest(http, 0, "fb-1")[:2] == (200, "fb-1")  # 1 row
        assert _rest(http, 1, "fb-2")[:2] == (200, "fb-2")  # 2 rows
        assert _rest(http, 0, "fb-3")[:2] == (200, "fb-3")  # never labelled
        status, generated, _ = _rest(http, 3, None)
        assert status == 200 and len(generated) == 32 and int(generated, 16) >= 0
        # a V2 body's own id is the request's; MLflow's format has none: the header has it
        x = np.zeros((1, 64), np.float32)
        features = {"name": "features", "datatype": "FP32", "shape": [1, 64]}
        answer = http.post(
            "/v2/models/cap_a/infer",
            json={"id": "fb-body", "inputs": [{**features, "data": x.ravel().tolist()}]},
        )
        assert answer.json()["id"] == "fb-body" and "x-request-id" not in answer.headers
        mlflow_body = {"inputs": {"features": x.tolist()}}
        scored = http.post("/v2/models/cap_a/invocations", json=mlflow_body)
        invoked = scored.headers.get("x-request-id", "")
        assert scored.status_code == 200 and len(invoked) == 32, scored.text

        def post(body):
            return http.post("/v2/models/cap_a/feedback", json=body)

        ok = post({"request_id": "fb-1", "label": 7})
        assert ok.status_code == 200 and ok.json() == {"stored": 1}
        again = post({"request_id": "fb-1", "label": 3})
        assert again.status_code == 409 and "never overwritten" in again.json()["error"]
        twice = post({"labels": [{"request_id": "fb-2", "label": 1}] * 2})
        assert twice.status_code == 409 and "given twice" in twice.json()["error"]
        unknown = post({"labels": [{"request_id": "fb-2", "label": 1}, {"request_id": "nope"}]})
        assert unknown.status_code == 400  # the missing label is named first
        unknown = post(
            {"labels": [{"request_id": "fb-2", "label": 1}, {"request_id": "nope", "label": 2}]}
        )
        assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
        for bad, words in (
            ("seven", "class index"),
            (12, "out of range 0..9"),
            (1.5, "class index"),
            (True, "class index"),
        ):
            refused = post({"request_id": "fb-2", "label": bad})
            assert refused.status_code == 400 and words in refused.json()["error"], refused.text
        row = post({"request_id": "fb-2", "label": 1, "row": 5})
        assert row.status_code == 400 and "the request had 2" in row.json()["error"]
        assert http.post("/v2/models/cap_a/feedback", content=b"{").status_code == 400
        assert post({"request_id": "fb-2", "label": 4}).json() == {"stored": 1}  # row 0
        assert post({"request_id": invoked, "label": 2}).json() == {"stored": 1}

    labels = tmp_path / "labels.csv"
    labels.write_text(f"request_id,label,row\n{generated},5,\nfb-2,6,1\n")
    command = [sys.executable, "-m", "onnxflow.cli", "feedback", "cap_a", str(labels)]
    command += ["--url", captured.url]
    env = {**__import__("os").environ, "ONNXFLOW_SERVE_TOKEN": TOKEN}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "2 label(s) stored for cap_a" in done.stdout, done.stderr
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "already stored" in done.stderr, done.stderr
    # bad files: one line naming the problem, exit 1, nothing stored (checked below)
    for text, words in (
        ("request_id,value\nfb-1,3\n", "missing label"),
        ("request_id,label,row\nfb-2,3,first\n", "row 'first' is no index"),
        ("request_id,label\n", "has no labels"),
        ("request_id,label\nfb-3,2\nnope,3\n", "not captured"),  # fb-3 is not stored either
    ):
        labels.write_text(text)
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr

    stored = ds.dataset(captured.folder / "_feedback", format="parquet", partitioning="hive")
    table = stored.to_table(columns=["request_id", "row", "label"]).to_pydict()
    got = sorted(zip(*table.values()))
    want = [("fb-1", 0, "7"), ("fb-2", 0, "4"), (generated, 0, "5"), ("fb-2", 1, "6")]
    want.append((invoked, 0, "2"))
    assert got == sorted(want)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_every_answer_is_captured_under_load_and_sigterm_loses_nothing(captured):
    import pyarrow.dataset as ds
    import tritonclient.grpc as grpcclient

    headers = {"authorization": f"Bearer {TOKEN}"}
    answered: dict[str, int] = {}  # request id -> rows
    lock = threading.Lock()
    stop = threading.Event()

    def worker(w: int) -> None:
        client = grpcclient.InferenceServerClient(captured.grpc)
        with httpx.Client(base_url=captured.url, headers=headers, timeout=30) as http:
            for i in range(w * 100_000, w * 100_000 + 100_000):
                if stop.is_set():
                    return
                try:
                    if w % 4 == 3:
                        status, rid, rows = _grpc(client, i)
                    else:
                        status, rid, rows = _rest(http, i, f"rest-{i}" if i % 2 else None)
                except Exception:  # noqa: BLE001  (the endpoint went away under SIGTERM)
                    return
                if status == 200:
                    assert rid, "an answer without its request id"
                    with lock:
                        answered[rid] = rows

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(worker, w) for w in range(8)]
        try:
            wait_for(lambda: len(answered) >= 600, timeout=180, interval=0.05)
            with httpx.Client(base_url=captured.url, headers=headers, timeout=30) as http:
                metrics = http.get("/metrics").text
                status = http.get("/admin/status").json()["capture"]
            stop_background(captured.state)  # SIGTERM while the 8 clients keep sending
        finally:
            stop.set()
        for future in futures:
            future.result()
    assert sum(_metric(metrics, "onnxflow_capture_dropped_total").values()) == 0
    assert status["dropped"] == {} and status["accepted"]

    table = ds.dataset(captured.folder, format="parquet", partitioning="hive").to_table()
    ids = table.column("request_id").to_pylist()
    rows_per_id: dict[str, int] = {}
    for rid in ids:
        rows_per_id[rid] = rows_per_id.get(rid, 0) + 1
    missing = [rid for rid in answered if rid not in rows_per_id]
    assert not missing, f"{len(missing)} answered requests were not captured: {missing[:5]}"
    assert all(rows_per_id[rid] == rows for rid, rows in answered.items())
    # the generated ids were returned; the given ones kept (both fronts, both models)
    assert {str(m) for m in table.column("model").to_pylist()} == {"cap_a", "cap_b"}
    assert any(r.startswith("rest-") for r in answered)
    assert any(r.startswith("grpc-") for r in answered)
    assert any(len(r) == 32 and "-" not in r for r in answered)  # generated (32 hex)
    assert not list(captured.folder.rglob(".*inprogress"))  # every segment closed
    b = ds.dataset(captured.folder / "model=cap_b", format="parquet").to_table().to_pylist()
    assert b[0]["input.names"][0].startswith("name-") and len(b[0]["input.x"]) == 3


_DIES_WITH_ITS_WRITER = """
import os, signal, sys
import numpy as np
from types import SimpleNamespace
from onnxflow.serving.capture import Capture
from onnxflow.serving.settings import ServingSettings

capture = Capture(ServingSettings(model="m@champion", capture=sys.argv[1],
                                  capture_writer="thread", capture_flush_interval_s=3600))
capture.start()
model = SimpleNamespace(name="m", version="1", output_names=["y"])
for i in range(300):
    x = np.full((1, 3), i, np.float32)
    capture.offer(model, f"dead{i}", {"x": x}, [x * 2], 0.001)
capture._timed_write()  # in the segment (and its id file), which stays open
print(capture.written[("m", "1")], flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the endpoint and its writer die together
"""


def test_the_next_writer_sweeps_what_a_dead_writer_left(tmp_path, caplog):
    """The endpoint and its writer killed together (a container's SIGKILL, the OOM killer)
    leave an unfinished segment, which no reader can open, and its id file, by which
    feedback would take labels for rows that are gone. The next writer on the folder finds
    that writer's lock free: it logs the requests lost and removes both. A living writer's
    open segment is left alone."""
    import subprocess
    import sys

    from onnxflow.serving.capture_writer import SegmentWriter
    from onnxflow.serving.feedback import _open_segment_ids

    folder = tmp_path / "captured"
    model = SimpleNamespace(name="m", version="1", output_names=["y"])
    alive = Capture(
        ServingSettings(
            model="m@champion",
            capture=str(folder),
            capture_writer="thread",
            capture_flush_interval_s=3600,
        )
    )
    alive.start()
    try:
        for i in range(20):
            x = np.full((1, 3), i, np.float32)
            alive.offer(model, f"alive{i}", {"x": x}, [x], 0.001)
        alive._timed_write()  # its segment open too
        run = subprocess.run(
            [sys.executable, "-c", _DIES_WITH_ITS_WRITER, str(folder)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == -9 and run.stdout.split() == ["300"], run.stderr
        fs = fsspec.filesystem("file")

        def open_ids() -> set[str]:
            table = _open_segment_ids(fs, f"{folder}/model=m", ["request_id"])
            return set(table["request_id"].to_pylist()) if table is not None else set()

        assert len(open_ids()) == 320  # feedback would take labels for the dead one's ids
        assert len(list(folder.rglob(".part-*.inprogress"))) == 2
        with caplog.at_level("WARNING", logger="onnxflow.serving.capture_writer"):
            after = SegmentWriter(str(folder), 1 << 20, 300.0, retention_days=0)
        assert "300 requests are lost" in caplog.text
        assert open_ids() == {f"alive{i}" for i in range(20)}
        assert len(list(folder.rglob(".part-*.inprogress"))) == 1  # the living one's
        assert after.sweep_dead_writers() == 0  # nothing more, and the living one stays
        after.close()
    finally:
        alive.stopping()
        alive.stop()
    table = _read(None, str(folder))
    assert sorted(table["request_id"].to_pylist()) == sorted(f"alive{i}" for i in range(20))
    assert not [p.name for p in folder.rglob(".*") if p.name != ".writers"]
    assert not list((folder / ".writers").iterdir())  # every writer gave its lock up


def test_a_lock_left_half_made_is_swept_once_stale_and_never_while_held_or_young(tmp_path):
    """A writer killed between making its lock file and renaming it leaves ``.lock.new``:
    the next writer removes it once it is older than a start takes and no one holds it."""
    import fcntl

    from onnxflow.serving.capture_writer import STALE_NEW_LOCK_S, SegmentWriter

    writers = tmp_path / ".writers"
    writers.mkdir()
    old = time.time() - STALE_NEW_LOCK_S - 5
    for name in ("dead", "held", "young"):
        (writers / f"{name}.lock.new").touch()
    for name in ("dead", "held"):
        os.utime(writers / f"{name}.lock.new", (old, old))
    held = os.open(writers / "held.lock.new", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer stopped in between, alive
    try:
        writer = SegmentWriter(str(tmp_path), 1 << 20, 300.0, retention_days=0)  # sweeps
        try:
            left = sorted(p.name for p in writers.iterdir() if p.name.endswith(".new"))
            assert left == ["held.lock.new", "young.lock.new"]
        finally:
            writer.close()
    finally:
        os.close(held)


def test_send_all_frames_messages_as_a_connection_reads_them_whatever_the_writes_take(
    monkeypatch,
):
    """The batches go to the writer process in as few writev calls as the pipe takes,
    framed as multiprocessing's Connection frames them; a write that takes only part of
    what it was given (a signal) goes on where it stopped."""
    import array
    from multiprocessing.connection import Connection

    from onnxflow.serving import capture_writer

    messages = [
        b"header",
        bytearray(range(256)) * 5000,
        b"",
        array.array("q", range(1000)),
        memoryview(b"x" * 70_000),
    ]
    expected = [bytes(memoryview(m).cast("B")) for m in messages]
    writev = os.writev

    def sent(limit: int | None) -> tuple[list[bytes], int]:
        """What a Connection reads of send_all(messages), each writev taking at most
        ``limit`` bytes (cutting a view in two); and the number of writev calls."""
        calls = []

        def limited(fd, views):
            calls.append(len(views))
            if limit is None:
                return writev(fd, views)
            budget, cut = limit, []
            for view in views:
                cut.append(view[:budget])
                budget -= len(cut[-1])
                if not budget:
                    break
            return writev(fd, cut)

        monkeypatch.setattr(capture_writer.os, "writev", limited)
        read, write = os.pipe()
        inbox = Connection(read, writable=False)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(inbox.recv_bytes() for _ in messages))
        reader.start()
        try:
            capture_writer.send_all(write, messages)
            reader.join(30)
        finally:
            os.close(write)
            inbox.close()
        return got, len(calls)

    assert sent(None) == (expected, 1)  # all of it in one writev
    # in parts of 40,000 bytes: 1,358,026 bytes with their 5 lengths, 34 writes
    assert sent(40_000) == (expected, 34)
