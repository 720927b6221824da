"""`python -m spur_bridge --env-id ID --num-envs K [--listen HOST:PORT | --listen unix:PATH]`

Prints `SPUR_BRIDGE_LISTENING <port>` (gRPC; a parent that asked for port 0 learns
the port) or `SPUR_BRIDGE_LISTENING unix:PATH` (the unix wire) on stdout once it
serves, then serves until SIGTERM or SIGINT. Failures to
start (an unknown env id, say) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def _exit_with_parent() -> None:
    """Linux: ask for SIGTERM when the parent dies, so a killed actor leaves no bridge."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spur_bridge", description=__doc__.splitlines()[0])
    p.add_argument("--env-id", required=True, help="a Gymnasium id, e.g. CartPole-v1, NetHackScore-v0")
    p.add_argument("--num-envs", type=int, default=16, help="environments stepped per call")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port for gRPC (port 0: any free port), or unix:PATH for the unix wire")
    p.add_argument("--crop", type=int, default=9, help="NetHack: side of the glyph crop around the hero")
    p.add_argument("--max-episode-steps", type=int, default=0, help="step limit (0: the env's own)")
    p.add_argument(
        "--remove-socket-dir",
        action="store_true",
        help="unix wire: remove the socket's directory as well when stopping (one made for this bridge)",
    )
    p.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process (Linux: the thread that started this) dies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="spur_bridge %(levelname)s %(message)s")
    # NLE announces its save-dir choice ("Not saving any NLE data.") at INFO once per
    # env; the bridge's stderr becomes the caller's log, so keep only its warnings.
    logging.getLogger("nle").setLevel(logging.WARNING)
    # Before anything is served: a stop that comes at any moment from here on (the
    # parent-death signal included) ends in the clean-up below.
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if args.exit_with_parent:
        _exit_with_parent()

    from .envs import BridgeError, make_batch
    from .server import serve

    try:
        batch = make_batch(args.env_id, args.num_envs, args.crop, args.max_episode_steps)
        server, where = serve(batch, args.listen, args.remove_socket_dir)
    except BridgeError as e:
        print(f"spur_bridge: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"SPUR_BRIDGE_LISTENING {where}", flush=True)
    logging.info(
        "serving %s x%d on %s (obs %d floats, %d actions)",
        args.env_id, batch.num_envs, where if isinstance(where, str) else f"port {where}",
        batch.obs_dim, batch.num_actions,
    )
    done.wait()
    server.stop(grace=1).wait()
    os._exit(0)  # NetHack's C library does not always let the interpreter exit cleanly


if __name__ == "__main__":
    sys.exit(main())
