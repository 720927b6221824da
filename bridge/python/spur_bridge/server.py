"""The bridge's two wires over one `Batch`, one call at a time:

- gRPC (`spur.v1.EnvService`) on `host:port`: for env servers someone else runs (a
  Kubernetes sidecar, another machine);
- the unix wire on `unix:PATH`: the same request and reply messages, each in one
  frame on a Unix socket, for the bridges an actor starts beside itself. A frame is a
  little-endian u32 body length, one kind byte and the body. A request's kind names
  the method (`METHODS`); a reply's is 0 with the encoded reply as body, or a gRPC
  status code with the error message (UTF-8) as body. grpcio's server hands every call
  between threads and costs about a millisecond a call; the unix wire about a tenth
  of one.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from concurrent import futures

import grpc
import numpy as np

from ._proto import env_pb2, env_pb2_grpc
from .envs import Batch, BridgeError

log = logging.getLogger("spur_bridge")

# Large enough for thousands of NetHack observations per call.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Frame header of the unix wire: body length, kind.
HEADER = struct.Struct("<IB")
# Request kinds of the unix wire: the method and its request message.
METHODS = {
    1: ("spec", env_pb2.EnvSpecRequest),
    2: ("reset", env_pb2.ResetRequest),
    3: ("step", env_pb2.StepRequest),
    4: ("render", env_pb2.RenderRequest),
}


class Handlers:
    """The four methods over the batch, free of any wire: each takes a request message
    and returns the reply, or raises `BridgeError` (a bad request: its code) or any
    other exception (the env failed: INTERNAL)."""

    def __init__(self, batch: Batch):
        self.batch = batch
        # The envs are not thread-safe; calls are served one at a time.
        self.lock = threading.Lock()

    def spec(self, request):
        b = self.batch
        return env_pb2.EnvSpecReply(
            env_id=b.env_id,
            num_envs=b.num_envs,
            fields=[env_pb2.ObservationField(name=f.name, shape=f.shape) for f in b.fields],
            num_actions=b.num_actions,
            has_text=b.has_text,
            max_episode_steps=b.max_episode_steps,
        )

    def reset(self, request):
        with self.lock:
            obs = self.batch.reset(list(request.env_indices), list(request.seeds))
            return env_pb2.ResetReply(observations=np.ascontiguousarray(obs, "<f4").tobytes())

    def step(self, request):
        with self.lock:
            obs, rewards, term, trunc, texts, success = self.batch.step(list(request.actions))
            # Serialized under the lock: `obs` is the batch's own buffer.
            return env_pb2.StepReply(
                observations=np.ascontiguousarray(obs, "<f4").tobytes(),
                rewards=rewards,
                terminated=term,
                truncated=trunc,
                texts=texts,
                success=success,
            )

    def render(self, request):
        with self.lock:
            return env_pb2.RenderReply(text=self.batch.render(request.env_index))

    def failure(self, e: Exception) -> tuple[grpc.StatusCode, str]:
        """The status a failed call answers with; logs it."""
        if isinstance(e, BridgeError):
            log.warning("rejected request: %s", e)
            return getattr(grpc.StatusCode, e.code), str(e)
        log.exception("the environment raised")
        return grpc.StatusCode.INTERNAL, f"{self.batch.env_id} raised {type(e).__name__}: {e}"


class EnvService(env_pb2_grpc.EnvServiceServicer):
    """The gRPC wire."""

    def __init__(self, handlers: Handlers):
        self.handlers = handlers

    def _call(self, method, request, context):
        try:
            return method(request)
        except Exception as e:  # noqa: BLE001 (every failure becomes a status)
            context.abort(*self.handlers.failure(e))

    def Spec(self, request, context):
        return self._call(self.handlers.spec, request, context)

    def Reset(self, request, context):
        return self._call(self.handlers.reset, request, context)

    def Step(self, request, context):
        return self._call(self.handlers.step, request, context)

    def Render(self, request, context):
        return self._call(self.handlers.render, request, context)


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    """`n` bytes from `conn`, or None when the peer closed before sending them."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


class UnixServer:
    """The unix wire: a thread accepting connections on `path`, and a thread per
    connection reading one request frame after another and answering each."""

    def __init__(self, handlers: Handlers, path: str, remove_dir: bool = False):
        self.handlers = handlers
        self.path = path
        # The directory was made for this socket alone: remove it on the way out too
        # (an actor killed with SIGKILL cannot; its bridge gets SIGTERM and can).
        self.remove_dir = remove_dir
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Only this user may connect: the socket file is made without group or
        # other permissions.
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        except OSError as e:
            raise BridgeError("UNAVAILABLE", f"could not listen on unix:{path}: {e}") from e
        finally:
            os.umask(old)
        self.sock.listen(8)

    def start(self) -> None:
        threading.Thread(target=self._accept, name="spur-bridge-accept", daemon=True).start()

    def stop(self, grace=None) -> threading.Event:
        """Stops accepting and removes the socket file; returns a set event (as
        grpcio's `stop` returns one to wait on)."""
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.remove_dir:
            try:
                os.rmdir(os.path.dirname(self.path))
            except OSError as e:
                log.warning("could not remove the socket's directory: %s", e)
        stopped = threading.Event()
        stopped.set()
        return stopped

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    header = _read_exact(conn, HEADER.size)
                    if header is None:
                        return  # the caller hung up
                    length, kind = HEADER.unpack(header)
                    if length > MAX_MESSAGE_BYTES:
                        # The stream cannot be trusted past this: answer and hang up.
                        conn.sendall(
                            _error_frame(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"a request of {length} bytes is over the limit of "
                                f"{MAX_MESSAGE_BYTES}",
                            )
                        )
                        return
                    body = _read_exact(conn, length)
                    if body is None:
                        return
                    conn.sendall(self._answer(kind, body))
                except OSError as e:
                    log.info("unix wire connection ended: %s", e)
                    return

    def _answer(self, kind: int, body: bytes) -> bytes:
        method = METHODS.get(kind)
        if method is None:
            return _error_frame(grpc.StatusCode.UNIMPLEMENTED, f"unknown request kind {kind}")
        name, request_type = method
        try:
            request = request_type.FromString(body)
        except Exception as e:  # noqa: BLE001 (a garbled request is the caller's error)
            return _error_frame(
                grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode a {name} request: {e}"
            )
        try:
            reply = getattr(self.handlers, name)(request).SerializeToString()
        except Exception as e:  # noqa: BLE001 (every failure becomes a status)
            return _error_frame(*self.handlers.failure(e))
        return HEADER.pack(len(reply), 0) + reply


def _error_frame(code: grpc.StatusCode, message: str) -> bytes:
    body = message.encode()
    return HEADER.pack(len(body), code.value[0]) + body


def serve(batch: Batch, listen: str, remove_socket_dir: bool = False):
    """Serves `batch` on `listen`: `unix:PATH` for the unix wire (with
    `remove_socket_dir`, PATH's directory goes when the server stops), else
    `host:port` for gRPC (port 0 picks a free one). Returns the server (with `stop()`)
    and what to announce: the bound port for gRPC, `listen` itself for the unix wire."""
    handlers = Handlers(batch)
    if listen.startswith("unix:"):
        server = UnixServer(handlers, listen[len("unix:") :], remove_socket_dir)
        server.start()
        return server, listen
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    env_pb2_grpc.add_EnvServiceServicer_to_server(EnvService(handlers), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise BridgeError("UNAVAILABLE", f"could not listen on {listen}")
    server.start()
    return server, port
