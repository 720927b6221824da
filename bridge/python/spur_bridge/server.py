"""The gRPC side: `spur.v1.EnvService` over a `Batch`, one call at a time."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import numpy as np

from ._proto import env_pb2, env_pb2_grpc
from .envs import Batch, BridgeError

log = logging.getLogger("spur_bridge")

# Large enough for thousands of NetHack observations per call.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class EnvService(env_pb2_grpc.EnvServiceServicer):
    def __init__(self, batch: Batch):
        self.batch = batch
        # The envs are not thread-safe; calls are served one at a time.
        self.lock = threading.Lock()

    def _fail(self, context, e: Exception):
        if isinstance(e, BridgeError):
            code = getattr(grpc.StatusCode, e.code)
            log.warning("rejected request: %s", e)
        else:
            code = grpc.StatusCode.INTERNAL
            log.exception("the environment raised")
            e = f"{self.batch.env_id} raised {type(e).__name__}: {e}"
        context.abort(code, str(e))

    def Spec(self, request, context):
        b = self.batch
        return env_pb2.EnvSpecReply(
            env_id=b.env_id,
            num_envs=b.num_envs,
            fields=[env_pb2.ObservationField(name=f.name, shape=f.shape) for f in b.fields],
            num_actions=b.num_actions,
            has_text=b.has_text,
            max_episode_steps=b.max_episode_steps,
        )

    def _locked(self, context, work):
        """Runs `work` under the lock; any failure aborts the call with a status."""
        with self.lock:
            try:
                return work()
            except Exception as e:  # noqa: BLE001 (every failure becomes a status)
                self._fail(context, e)

    def Reset(self, request, context):
        obs = self._locked(
            context, lambda: self.batch.reset(list(request.env_indices), list(request.seeds))
        )
        return env_pb2.ResetReply(observations=np.ascontiguousarray(obs, "<f4").tobytes())

    def Step(self, request, context):
        def step():
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

        return self._locked(context, step)

    def Render(self, request, context):
        text = self._locked(context, lambda: self.batch.render(request.env_index))
        return env_pb2.RenderReply(text=text)


def serve(batch: Batch, listen: str) -> tuple[grpc.Server, int]:
    """Starts the server on `listen` (`host:port`, port 0 picks a free one); returns it
    with the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    env_pb2_grpc.add_EnvServiceServicer_to_server(EnvService(batch), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise BridgeError("UNAVAILABLE", f"could not listen on {listen}")
    server.start()
    return server, port
