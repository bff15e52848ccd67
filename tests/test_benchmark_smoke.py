"""The benchmark runs end to end: every section, sane numbers. Never a timed assertion.

``python -m tests.benchmark --tiny --no-train`` measures every section once with a handful of
messages (its own mosquitto on a free port, the daemon, the naive script), so this checks the
plumbing, not the figures: the machine running the suite may be anything. It runs wherever the
suite runs: only the naive way needs the trained Keras model (``.work/pdm/pdm.keras``), and
without it the benchmark skips that part alone and says so; ``test_tiny_benchmark_naive_way``
is then reported skipped with the reason.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from tests.benchmark import (
    BLOCK_KINDS,
    KERAS_MODEL,
    NAIVE_SKIPPED,
    OVERLOAD_PROTOCOL,
    PROTOCOLS,
    QOS1_PROTOCOLS,
    ROOT,
    TINY,
)

pytestmark = pytest.mark.slow

SECTIONS = ("machine", "budget", "ceilings", "daemon_sample", "daemon_block", "two_instances",
            "workers", "naive", "targets")
NAIVE_GOAL = "per-sample sustained >= 20 x the naive way (MQTT 3.1.1)"


@dataclass(frozen=True)
class Run:
    stdout: str
    stderr: str
    results: dict[str, Any]

    def tail(self) -> str:
        return self.stdout[-3000:] + self.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One tiny benchmark run, shared by the tests below (it takes ~30-40 s on two cores)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmark", "--tiny", "--no-train", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Run(done.stdout, done.stderr, json.loads(out.read_text()))


def _numbers(node: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON document, with where it is."""
    if isinstance(node, bool):
        return []
    if isinstance(node, int | float):
        return [(path, float(node))]
    if isinstance(node, dict):
        return [n for k, v in node.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [n for i, v in enumerate(node) for n in _numbers(v, f"{path}[{i}]")]
    return []


def test_tiny_benchmark_writes_every_section_with_sane_numbers(tiny: Run) -> None:
    results = tiny.results
    # No worker, daemon or client died on the way (their tracebacks land in the output).
    assert "Traceback" not in tiny.stdout + tiny.stderr, tiny.tail()
    assert "against stock paho" in tiny.stdout, tiny.tail()

    for section in SECTIONS:
        assert section in results, f"no {section} section"
    ceilings = results["ceilings"]
    for protocol in PROTOCOLS:
        # Stock paho and floorline's own reader (the per-sample goal's ceiling), each fed by the
        # closed-loop generator, which was ahead of them (idle some of the time).
        for bare in ("bare", "bare_floorline"):
            assert ceilings[bare][protocol]["rate"] > 0, bare
            assert 0 <= ceilings[bare][protocol]["generator_idle"] <= 1, bare
        c_client = ceilings["bare_c"][protocol]
        assert c_client.get("rate", 0) > 0 or "mosquitto_sub" in c_client["skipped"], c_client
        sample = results["daemon_sample"][protocol]
        assert sample["search"]["steps"], "the per-sample search made no step"
        # Searched up to the faster of the two bare subscribers, reported against all three.
        bound = max(ceilings[b][protocol]["rate"] for b in ("bare", "bare_floorline"))
        assert sample["search"]["bracket"][1] == round(bound, 1)
        for key in ("ratio", "ratio_floorline", "ratio_paho"):
            assert isinstance(sample[key], float), key
        assert sample["startup"]["seconds"] > 0
        assert sample["rss_mb"]["after_warm_up"] > 0
        for when in ("after_warm_up", "after_load"):
            memory = sample["memory_mb"][when]
            assert 0 < memory["pss"] <= memory["rss"], memory
            assert memory["processes"] >= 1, memory
        # The daemon predicted windows: at the light warm-up rate, and in its search.
        warm = sample["warm_up"]
        assert 0 < warm["predictions"] <= warm["expected"], warm
        assert warm["duplicates"] == 0, warm
        assert sum(s["predictions"] for s in sample["search"]["steps"]) > 0
        assert (sample["overload"] is not None) == (protocol == OVERLOAD_PROTOCOL)
    for protocol in QOS1_PROTOCOLS:
        for kind in BLOCK_KINDS:
            for echo in ("echo", "echo_floorline", "echo_qos1", "echo_qos1_floorline"):
                found = ceilings[echo][protocol][kind]
                assert found["rate"] > 0, (echo, kind)
                assert found["echo_received"] > 0, (echo, kind)
                assert found["qos"] == (1 if "qos1" in echo else 0)

    overload = results["daemon_sample"][OVERLOAD_PROTOCOL]["overload"]
    assert [p["factor"] for p in overload["points"]] == list(TINY.overload_factors)
    assert overload["base_rate"] > 0
    for point in overload["points"]:
        assert 0 <= point["windows_predicted"] <= 1, point
        assert point["predictions"] <= point["expected"], point
        # Counters come from the stats topic; shed only where the daemon reports it.
        assert point["dropped"] is None or point["dropped"] >= 0, point
        assert point["shed"] is None or point["shed"] >= 0, point

    for kind in BLOCK_KINDS:
        block = results["daemon_block"][kind]
        assert block["search"]["steps"]
        # Searched up to the faster QoS 1 echo (the goal's ceiling), reported against all four.
        bound = max(ceilings[e]["5"][kind]["rate"] for e in ("echo_qos1", "echo_qos1_floorline"))
        assert block["search"]["bracket"][1] == round(bound, 1)
        for key in ("ratio", "ratio_floorline", "ratio_qos0", "ratio_qos0_floorline"):
            assert isinstance(block[key], float), key
        assert sum(s["predictions"] for s in block["search"]["steps"]) > 0, kind
        step = block["search"]["steps"][0]
        assert {"daemon", "broker"} <= set(step["cpu_split"]), step["cpu_split"]

    pair = results["two_instances"]
    if "skipped" in pair:  # the daemon refused the $share subscription: said, not hidden
        assert "two daemons on a shared subscription: skipped" in tiny.stdout, tiny.tail()
    else:
        assert pair["share"].startswith("$share/")
        assert pair["steps"] >= 1
        assert 0 <= pair["exact_steps"] <= pair["steps"]
        best = pair["best_step"]
        assert best["predictions"] <= best["expected"], best
        # The broker spread the stream over both daemons; both used CPU.
        assert len(best["by_daemon"]) == 2, best
        assert all(n > 0 for n in best["by_daemon"].values()), best
        assert {"daemon a", "daemon b", "broker"} <= set(best["cpu_split"]), best
        assert len(pair["memory_mb"]) == 2

    workers = results["workers"]
    if not workers["implemented"]:  # no invented numbers, and the report says so
        assert workers["skipped"].startswith("not implemented"), workers
        assert "multi-worker run: not implemented" in tiny.stdout, tiny.tail()
    else:
        assert workers["search"]["steps"], workers
    backend = results["ceilings"]["backend"]
    assert backend["batch1_windows_s"] > 0
    assert backend["batch32_windows_s"] > 0
    spd = results["ceilings"]["sparkplug_decode"]
    assert spd["ddata_3_metrics_msgs_s"] > 0
    assert spd["json_3_features_msgs_s"] > 0
    assert "Sparkplug B decode" in tiny.stdout, tiny.tail()
    assert len(results["targets"]) >= 10
    for target in results["targets"]:
        if "skipped" in target:  # the naive way's, without the Keras model: neither met nor not
            assert target["met"] is None, target
            assert target["value"] is None, target
        else:
            assert isinstance(target["met"], bool), target

    # Every step's accounting adds up: no more predictions than windows sent, nothing received
    # twice, and (from the daemon's stats) no more messages received than sent.
    steps = [s for p in PROTOCOLS for s in results["daemon_sample"][p]["search"]["steps"]]
    steps += [s for k in BLOCK_KINDS for s in results["daemon_block"][k]["search"]["steps"]]
    for step in steps:
        assert 0 <= step["predictions"] <= step["expected"], step
        assert step["sent"] > 0
        if step["counters"] is not None:
            assert 0 < step["counters"]["received"] <= step["sent"], step

    bad = [(where, value) for where, value in _numbers(results)
           if not math.isfinite(value) or (value < 0 and not where.endswith("trend_ms"))]
    assert not bad, f"negative or non-finite figures: {bad[:10]}"


def test_tiny_benchmark_naive_way(tiny: Run) -> None:
    """The naive way ran and was compared; or, without the Keras model, it says it skipped."""
    naive = tiny.results["naive"]
    (goal,) = [t for t in tiny.results["targets"] if t["goal"] == NAIVE_GOAL]
    if "skipped" in naive:
        assert not KERAS_MODEL.is_file()
        assert naive == {"skipped": NAIVE_SKIPPED}
        assert goal["skipped"] == NAIVE_SKIPPED
        # Said in the printed report too, not only in the JSON.
        assert f"naive way: skipped: {NAIVE_SKIPPED}" in tiny.stdout, tiny.tail()
        assert f"SKIPPED {NAIVE_GOAL}" in tiny.stdout, tiny.tail()
        pytest.skip(f"the benchmark skipped the naive way: {NAIVE_SKIPPED}")
    assert naive["search"]["steps"]
    assert naive["startup_s"] > 0
    assert naive["predict_ms"] > 0
    assert sum(s["predictions"] for s in naive["search"]["steps"]) > 0
    assert isinstance(goal["met"], bool)
