"""The system shared-memory registry on real POSIX shared-memory objects (no server):
register, status, unregister, and every bound a request could cross."""

from __future__ import annotations

import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from onnxflow.serving.errors import BadInput, NotFound
from onnxflow.serving.shared_memory import (
    MemoryReference,
    SharedMemoryRegistry,
    memory_reference,
    object_path,
)


@pytest.fixture
def segment():
    shm = shared_memory.SharedMemory(create=True, size=256)
    try:
        yield shm
    finally:
        shm.close()
        shm.unlink()


def test_register_status_read_write_unregister(segment):
    registry = SharedMemoryRegistry()
    key = "/" + segment.name.lstrip("/")
    data = np.arange(16, dtype=np.int32)
    segment.buf[64:128] = data.tobytes()
    registry.register("inputs", key, 64, 128)
    assert registry.status() == [{"name": "inputs", "key": key, "offset": 64, "byte_size": 128}]
    assert registry.status("inputs")[0]["byte_size"] == 128
    read = registry.read(MemoryReference("inputs", 64), "input 'x'")
    np.testing.assert_array_equal(np.frombuffer(read, np.int32), data)
    registry.write(MemoryReference("inputs", 8, offset=64), b"\1" * 8, "output 'y'")
    assert bytes(segment.buf[128:136]) == b"\1" * 8  # region offset 64 + 64
    with pytest.raises(BadInput, match="already registered"):
        registry.register("inputs", key, 0, 8)
    registry.unregister("inputs")
    registry.unregister("inputs")  # unregistering what is not registered is no error
    assert registry.status() == []
    with pytest.raises(NotFound, match="no shared-memory region 'inputs'"):
        registry.status("inputs")


def test_every_bound_is_checked_before_a_byte_is_touched(segment):
    registry = SharedMemoryRegistry()
    key = segment.name
    with pytest.raises(BadInput, match="runs past the 256 bytes"):
        registry.register("r", key, 200, 100)
    with pytest.raises(BadInput, match="no shared-memory object"):
        registry.register("r", "/onnxflow-no-such-object", 0, 8)
    for bad in ("/", "/../etc/passwd", "/a/b", ""):
        with pytest.raises(BadInput, match="not a POSIX shared-memory object name"):
            registry.register("r", bad, 0, 8)
    with pytest.raises(BadInput, match="byte_size must be more than 0"):
        registry.register("r", key, 0, 0)
    with pytest.raises(BadInput, match="offset must be a non-negative integer"):
        registry.register("r", key, -1, 8)
    registry.register("r", key, 0, 64)
    with pytest.raises(BadInput, match="runs past region 'r' of 64 bytes"):
        registry.read(MemoryReference("r", 32, offset=40), "input 'x'")
    with pytest.raises(BadInput, match="region 'other' is not registered"):
        registry.read(MemoryReference("other", 4), "input 'x'")
    with pytest.raises(BadInput, match="more than its shared_memory_byte_size of 4"):
        registry.write(MemoryReference("r", 4), b"\0" * 8, "output 'y'")
    # the client shrinks its object under the registered window: an error, never SIGBUS
    os.truncate(object_path(key), 16)
    with pytest.raises(BadInput, match="shrank below the registered window"):
        registry.read(MemoryReference("r", 32), "input 'x'")
    with pytest.raises(BadInput, match="shrank below the registered window"):
        registry.write(MemoryReference("r", 32), b"\0" * 32, "output 'y'")
    registry.unregister()
    assert registry.status() == []


def test_request_parameters():
    assert memory_reference({"binary_data_size": 4}, "input 'x'") is None
    ref = memory_reference(
        {"shared_memory_region": "r", "shared_memory_byte_size": 64, "shared_memory_offset": 8},
        "input 'x'",
    )
    assert ref == MemoryReference("r", 64, 8)
    assert ref.as_parameters(60) == {
        "shared_memory_region": "r",
        "shared_memory_byte_size": 60,
        "shared_memory_offset": 8,
    }
    with pytest.raises(BadInput, match="go together"):
        memory_reference({"shared_memory_region": "r"}, "input 'x'")
    with pytest.raises(BadInput, match="shared_memory_offset must be a non-negative integer"):
        memory_reference(
            {"shared_memory_region": "r", "shared_memory_byte_size": 4, "shared_memory_offset": -4},
            "input 'x'",
        )
