"""The acl backend's session process: aclruntime in a process of its own.

aclruntime's bindings never release the GIL: `run` (aclmdlExecute), `to_device`, `to_host`
and `Tensor()` hold it for their whole synchronous call. In the executor's process that
stops every other thread while a batch executes: no filling or uploading of the next
slot, no heartbeat, no sending of finished outputs. So the session lives here, in a child
of the executor, alone on one thread (which is also the thread ACL's per-thread context is
bound on). The executor's side (`SessionProcess`) writes each batch into shared memory,
sends the slot's number over a socket and, on its runner thread, waits on that socket with
the GIL released.

- Slots: one memfd mapped by both processes (`SlotMemory`), holding every slot's `image`
  and `box` inputs and its output, at offsets the parent lays out; only slot numbers and
  small msgpack documents cross the socket (`Channel`).
- Inputs go to `run` as `aclruntime.BaseTensor(pointer, nbytes)` into those slots where the
  release has it (ais_bench's own `InferSession.infer` does so): one host-to-device copy,
  inside `run`. Otherwise `Tensor(view)` + `to_device`: a pinned copy, then the upload.
- Outputs: `to_host()`, then one copy into the slot's output region; the parent copies it
  out for the caller, who may keep it.
- Context: bound once on this thread after the session is made: `set_context()` where the
  release has it (2024-05+), else a one-byte `to_device`, which binds it in every release.
- It ends on "close" (after `free_resource()`, or `finalize()` where that is missing), or
  when its socket reports the parent gone (after the call in progress returns).
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pspnet.core import wire

RECV_BYTES = 1 << 16
PAGE = mmap.PAGESIZE
READY_POLL_S = 0.5          # how often a start-up wait looks whether the child still lives
CLOSE_TIMEOUT_S = 30.0      # free_resource of a large OM takes a while
KILL_TIMEOUT_S = 5.0
UNCLEARED_TIMES_MAX = 10_000    # runs whose times are read from a summary never cleared


class SessionError(RuntimeError):
    """The session process failed to start or died; `kind` says how ("unavailable":
    aclruntime is missing, "value": a bad argument, "runtime": anything else)."""

    def __init__(self, message: str, kind: str = "runtime") -> None:
        super().__init__(message)
        self.kind = kind


# ---- the wire between the two processes ---------------------------------------------------

class Channel:
    """msgpack documents over a connected stream socket (msgpack delimits them itself).

    One thread may send while another receives; `recv` waits in the kernel, GIL released.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._unpacker = wire.document_unpacker()

    def send(self, doc: Mapping[str, Any]) -> None:
        self.sock.sendall(wire.pack_document(dict(doc)))

    def recv(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next document; TimeoutError after `timeout_s`; EOFError once the peer closed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                return next(self._unpacker)
            except StopIteration:
                pass
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    raise TimeoutError
            data = self.sock.recv(RECV_BYTES)
            if not data:
                raise EOFError("the other end closed the session socket")
            self._unpacker.feed(data)

    def close(self) -> None:
        self.sock.close()


# ---- shared slot memory ---------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """One array in the shared memory: slot, name ("image", "box", "output"), place, type."""

    slot: int
    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def doc(self) -> list[Any]:
        return [self.slot, self.name, self.offset, list(self.shape), self.dtype]


def lay_out(num_slots: int, arrays: Mapping[str, tuple[tuple[int, ...], Any]]) -> list[Region]:
    """Every slot's arrays (name -> (shape, dtype)), each starting on a page boundary."""
    regions, offset = [], 0
    for slot in range(num_slots):
        for name, (shape, dtype) in arrays.items():
            region = Region(slot, name, offset, tuple(int(d) for d in shape),
                            np.dtype(dtype).name)
            regions.append(region)
            offset += -(-region.nbytes // PAGE) * PAGE
    return regions


class SlotMemory:
    """The slots' arrays in one memfd mapping: made by the parent, attached by the child."""

    def __init__(self, fd: int, regions: Sequence[Region]) -> None:
        self.fd = fd
        self.regions = list(regions)
        size = max(r.offset + r.nbytes for r in self.regions)
        self._map = mmap.mmap(fd, size)
        self._views = {(r.slot, r.name): np.frombuffer(self._map, r.dtype, int(np.prod(r.shape)),
                                                       r.offset).reshape(r.shape)
                       for r in self.regions}

    @classmethod
    def create(cls, regions: Sequence[Region]) -> SlotMemory:
        fd = os.memfd_create("pspnet-acl-slots", os.MFD_CLOEXEC)
        os.ftruncate(fd, max(r.offset + r.nbytes for r in regions))
        return cls(fd, regions)

    def view(self, slot: int, name: str) -> np.ndarray:
        return self._views[slot, name]

    def address(self, slot: int, name: str) -> int:
        return int(self._views[slot, name].ctypes.data)

    def close(self) -> None:
        """Unmap (once nobody holds a view any more: else the mapping goes with the last
        view) and close the descriptor."""
        self._views.clear()
        try:
            self._map.close()
        except BufferError:
            pass                              # a caller still holds a slot array
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- the executor's side ----------------------------------------------------------------------

class SessionProcess:
    """The parent's handle: start the child, send it slots to run, wait for their results."""

    def __init__(self, start: Mapping[str, Any], memory: SlotMemory) -> None:
        """Start the child with the `start` document (model, device, options) and wait until
        it has opened the session; SessionError if it cannot."""
        self.memory = memory
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(theirs.fileno()), str(memory.fd)],
            pass_fds=(theirs.fileno(), memory.fd), stdin=subprocess.DEVNULL)
        theirs.close()
        self.channel = Channel(ours)
        self._results: dict[int, dict[str, Any]] = {}
        try:
            self.channel.send({**start, "op": "start",
                               "regions": [r.doc() for r in memory.regions]})
            self.ready = self._wait_ready()
        except BaseException:
            self.channel.close()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            raise

    def _wait_ready(self) -> dict[str, Any]:
        while True:
            try:
                reply = self.channel.recv(timeout_s=READY_POLL_S)
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise SessionError(f"the acl session process exited with status "
                                       f"{self.proc.returncode} before opening the model; "
                                       "its error is above") from None
                continue
            except EOFError:
                raise SessionError(f"the acl session process exited with status "
                                   f"{self.proc.wait()} before opening the model; its error "
                                   "is above") from None
            if reply.get("op") == "error":
                self.proc.wait()
                raise SessionError(reply["error"], reply.get("kind", "runtime"))
            return reply

    def run(self, slot: int) -> None:
        """Queue the slot's batch behind the ones already sent; returns at once."""
        try:
            self.channel.send({"op": "run", "slot": slot})
        except OSError as exc:
            raise self._gone(exc) from None

    def result(self, slot: int) -> dict[str, Any]:
        """Wait for the slot's result document ({"times_ms"} or {"error"})."""
        while slot not in self._results:
            try:
                reply = self.channel.recv()
            except (EOFError, OSError) as exc:
                raise self._gone(exc) from None
            self._results[int(reply["slot"])] = reply
        return self._results.pop(slot)

    def _gone(self, exc: BaseException) -> SessionError:
        code = self.proc.poll()
        state = "is gone" if code is None else f"exited with status {code}"
        return SessionError(f"the acl session process {state} ({type(exc).__name__}); the "
                            "executor will be restarted with a fresh one")

    def close(self) -> None:
        """Ask the child to free the session and exit; kill it if it does not."""
        try:
            self.channel.send({"op": "close"})
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self.channel.recv(timeout_s=max(0.0, deadline - time.monotonic())).get(
                    "op") != "closed":
                pass
        except (OSError, EOFError, TimeoutError):
            pass
        self.channel.close()
        try:
            self.proc.wait(timeout=KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- the session process ------------------------------------------------------------------------

def bind_context(runtime: Any, session: Any, device_id: int) -> str:
    """Make the session's ACL context current on the calling thread; how it was done.

    `set_context()` exists since 2024-05; before, `to_device` is the call that binds it in
    every release, so a one-byte tensor is moved to the device once."""
    if hasattr(session, "set_context"):
        session.set_context()
        return "set_context"
    runtime.Tensor(np.zeros(1, np.uint8)).to_device(device_id)
    return "to_device"


def exec_times_ms(entries: Sequence[Any]) -> list[float]:
    """aclruntime's exec_time_list in ms: older releases give ms, newer (start, end) pairs."""
    out = []
    for entry in entries:
        if isinstance(entry, (tuple, list)):
            start, end = entry
            out.append(float(end) - float(start))
        else:
            out.append(float(entry))
    return out


def _method(obj: Any, *names: str) -> Any:
    """The first of `names` that `obj` has, bound; None if none."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def describe(desc: Any) -> dict[str, Any]:
    """A tensor descriptor as plain data for the parent's checks."""
    return {"name": str(desc.name), "shape": [int(d) for d in desc.shape],
            "datatype": str(desc.datatype), "realsize": int(desc.realsize)}


class Session:
    """aclruntime's session over the shared slots, on this process's only thread."""

    def __init__(self, start: Mapping[str, Any], memory: SlotMemory) -> None:
        import aclruntime

        self.runtime = aclruntime
        self.memory = memory
        self.device_id = int(start["device"])
        options = aclruntime.session_options()
        if start.get("log_level") is not None:
            options.log_level = int(start["log_level"])
        if start.get("acl_json_path"):
            options.acl_json_path = str(start["acl_json_path"])
        self.session = aclruntime.InferenceSession(str(start["model"]), self.device_id, options)
        self.context = bind_context(aclruntime, self.session, self.device_id)
        self.base_tensor = start.get("feed") != "tensor" and hasattr(aclruntime, "BaseTensor")
        self.inputs = [describe(d) for d in self.session.get_inputs()]
        self.outputs = [describe(d) for d in self.session.get_outputs()]
        self.output_names = [self.outputs[0]["name"]] if self.outputs else []
        self._feeds: dict[int, list[Any]] = {}
        self._times_seen = 0
        # the summary's names: `sumary` and `reset_sumaryinfo` in the wheels of 2023-2025,
        # `reset_summaryinfo` (and a `summary` alias) in the binding's newest source
        self._summary = _method(self.session, "sumary", "summary")
        self._reset = _method(self.session, "reset_sumaryinfo", "reset_summaryinfo")
        if self._reset is not None:
            self._reset()

    def ready(self) -> dict[str, Any]:
        features = {"set_context": hasattr(self.session, "set_context"),
                    "base_tensor": hasattr(self.runtime, "BaseTensor"),
                    "free_resource": hasattr(self.session, "free_resource")}
        return {"op": "ready", "inputs": self.inputs, "outputs": self.outputs,
                "features": features, "context": self.context,
                "feed": "BaseTensor" if self.base_tensor else "Tensor"}

    def run(self, slot: int) -> dict[str, Any]:
        try:
            outputs = self.session.run(self.output_names, self._slot_feeds(slot))
            result = outputs[0]
            result.to_host()                   # outputs live on the device until this
            host = np.asarray(result)          # the host buffer, not a copy
            if host.dtype == object:
                raise RuntimeError("the output is still on the device after to_host()")
            out = self.memory.view(slot, "output").reshape(-1).view(np.uint8)
            raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
            if raw.nbytes != out.nbytes:
                raise RuntimeError(f"the OM gave {raw.nbytes} output bytes, the slot holds "
                                   f"{out.nbytes}")
            out[:] = raw
            return {"op": "done", "slot": slot, "times_ms": self._new_times()}
        except Exception as exc:  # noqa: BLE001  (the parent answers the batch with it)
            return {"op": "failed", "slot": slot, "error": f"{type(exc).__name__}: {exc}"}

    def _slot_feeds(self, slot: int) -> list[Any]:
        """The slot's inputs in the model's order: pointers into the shared slot (made once),
        or fresh Tensors moved to the device."""
        names = [d["name"] for d in self.inputs]
        if self.base_tensor:
            if slot not in self._feeds:
                self._feeds[slot] = [
                    self.runtime.BaseTensor(self.memory.address(slot, name),
                                            self.memory.view(slot, name).nbytes)
                    for name in names]
            return self._feeds[slot]
        tensors = [self.runtime.Tensor(self.memory.view(slot, name)) for name in names]
        for tensor in tensors:
            tensor.to_device(self.device_id)
        return tensors

    def _new_times(self) -> list[float]:
        """This run's execute time(s) from the runtime's own summary, then cleared. Where
        it cannot be cleared, the list grows by a run each run and is copied whole on every
        read: the times stop being read after UNCLEARED_TIMES_MAX runs."""
        if self._summary is None or self._times_seen >= UNCLEARED_TIMES_MAX:
            return []
        times = list(self._summary().exec_time_list)
        new = exec_times_ms(times[self._times_seen:])
        if self._reset is not None:
            self._reset()
        else:
            self._times_seen = len(times)
        return new

    def close(self) -> None:
        """Free the device resources: free_resource (2023-08+), else finalize."""
        if hasattr(self.session, "free_resource"):
            self.session.free_resource()
        elif hasattr(self.session, "finalize"):
            self.session.finalize()


def serve(channel: Channel, memory_fd: int) -> int:
    """The child's life: start, answer runs in order, close; the exit status."""
    try:
        start = channel.recv()
    except EOFError:
        return 0
    # the parent's import path, so that `import aclruntime` finds what the executor would
    parent_path = [str(p) for p in start.get("sys_path", [])]
    sys.path[:] = parent_path + [p for p in sys.path if p not in parent_path]
    memory = SlotMemory(memory_fd, [Region(s, n, o, tuple(shape), d)
                                    for s, n, o, shape, d in start["regions"]])
    try:
        session = Session(start, memory)
    except ImportError as exc:
        channel.send({"op": "error", "kind": "unavailable", "error": str(exc)})
        return 1
    except Exception as exc:  # noqa: BLE001  (the parent raises it, with the kind)
        kind = "value" if isinstance(exc, (ValueError, TypeError)) else "runtime"
        channel.send({"op": "error", "kind": kind, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    channel.send(session.ready())
    while True:
        try:
            message = channel.recv()
        except EOFError:                      # the executor is gone
            session.close()
            return 0
        if message.get("op") == "run":
            channel.send(session.run(int(message["slot"])))
        elif message.get("op") == "close":
            try:
                session.close()
            finally:
                channel.send({"op": "closed"})
            return 0


def main(argv: Sequence[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the executor decides when this ends
    sock_fd, memory_fd = (int(a) for a in argv)
    channel = Channel(socket.socket(fileno=sock_fd))
    try:
        return serve(channel, memory_fd)
    except (BrokenPipeError, ConnectionResetError):
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
