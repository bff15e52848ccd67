"""A small MQTT 3.1.1 broker (amqtt) for the demo on machines without one.

Run as ``python -m floorline.edge.demo.embedded_broker --port N``; the demo starts it in its own
process so the
broker's Python work does not share a GIL with the daemon it feeds. Not for production: use
mosquitto or another real broker there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys


async def _serve(host: str, port: int) -> None:
    try:
        from amqtt.broker import Broker  # noqa: PLC0415 - optional, demo extra only
    except ImportError:
        print(
            "floorline.edge.demo.embedded_broker: needs amqtt: pip install 'floorline[demo]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 64}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"embedded broker listening on {host}:{port}", flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):  # shutting down: nothing useful to do with an error
        await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m floorline.edge.demo.embedded_broker")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
