"""Triton's system shared-memory extension: the registered regions, and tensors in them.

A client creates a POSIX shared-memory object (``shm_open("/input_simple")``, which is
``/dev/shm/input_simple`` on Linux), registers a window of it as a named region, then
names the region in an inference request: inputs are read from it, requested outputs
written into it, and the response carries the output's parameters instead of its data.
The fronts (REST, gRPC) parse their protocol and call :class:`SharedMemoryRegistry`;
nothing here knows HTTP or gRPC.

The object is read and written with ``os.pread``/``os.pwrite`` on a file descriptor
kept open while the region is registered, not through ``mmap``: a client may shrink or
remove its object at any time, and touching a mapping past the end of a shrunk object
kills the process with SIGBUS, where a short ``pread`` is a 400 naming the region.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from onnxflow.serving.errors import BadInput, NotFound, NotSupported

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PARAMETERS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


@dataclass(frozen=True)
class Region:
    """A registered window ``[offset, offset + byte_size)`` of one shared-memory object."""

    name: str
    key: str
    offset: int
    byte_size: int
    fd: int

    def as_json(self) -> dict:
        """Every field but the file descriptor, which means nothing outside this process."""
        return {k: v for k, v in asdict(self).items() if k != "fd"}


@dataclass(frozen=True)
class MemoryReference:
    """Where a tensor lives: ``byte_size`` bytes at ``offset`` into region ``region``."""

    region: str
    byte_size: int
    offset: int = 0

    def as_parameters(self, byte_size: int | None = None) -> dict:
        params = {
            "shared_memory_region": self.region,
            "shared_memory_byte_size": self.byte_size if byte_size is None else byte_size,
        }
        if self.offset:
            params["shared_memory_offset"] = self.offset
        return params


def memory_reference(params: dict, where: str) -> MemoryReference | None:
    """The shared-memory parameters of one input or output, checked; None if it has none."""
    if not any(key in params for key in PARAMETERS):
        return None
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    if region is None or size is None:
        raise BadInput(
            f"{where}: shared_memory_region and shared_memory_byte_size go together "
            "(shared_memory_offset is optional)"
        )
    if not isinstance(region, str) or not region:
        raise BadInput(f"{where}: shared_memory_region must be a region name")
    offset = params.get("shared_memory_offset", 0)
    for key, value in (("shared_memory_byte_size", size), ("shared_memory_offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadInput(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return MemoryReference(region, size, offset)


def object_path(key: str) -> Path:
    """The file of POSIX shared-memory object ``key`` (``/name``, as ``shm_open`` takes)."""
    name = key.lstrip("/")
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise BadInput(
            f"shared-memory key {key!r} is not a POSIX shared-memory object name "
            "(one '/' then a name without '/', e.g. '/input_simple')"
        )
    return SHM_DIR / name


class SharedMemoryRegistry:
    """The regions clients registered, by name; safe to call from any thread."""

    def __init__(self) -> None:
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # --- register, status, unregister -------------------------------------------------

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Open ``key`` and register ``[offset, offset + byte_size)`` of it as ``name``."""
        if not isinstance(name, str) or not name:
            raise BadInput("a shared-memory region needs a name")
        if not isinstance(key, str):
            raise BadInput(f"region {name!r}: key must be a string like '/input_simple'")
        for field, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadInput(
                    f"region {name!r}: {field} must be a non-negative integer, got {value!r}"
                )
        if byte_size == 0:
            raise BadInput(f"region {name!r}: byte_size must be more than 0")
        path = object_path(key)
        with self._lock:
            if name in self._regions:
                raise BadInput(
                    f"shared-memory region {name!r} is already registered "
                    f"(key {self._regions[name].key!r}); unregister it first"
                )
            try:
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                raise BadInput(
                    f"region {name!r}: no shared-memory object {key!r} on this host "
                    "(create it with shm_open before registering)"
                ) from None
            except OSError as exc:
                raise BadInput(
                    f"region {name!r}: cannot open shared-memory object {key!r}: {exc.strerror}"
                ) from None
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise BadInput(f"region {name!r}: {key!r} is not a shared-memory object")
                if offset + byte_size > info.st_size:
                    raise BadInput(
                        f"region {name!r}: offset {offset} + byte_size {byte_size} runs past "
                        f"the {info.st_size} bytes of shared-memory object {key!r}"
                    )
            except BaseException:
                os.close(fd)
                raise
            region = Region(name, key, offset, byte_size, fd)
            self._regions[name] = region
        log.info("registered shared-memory region %r: %s [%d, +%d)", name, key, offset, byte_size)
        return region

    def status(self, name: str | None = None) -> list[dict]:
        """Every registered region (``name`` None), or the one named."""
        with self._lock:
            if name is None:
                return [r.as_json() for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"no shared-memory region {name!r} is registered")
        return [region.as_json()]

    def unregister(self, name: str | None = None) -> None:
        """Unregister ``name`` (a name not registered is no error), or every region."""
        with self._lock:
            if name is None:
                regions = list(self._regions.values())
                self._regions.clear()
            else:
                region = self._regions.pop(name, None)
                regions = [] if region is None else [region]
        for region in regions:
            os.close(region.fd)
            log.info("unregistered shared-memory region %r", region.name)

    # --- tensors ----------------------------------------------------------------------

    def _window(self, ref: MemoryReference, where: str) -> tuple[Region, int]:
        """The region and the absolute position in its object of ``ref``, bounds checked.
        Called with the lock held: the region's descriptor stays open until the I/O is done
        (a concurrent unregister could otherwise close it, and its number be reused)."""
        region = self._regions.get(ref.region)
        if region is None:
            raise BadInput(
                f"{where}: shared-memory region {ref.region!r} is not registered "
                "(POST /v2/systemsharedmemory/region/NAME/register first)"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise BadInput(
                f"{where}: shared_memory_offset {ref.offset} + shared_memory_byte_size "
                f"{ref.byte_size} runs past region {ref.region!r} of {region.byte_size} bytes"
            )
        return region, region.offset + ref.offset

    def read(self, ref: MemoryReference, where: str) -> bytes:
        """The ``ref.byte_size`` bytes an input names."""
        with self._lock:
            region, start = self._window(ref, where)
            data = os.pread(region.fd, ref.byte_size, start)
        if len(data) != ref.byte_size:
            raise BadInput(
                f"{where}: shared-memory object {region.key!r} of region {ref.region!r} "
                "shrank below the registered window"
            )
        return data

    def write(self, ref: MemoryReference, data: bytes, where: str) -> None:
        """Write an output's bytes where ``ref`` says, if they fit its byte size."""
        if len(data) > ref.byte_size:
            raise BadInput(
                f"{where}: the output has {len(data)} bytes, more than its "
                f"shared_memory_byte_size of {ref.byte_size}"
            )
        with self._lock:
            region, start = self._window(ref, where)
            if os.fstat(region.fd).st_size < start + len(data):
                raise BadInput(
                    f"{where}: shared-memory object {region.key!r} of region "
                    f"{ref.region!r} shrank below the registered window"
                )
            os.pwrite(region.fd, data, start)


def cuda_not_supported() -> NotSupported:
    """What a CUDA shared-memory registration is answered with."""
    return NotSupported(
        "CUDA shared memory is not supported by this endpoint (onnxruntime on CPU here); "
        "use system shared memory (/v2/systemsharedmemory)"
    )
