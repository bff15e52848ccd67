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

from tests.benchmark import BLOCK_KINDS, KERAS_MODEL, NAIVE_SKIPPED, PROTOCOLS, ROOT

pytestmark = pytest.mark.slow

SECTIONS = ("machine", "budget", "ceilings", "daemon_sample", "daemon_block", "naive", "targets")
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
    """One tiny benchmark run, shared by the tests below (it takes ~30 s on two cores)."""
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
    assert "against floorline reader" in tiny.stdout, tiny.tail()

    for section in SECTIONS:
        assert section in results, f"no {section} section"
    ceilings = results["ceilings"]
    for protocol in PROTOCOLS:
        # Stock paho (the goals' measure) and floorline's own reader (the daemon's), each.
        for bare, echo in (("bare", "echo"), ("bare_floorline", "echo_floorline")):
            assert ceilings[bare][protocol]["rate"] > 0, bare
            for kind in BLOCK_KINDS:
                assert ceilings[echo][protocol][kind]["rate"] > 0, echo
        sample = results["daemon_sample"][protocol]
        assert sample["search"]["steps"], "the per-sample search made no step"
        # Searched up to the faster of the two bare subscribers, reported against both.
        bound = max(ceilings[b][protocol]["rate"] for b in ("bare", "bare_floorline"))
        assert sample["search"]["bracket"][1] == round(bound, 1)
        assert isinstance(sample["ratio"], float)
        assert isinstance(sample["ratio_floorline"], float)
        assert sample["startup"]["seconds"] > 0
        assert sample["rss_mb"]["after_warm_up"] > 0
        # The daemon predicted windows: at the light warm-up rate, and in its search.
        warm = sample["warm_up"]
        assert 0 < warm["predictions"] <= warm["expected"], warm
        assert warm["duplicates"] == 0, warm
        assert sum(s["predictions"] for s in sample["search"]["steps"]) > 0
    for kind in BLOCK_KINDS:
        block = results["daemon_block"][kind]
        assert block["search"]["steps"]
        bound = max(ceilings[e]["5"][kind]["rate"] for e in ("echo", "echo_floorline"))
        assert block["search"]["bracket"][1] == round(bound, 1)
        assert isinstance(block["ratio_floorline"], float)
        assert sum(s["predictions"] for s in block["search"]["steps"]) > 0, kind
    backend = results["ceilings"]["backend"]
    assert backend["batch1_windows_s"] > 0
    assert backend["batch32_windows_s"] > 0
    assert len(results["targets"]) >= 6
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
