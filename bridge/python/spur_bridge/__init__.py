"""spur's environment bridge: K Gymnasium (or NetHack, MiniHack) environments behind
the `spur.v1.EnvService` gRPC service, reset and stepped one batch per call.

Run `python -m spur_bridge --env-id CartPole-v1 --num-envs 16`; spur actors start it
themselves when `env.kind = "gym"` and `env.remote` is empty.
"""

from .envs import Batch, BridgeError, make_batch

__all__ = ["Batch", "BridgeError", "make_batch"]
