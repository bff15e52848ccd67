"""Print a Floorline gateway's predictions, each window once.

    pip install 'paho-mqtt>=2,<3'
    python subscriber.py --host localhost --port 1883 --gateway line1-gw01
    python subscriber.py --gateway +  --count 10        # any gateway; stop after 10 predictions

One line per prediction on stdout:

    line1-gw01 vibration pump-02 seq=141 imbalance score=0.970 (pdm-classifier 1.0.0)

Predictions are published at least once (QoS 1 through the gateway's outbox), so the same
window can arrive twice, e.g. after a reconnect. A window is identified by (asset, seq) within
one gateway's pipeline; the key below adds the window's start and end times, so that a counter
that started over after a gateway restart (``ack: receipt`` keeps no window state across one)
is not mistaken for a repeat. The memory of keys seen is bounded and lives only as long as this
process. See docs/consuming.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

TOPIC = "floorline/{gateway}/pred/#"  # the default topics.predictions, any pipeline and asset
SEEN_MAX = 100_000  # keys remembered; the oldest are forgotten first


class Deduplicator:
    """Remembers the most recent SEEN_MAX window keys."""

    def __init__(self, size: int = SEEN_MAX) -> None:
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._size = size

    def first_time(self, key: tuple[Any, ...]) -> bool:
        """True the first time KEY is offered, False for a repeat."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


def window_key(prediction: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies the window a prediction is about."""
    window = prediction.get("window") or {}
    return (
        prediction.get("gateway"),
        prediction.get("pipeline"),
        prediction["asset"],
        prediction["seq"],
        window.get("start"),
        window.get("end"),
    )


def describe(prediction: dict[str, Any]) -> str:
    """One line for a prediction, whatever the model's task."""
    if "label" in prediction:  # classification
        outcome = f"{prediction['label']} score={prediction['score']:.3f}"
        if prediction.get("alerts"):
            outcome += " alerts=" + ",".join(prediction["alerts"])
    elif "anomaly" in prediction:  # anomaly detection
        a = prediction["anomaly"]
        flag = " ANOMALOUS" if a["anomalous"] else ""
        outcome = f"anomaly score={a['score']:.4g} threshold={a['threshold']:.4g}{flag}"
    else:  # regression
        outcome = f"value={prediction.get('value')}"
    model = prediction.get("model") or {}
    return (
        f"{prediction.get('gateway')} {prediction.get('pipeline')} {prediction['asset']} "
        f"seq={prediction['seq']} {outcome} ({model.get('name')} {model.get('version')})"
    )


def main(argv: list[str] | None = None) -> int:
    """Subscribe, print predictions, exit after --count of them (or on Ctrl-C)."""
    parser = argparse.ArgumentParser(description="Print Floorline predictions, each once.")
    parser.add_argument("--host", default="localhost", help="broker host (localhost)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (1883)")
    parser.add_argument("--gateway", default="+", help="gateway id, or + for all (default)")
    parser.add_argument("--count", type=int, help="exit after this many predictions")
    parser.add_argument(
        "--client-id",
        help="a fixed client id makes the session persistent: the broker keeps QoS 1 "
        "predictions for this subscriber while it is away",
    )
    args = parser.parse_args(argv)

    topic = TOPIC.format(gateway=args.gateway)
    dedup = Deduplicator()
    printed = 0
    failed: list[str] = []

    def on_connect(
        client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object
    ) -> None:
        del userdata, flags, props
        if reason.is_failure:
            failed.append(f"broker refused the connection: {reason}")
            client.disconnect()
            return
        # Subscribing here re-subscribes after every reconnect, too.
        client.subscribe(topic, qos=1)

    def on_subscribe(
        client: mqtt.Client, userdata: object, mid: int, reasons: list[Any], props: object
    ) -> None:
        del userdata, mid, props
        if any(r.is_failure for r in reasons):
            failed.append(f"broker refused the subscription to {topic}: {reasons}")
            client.disconnect()
            return
        print(f"subscribed to {topic}", file=sys.stderr, flush=True)

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        nonlocal printed
        del userdata
        try:
            prediction = json.loads(message.payload)
            key = window_key(prediction)
        except (ValueError, KeyError, TypeError):
            print(f"skipped a message on {message.topic}: not a prediction", file=sys.stderr)
            return
        if not dedup.first_time(key):
            return
        print(describe(prediction), flush=True)
        printed += 1
        if args.count is not None and printed >= args.count:
            client.disconnect()

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=args.client_id or "",
        clean_session=args.client_id is None,
    )
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as exc:
        print(f"cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    try:
        client.loop_forever()
    except KeyboardInterrupt:
        client.disconnect()
    for problem in failed:
        print(problem, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
