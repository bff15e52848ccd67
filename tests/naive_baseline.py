"""The naive way: the script a first reader of the basic TensorFlow/Keras tutorial would write.

    .venv/bin/python -m tests.naive_baseline --port 1883 [--host 127.0.0.1]
        [--model .work/pdm/pdm.keras] [--card .work/pdm/card.yaml]

A paho ``on_message`` callback parses each message with ``json.loads``, appends the sample to a
list per asset and, every 32 samples once 64 are held, normalizes the window and calls
``model.predict(window[None])`` on the Keras model from ``keras.models.load_model``, then
publishes the result on ``naive/pred/<asset>``. One window per call, on paho's network thread,
no batching across assets: the straightforward way, and the baseline ``tests/benchmark.py``
measures Floorline against on the same per-sample stream.

It does what the tutorial does and nothing the benchmark would make easier: it keeps no sequence
numbers, checks nothing and drops nothing. It prints ``ready predict_ms=<ms>`` once subscribed
(the time of one ``model.predict`` after the first, tracing, call) so the benchmark can bracket
its search; the prediction names the sequence number of the window's last sample so latency can
be matched to the publisher's send times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 64
HOP = 32


def main(argv: list[str] | None = None) -> int:
    """Load the model, subscribe, predict on every window until killed."""
    parser = argparse.ArgumentParser(prog="python -m tests.naive_baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--subscribe", default="plant/+/+/vibration")
    parser.add_argument("--model", type=Path, default=ROOT / ".work" / "pdm" / "pdm.keras")
    parser.add_argument("--card", type=Path, default=ROOT / ".work" / "pdm" / "card.yaml")
    args = parser.parse_args(argv)

    import keras  # noqa: PLC0415 - seconds to import; --help should not wait for it

    model = keras.models.load_model(args.model)
    card = yaml.safe_load(args.card.read_text())
    mean = np.array(card["normalization"]["mean"], dtype=np.float32)
    std = np.array(card["normalization"]["std"], dtype=np.float32)
    labels: list[str] = card["labels"]

    # The first predict traces the model; after it, time one call as the steady cost.
    probe = np.zeros((1, WINDOW, 3), dtype=np.float32)
    model.predict(probe, verbose=0)
    start = time.perf_counter()
    for _ in range(5):
        model.predict(probe, verbose=0)
    predict_ms = (time.perf_counter() - start) / 5 * 1e3

    buffers: dict[str, list[list[float]]] = {}
    counts: dict[str, int] = {}

    def on_message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        del userdata
        sample = json.loads(msg.payload)
        asset = msg.topic.split("/")[-2]
        buffer = buffers.setdefault(asset, [])
        buffer.append([sample["accel_x"], sample["accel_y"], sample["accel_z"]])
        counts[asset] = counts.get(asset, 0) + 1
        if len(buffer) >= WINDOW and (counts[asset] - WINDOW) % HOP == 0:
            window = (np.array(buffer[-WINDOW:], dtype=np.float32) - mean) / std
            scores = model.predict(window[None], verbose=0)[0]
            del buffer[:-WINDOW]
            best = int(np.argmax(scores))
            result = {"asset": asset, "seq": sample["seq"], "ts": sample["ts"],
                      "label": labels[best], "score": float(scores[best])}
            client.publish(f"naive/pred/{asset}", json.dumps(result))

    def on_connect(client: mqtt.Client, *_: Any) -> None:
        client.subscribe(args.subscribe)

    def on_subscribe(*_: Any) -> None:
        print(f"ready predict_ms={predict_ms:.2f}", flush=True)

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(args.host, args.port)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
