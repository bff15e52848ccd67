"""Data capture (floorline.edge.capture): policies, bounds, labels over MQTT, export, full disk."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from floorline.converter.data import load_inputs
from floorline.edge.bundle.manifest import Manifest
from floorline.edge.capture import store as capture_store
from floorline.edge.capture.config import CaptureConfig
from floorline.edge.capture.export import ExportError, export
from floorline.edge.capture.policy import Capture
from floorline.edge.capture.service import CaptureService, LabelError, parse_label
from floorline.edge.capture.store import Record
from floorline.edge.cli.main import main as cli_main
from floorline.edge.config.model import parse_config
from floorline.edge.errors import ConfigError
from floorline.edge.stream.window import Window
from tests.daemon_harness import (
    EXAMPLE,
    asset_samples,
    block_payload,
    config_text,
    running,
)
from tests.mqtt_broker import wait_until

MANIFEST = Manifest.model_validate_json((EXAMPLE / "manifest.json").read_bytes())
HEALTHY = np.array([0.97, 0.01, 0.01, 0.01], dtype=np.float32)
FAULT = np.array([0.02, 0.01, 0.96, 0.01], dtype=np.float32)  # bearing_outer_race
UNSURE = np.array([0.40, 0.30, 0.20, 0.10], dtype=np.float32)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[CaptureService]:
    svc = CaptureService(tmp_path, "gw-cap")
    yield svc
    svc.close()


def policy(svc: CaptureService, name: str = "vib", **kw: object) -> Capture:
    cap = svc.policy(CaptureConfig.model_validate(kw), pipeline=name, manifest=MANIFEST,
                     sha256="ab" * 32, thresholds={"bearing_outer_race": 0.9})
    assert cap is not None
    cap.activate()  # what Pipeline.start does
    return cap


def windows(asset: str, first: int, n: int, t0: float = 1000.0) -> list[Window]:
    rng = np.random.default_rng(first)
    return [Window(asset, rng.normal(size=(64, 3)).astype(np.float32), t0 + (first + i),
                   t0 + (first + i) + 0.063, 0.0, first + i) for i in range(n)]


def rows(svc: CaptureService) -> dict[int, str]:
    """Stored seq -> reasons, after the writer caught up."""
    assert svc.store is not None
    assert svc.store.flush()
    import sqlite3  # noqa: PLC0415

    conn = sqlite3.connect(svc.path)
    try:
        return dict(conn.execute("SELECT seq, reasons FROM windows ORDER BY seq").fetchall())
    finally:
        conn.close()


def rows_by_asset(svc: CaptureService) -> dict[tuple[str, int], str]:
    """Stored (asset, seq) -> reasons, after the writer caught up."""
    assert svc.store is not None
    assert svc.store.flush()
    import sqlite3  # noqa: PLC0415

    conn = sqlite3.connect(svc.path)
    try:
        return {(a, q): r for a, q, r in conn.execute("SELECT asset, seq, reasons FROM windows")}
    finally:
        conn.close()


def offer(cap: Capture, batch: list[Window], *outs: np.ndarray) -> None:
    out = np.stack([outs[i] if i < len(outs) else HEALTHY for i in range(len(batch))])
    cap.offer(batch, out)


# -- policies ---------------------------------------------------------------------------------


def test_sampling_rate_records_that_share_of_windows(service):
    cap = policy(service, sample_rate=0.25, before=0, after=0)
    for k in range(10):
        offer(cap, windows("a", 10 * k, 10))
    stored = rows(service)
    assert len(stored) == 25
    assert set(stored.values()) == {"sample"}
    assert sorted(stored) == [4 * i + 3 for i in range(25)]


def test_alert_keeps_n_windows_before_and_after_on_the_same_asset(service):
    cap = policy(service, before=3, after=2)
    offer(cap, windows("a", 0, 10))
    offer(cap, windows("b", 0, 10))  # another asset: its windows are not "before" a's alert
    batch = windows("a", 10, 6)
    offer(cap, batch, HEALTHY, FAULT)  # a's window 11 alerts
    stored = rows(service)
    assert stored == {8: "before_alert", 9: "before_alert", 10: "before_alert", 11: "alert",
                      12: "after_alert", 13: "after_alert"}
    assert service.stats()["pipelines"]["vib"]["windows"] == 6


def test_low_confidence_windows_are_recorded(service):
    cap = policy(service, before=0, after=0, low_confidence=0.5, alerts=False)
    offer(cap, windows("a", 0, 4), HEALTHY, UNSURE, FAULT, UNSURE)
    assert rows(service) == {1: "low_confidence", 3: "low_confidence"}


def test_a_mark_keeps_the_windows_around_it(service):
    cap = policy(service, before=2, after=1)
    offer(cap, windows("a", 0, 5))
    cap.mark("drift", "a")  # F2's drift detector calls this
    offer(cap, windows("a", 5, 3))
    assert rows(service) == {3: "before_drift", 4: "before_drift", 5: "drift", 6: "after_drift"}


def test_a_mark_lapses_for_an_asset_that_stays_silent(service):
    cap = policy(service, before=2, after=2, alerts=False)
    offer(cap, windows("dying", 0, 5))
    cap.expire_s = 0.0  # the mark lapses at once (the pipeline sets drift's window_s)
    cap.mark("drift", "dying")  # its sensor drifts, then goes silent
    offer(cap, windows("other", 5, 3))
    offer(cap, windows("dying", 5000, 3, t0=1e6))  # back much later: not "drift" data
    assert rows_by_asset(service) == {}


def test_an_after_countdown_lapses_for_an_asset_that_stays_silent(service):
    cap = policy(service, before=1, after=3)
    offer(cap, windows("old", 0, 2))
    cap.mark("drift")  # pipeline-wide: "old" is not in the batch, its next windows would be after
    cap.expire_s = 0.0  # the countdowns started by the next batch lapse at once
    offer(cap, windows("live", 10, 2))
    offer(cap, windows("old", 1000, 2, t0=1e6))
    assert rows_by_asset(service) == {("old", 1): "before_drift", ("live", 10): "drift"}


def test_pending_marks_are_bounded_oldest_out(service):
    cap = policy(service, before=0, after=0, alerts=False)
    for k in range(4097):  # one over the bound
        cap.mark("drift", f"asset-{k}")
    offer(cap, windows("asset-0", 0, 1) + windows("asset-4096", 0, 1))
    assert rows_by_asset(service) == {("asset-4096", 0): "drift"}


def test_an_asset_named_star_is_just_an_asset(service):
    cap = policy(service, before=0, after=0, alerts=False)
    cap.mark("drift", "*")
    offer(cap, windows("a", 0, 1) + windows("*", 0, 1))
    assert rows_by_asset(service) == {("*", 0): "drift"}


def test_a_pipeline_wide_mark_keeps_every_assets_windows_around_it(service):
    cap = policy(service, before=1, after=1)
    offer(cap, windows("a", 0, 3))
    offer(cap, windows("b", 0, 3))
    cap.mark("drift")  # the whole pipeline drifts
    offer(cap, windows("c", 0, 3))  # c had nothing held: its first window here is the marked one
    offer(cap, windows("a", 3, 2) + windows("b", 3, 2))
    assert rows_by_asset(service) == {
        ("a", 2): "before_drift", ("a", 3): "after_drift",
        ("b", 2): "before_drift", ("b", 3): "after_drift",
        ("c", 0): "drift", ("c", 1): "after_drift",
    }
    reasons = service.stats()["pipelines"]["vib"]["reasons"]
    assert reasons == {"before_drift": 2, "drift": 1, "after_drift": 3}


def test_nothing_is_recorded_without_a_reason(service):
    cap = policy(service, before=0, after=0)
    offer(cap, windows("a", 0, 20))
    assert rows(service) == {}


# -- bounds -----------------------------------------------------------------------------------


def test_byte_bound_drops_the_oldest(service):
    cap = policy(service, sample_rate=1.0, before=0, after=0, max_bytes=64 * 1024)
    for k in range(20):
        offer(cap, windows("a", 10 * k, 10))
    stored = rows(service)
    facts = service.stats()["pipelines"]["vib"]
    assert facts["bytes"] <= 64 * 1024
    assert 50 < len(stored) < 200  # about 900 bytes a window
    assert sorted(stored) == list(range(200 - len(stored), 200))  # the newest stayed
    assert facts["evicted_max_bytes"] == 200 - len(stored)
    # The file: SQLite's page cap (max_bytes and a quarter, plus 64 pages) holds it there.
    assert service.path.stat().st_size <= 64 * 1024 * 5 // 4 + 64 * 4096


def test_byte_bound_drops_rolling_keep_windows_before_kept_ones(service):
    cap = policy(service, keep_recent_s=3600, before=0, after=0, max_bytes=64 * 1024)
    offer(cap, windows("a", 0, 5), FAULT, FAULT, FAULT, FAULT, FAULT)  # kept: alerts
    for k in range(20):
        offer(cap, windows("a", 5 + 10 * k, 10))  # rolling keep only
    stored = rows(service)
    assert all(stored[s] == "alert" for s in range(5))  # older, but kept for a reason
    assert 5 not in stored  # the oldest rolling-keep windows went instead
    assert max(stored) == 204
    assert service.stats()["pipelines"]["vib"]["bytes"] <= 64 * 1024


def test_age_bound_and_rolling_keep(service, monkeypatch):
    monkeypatch.setattr(capture_store, "_AGE_EVERY_S", 0.0)  # age at every write, not each 1 s
    cap = policy(service, keep_recent_s=60, before=0, after=0, max_age_s=3600)
    assert service.store is not None
    now = time.time()
    values = np.zeros((64, 3), np.float32)

    def put(seq: int, age: float, keep: bool) -> None:
        service.store.put(Record("vib", "a", seq, None, None, now - age, values,
                                 "alert" if keep else "recent", {}, keep=keep,
                                 model={"name": "m", "version": "1", "sha256": "ab"}))

    put(0, 7200, True)  # older than max_age_s: out
    put(1, 120, False)  # rolling keep, older than keep_recent_s: out
    put(2, 120, True)  # kept for a reason: stays
    put(3, 10, False)  # recent: stays
    del cap  # registered the bounds; the writer prunes after each write
    assert rows(service) == {2: "alert", 3: "recent"}
    facts = service.stats()["pipelines"]["vib"]
    assert (facts["evicted_max_age"], facts["evicted_keep_recent"]) == (1, 1)


def test_a_full_queue_drops_counted_and_never_blocks(tmp_path):
    svc = CaptureService(tmp_path, "gw", queue_windows=4)
    cap = policy(svc, sample_rate=1.0, before=0, after=0)
    assert svc.store is not None
    gate = threading.Event()
    real = svc.store._insert

    def stuck(conn, records):  # the writer hangs on its first batch (a dead-slow disk)
        gate.wait(30)
        real(conn, records)

    svc.store._insert = stuck  # type: ignore[method-assign]
    done = threading.Event()

    def produce() -> None:
        for k in range(50):
            offer(cap, windows("a", 10 * k, 10))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert done.wait(10), "offer blocked on a stuck writer"
    for _ in range(1100):  # a label flood is bounded too
        svc.on_label("t", b'{"asset": "a", "from": 1, "to": 2, "label": "x"}')
    assert svc.labels == {"accepted": 1000, "refused": 100}
    gate.set()
    stats = svc.stats()
    assert stats is not None
    dropped = stats["pipelines"]["vib"]["dropped_queue_full"]
    # The stuck writer took one drain (up to 4), the queue holds 4 more: the rest dropped.
    assert 500 - 8 <= dropped <= 500 - 4
    svc.close()


# -- labels -----------------------------------------------------------------------------------


def test_windows_labelled_after_they_were_stored_count_under_label_once(service):
    cap = policy(service, keep_recent_s=3600, before=0, after=0, alerts=False)
    offer(cap, windows("a", 0, 10))  # stored as "recent"; windows end at 1000.063 + seq
    offer(cap, windows("b", 0, 10))
    rows(service)
    service.on_label("t", b'{"asset": "a", "from": 1000, "to": 1005, "label": "imbalance"}')
    service.on_label("t", b'{"asset": "a", "from": 1000, "to": 1007, "label": "imbalance"}')
    rows(service)
    reasons = service.stats()["pipelines"]["vib"]["reasons"]
    assert reasons == {"recent": 20, "label": 7}  # seq 0-6; 0-4 labelled twice, counted once


def test_label_commands_are_checked():
    now = 5000.0
    lab = parse_label(b'{"asset": "pump-07", "last_s": 3600, "label": "bearing_outer_race"}', now)
    assert (lab.asset, lab.t0, lab.t1, lab.label) == ("pump-07", 1400.0, 5000.0,
                                                      "bearing_outer_race")
    iso = parse_label(b'{"asset": "p", "from": "2026-11-30T00:00:00Z", '
                      b'"to": "2026-11-30T01:00:00+00:00", "label": "x"}', now)
    assert iso.t1 - iso.t0 == 3600
    for bad, says in [
        (b"nope", "not JSON"),
        (b'{"asset": "p", "label": "x"}', "from and to"),
        (b'{"asset": "p", "from": 2, "to": 1, "label": "x"}', "after"),
        (b'{"asset": "p", "from": 1, "to": 2, "label": "a b"}', "label:"),
        (b'{"asset": "p", "from": 1, "to": 2, "label": "x", "colour": 1}', "unknown keys"),
    ]:
        with pytest.raises(LabelError, match=says):
            parse_label(bad, now)


def test_label_applies_to_stored_windows_in_range_and_to_later_ones(service):
    cap = policy(service, keep_recent_s=3600, before=0, after=0)
    offer(cap, windows("a", 0, 20))
    offer(cap, windows("b", 0, 20))
    service.on_label("t", b'{"asset": "a", "from": 1005, "to": 1010.5, "label": "looseness"}')
    offer(cap, windows("a", 20, 5, t0=990.0))  # ends 1010.063..1014.063: only seq 20 in range
    rows(service)
    out = export(service.path.parent, service.path.parent / "labelled.npz", labelled=True)
    assert out["windows"] == 7
    data = np.load(service.path.parent / "labelled.npz")
    # Window i ends at 1000 + i + 0.063: 5..10 are in range; 20 came after the label.
    assert sorted(data["seq"].tolist()) == [5, 6, 7, 8, 9, 10, 20]
    assert set(data["asset"].tolist()) == {"a"}
    assert set(data["y"].tolist()) == {"looseness"}


def test_label_command_over_mqtt_labels_the_right_windows(mosquitto, mqtt_client, unique_topic):
    text = config_text(mosquitto, _capturing(unique_topic, "{keep_recent_s: 3600, before: 0}"),
                       gateway="gw-cap")
    probe = mqtt_client(mosquitto)
    samples = asset_samples(64 * 40, seed=5)
    with running(text) as daemon:
        for k in range(40):  # window k covers ts 1000 + 0.064 k .. + 0.063
            daemon._on_message(f"{unique_topic}/pump-07/vibration",
                               block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 1000.0), 0.0)
        wait_until(lambda: daemon.pipelines[0].counters["predictions"] == 40, 30, "predicted")
        label = {"asset": "pump-07", "from": 1000.0 + 0.064 * 10, "to": 1000.0 + 0.064 * 20,
                 "label": "bearing_outer_race"}
        probe.publish("floorline/gw-cap/capture/label", orjson.dumps(label), qos=1)
        wait_until(lambda: daemon.capture.labels["accepted"] == 1, 10, "label received")
        assert daemon.capture.store is not None
        assert daemon.capture.store.flush()
        stats = daemon.stats()["capture"]
        state_dir = daemon.state_dir
    assert stats["pipelines"]["vibration"]["windows"] == 40
    out = tmp = state_dir / "export.npz"
    assert cli_main(["capture", "export", "--state-dir", str(state_dir), "--out", str(tmp),
                     "--label", "bearing_outer_race"]) == 0
    data = np.load(out)
    # Window k ends at 1000 + 0.064 k + 0.063: in [from, to] for k = 10..19.
    assert data["seq"].tolist() == list(range(10, 20))
    assert set(data["gateway"].tolist()) == {"gw-cap"}
    assert set(data["model_name"].tolist()) == {"pdm-classifier"}


def test_label_for_a_gateway_without_capture_is_refused_with_a_reason(tmp_path, caplog):
    svc = CaptureService(tmp_path, "gw")
    svc.on_label("t", b'{"asset": "a", "from": 1, "to": 2, "label": "x"}')
    assert svc.labels["refused"] == 1
    assert "no pipeline has a capture block" in caplog.text


# -- export -----------------------------------------------------------------------------------


def test_export_is_what_floorline_convert_reads(service, tmp_path):
    cap = policy(service, sample_rate=1.0, before=0, after=0)
    batch = windows("a", 0, 12)
    offer(cap, batch, UNSURE)
    service.on_label("t", b'{"asset": "a", "from": 1000, "to": 1003.5, "label": "imbalance"}')
    rows(service)
    out = tmp_path / "data" / "captured.npz"
    doc = export(tmp_path, out)
    assert doc["labels"] == {"imbalance": 4, "": 8}  # windows 0..3 end before 1003.5
    # The converter's own loader (--calibration / --parity-data) takes it as is.
    inputs = load_inputs(out, MANIFEST.input)
    assert inputs.shape == (12, 64, 3)
    data = np.load(out)
    np.testing.assert_array_equal(data["x"][5], batch[5].values)  # raw units, bit for bit
    assert data["y"].tolist()[:5] == ["imbalance"] * 4 + [""]
    assert data["predicted"][0] == "healthy"
    assert data["score"][0] == pytest.approx(0.40)
    assert data["model_sha256"][0] == "ab" * 32
    side = orjson.loads(out.with_suffix(".json").read_bytes())
    assert side["windows"] == 12
    assert side["gateways"] == ["gw-cap"]


def test_export_errors_say_what_to_do(tmp_path, service):
    with pytest.raises(ExportError, match="no capture store"):
        export(tmp_path / "elsewhere", tmp_path / "x.npz")
    policy(service, sample_rate=1.0)
    with pytest.raises(ExportError, match=r"\.npz"):
        export(tmp_path, tmp_path / "x.csv")


# -- configuration and the daemon -------------------------------------------------------------


def _capturing(prefix: str, capture: str, workers: int = 1) -> str:
    return f"""
  - name: vibration
    subscribe: ["{prefix}/+/vibration"]
    bundle: "{EXAMPLE}"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
    batch: {{max_batch: 8, max_wait_ms: 5}}
    workers: {workers}
    capture: {capture}
"""


def test_capture_with_worker_processes_is_refused(mosquitto):
    text = config_text(mosquitto, _capturing("x", "{sample_rate: 0.1}", workers=2))
    with pytest.raises(ConfigError, match="capture: needs workers: 1"):
        parse_config(text)


def test_a_full_disk_never_breaks_prediction(mosquitto, unique_topic, tiny_disk):
    state = tiny_disk("1m")
    # The bound is far above the disk: the disk fills first.
    text = config_text(mosquitto, _capturing(unique_topic, "{sample_rate: 1.0}"),
                       state_dir=state)
    samples = asset_samples(64 * 1500, seed=9)
    with running(text) as daemon:
        for k in range(1500):
            daemon._on_message(f"{unique_topic}/pump-f/vibration",
                               block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 1.0), 0.0)
            if k % 50 == 49:  # at the pace the inbox takes: no shedding, every window counts
                wait_until(lambda n=k + 1: daemon.pipelines[0].counters["predictions"] == n,
                           30, "every window predicted")
        assert daemon.capture.store is not None
        assert daemon.capture.store.flush(30)
        facts = daemon.stats()["capture"]["pipelines"]["vibration"]
        assert daemon.pipelines[0].counters["internal_errors"] == 0
    dropped = sum(v for k, v in facts.items() if k.startswith("dropped_"))
    assert dropped > 0, facts
    assert facts.get("dropped_disk_full", 0) + facts.get("dropped_unavailable", 0) > 0, facts
    assert facts["captured"] > 0, facts  # it wrote until the disk was full
    print("full disk:", facts)


def test_capture_turned_on_by_a_reload_takes_labels_too(mosquitto, mqtt_client, unique_topic):
    state = Path(tempfile.mkdtemp(prefix="floorline-test-state-"))
    plain = _capturing(unique_topic, "null")
    probe = mqtt_client(mosquitto)
    with running(config_text(mosquitto, plain, gateway="gw-re", state_dir=state)) as daemon:
        assert daemon.stats()["capture"] is None
        text = config_text(mosquitto, _capturing(unique_topic, "{keep_recent_s: 60}"),
                           gateway="gw-re", state_dir=state)
        assert daemon.apply(parse_config(text)).ok
        label = b'{"asset": "pump-1", "last_s": 60, "label": "imbalance"}'

        def labelled() -> bool:
            # The new subscription's SUBACK may come after a first publish: repeat (idempotent).
            probe.publish("floorline/gw-re/capture/label", label, qos=1)
            return daemon.capture.labels["accepted"] >= 1

        wait_until(labelled, 10, "label received")


def test_windows_keep_the_model_that_predicted_them_across_a_reload(service, tmp_path):
    old = policy(service, sample_rate=1.0, before=0, after=0)
    new = service.policy(CaptureConfig(sample_rate=1.0, before=0, after=0), pipeline="vib",
                         manifest=MANIFEST, sha256="cd" * 32)
    assert new is not None
    new.activate()
    offer(old, windows("a", 0, 2))  # the old generation's last batch, after the new one built
    offer(new, windows("a", 2, 2))
    rows(service)
    export(tmp_path, tmp_path / "both.npz")
    data = np.load(tmp_path / "both.npz")
    assert data["model_sha256"].tolist() == ["ab" * 32] * 2 + ["cd" * 32] * 2


def _refused(state: Path, capture: str, extra: str, mosquitto) -> str:
    """A config that validates but is refused at build: its second pipeline has no bundle."""
    broken = _capturing("in", capture) + f"""
  - name: second
    subscribe: ["in2/+/vibration"]
    bundle: "{state}/no-such-bundle"
    decoder: {{type: json, samples: samples, timestamp: ts, sequence: seq}}
"""
    return config_text(mosquitto, broken, gateway="gw-r", state_dir=state, extra=extra)


def test_a_refused_push_keeps_the_running_capture_bounds_and_windows(mosquitto, monkeypatch):
    monkeypatch.setattr(capture_store, "_AGE_EVERY_S", 0.0)  # age bounds at every write
    state = Path(tempfile.mkdtemp(prefix="floorline-test-state-"))
    good = config_text(mosquitto, _capturing("in", "{sample_rate: 1.0}"), gateway="gw-r",
                       state_dir=state)
    # Built (its first pipeline with these bounds), then refused: the second cannot load.
    bad = _refused(state, "{sample_rate: 1.0, max_age_s: 0.001, max_bytes: 65536}", "",
                   mosquitto)
    samples = asset_samples(64 * 9, seed=5)

    def feed(k: int) -> None:
        daemon._on_message("in/pump-07/vibration",
                           block_payload(samples[64 * k: 64 * (k + 1)], 64 * k, 1000.0), 0.0)
        wait_until(lambda: daemon.pipelines[0].counters["predictions"] == k + 1, 30,
                   "predicted")

    with running(good) as daemon:
        for k in range(8):
            feed(k)
        assert daemon.capture.store is not None
        assert daemon.capture.store.flush()
        assert daemon.stats()["capture"]["pipelines"]["vibration"]["windows"] == 8
        assert not daemon.apply(parse_config(bad)).ok
        feed(8)  # a write: the writer prunes to the bounds in force
        assert daemon.capture.store.flush()
        facts = daemon.stats()["capture"]["pipelines"]["vibration"]
        assert facts["windows"] == 9, facts
        assert "evicted_max_age" not in facts
        # A configuration that runs puts its bounds in force, counters carried over.
        again = config_text(mosquitto, _capturing("in", "{sample_rate: 1.0, max_bytes: 70000}"),
                            gateway="gw-r", state_dir=state)
        assert daemon.apply(parse_config(again)).ok
        bounds = daemon.capture.store._bounds["vibration"]
        assert (bounds.max_bytes, bounds.stored, bounds.counters["captured"]) == (70000, 9, 9)


def test_a_refused_push_leaves_the_label_topic_alone(mosquitto):
    state = Path(tempfile.mkdtemp(prefix="floorline-test-state-"))
    good = config_text(mosquitto, _capturing("in", "{sample_rate: 0.1}"), gateway="gw-r",
                       state_dir=state)
    moved_label = 'topics: {capture_label: "site/{gateway}/labels"}\n'
    bad = _refused(state, "{sample_rate: 0.1}", moved_label, mosquitto)
    label = b'{"asset": "p", "last_s": 60, "label": "x"}'
    with running(good) as daemon:
        assert not daemon.apply(parse_config(bad)).ok
        assert daemon.capture.topic == "floorline/gw-r/capture/label"
        assert daemon._extra_subscriptions == ["floorline/gw-r/capture/label"]
        daemon._on_message("site/gw-r/labels", label, 0.0)  # not a route: unroutable
        daemon._on_message("floorline/gw-r/capture/label", label, 0.0)
        assert daemon.capture.labels == {"accepted": 1}
        # The same topic change in a configuration that runs takes effect.
        moved = config_text(mosquitto, _capturing("in", "{sample_rate: 0.1}"), gateway="gw-r",
                            state_dir=state, extra=moved_label)
        assert daemon.apply(parse_config(moved)).ok
        assert daemon.capture.topic == "site/gw-r/labels"
        assert "site/gw-r/labels" in daemon._subscriptions(daemon.router.generation)
