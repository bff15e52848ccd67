"""The benchmark runs end to end: every section, sane numbers. Never a timed assertion.

``python -m tests.benchmark --tiny`` measures every section once with a handful of messages (its
own broker, the daemon, the naive script), so this checks the plumbing, not the figures: the
machine running the suite may be anything.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.benchmark import KERAS_MODEL, ROOT

pytestmark = pytest.mark.slow

SECTIONS = ("machine", "budget", "ceilings", "daemon_sample", "daemon_block", "naive", "targets")


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


@pytest.mark.skipif(not KERAS_MODEL.is_file(), reason="the naive way needs .work/pdm/pdm.keras "
                    "(python -m floorline.converter.examples.pdm makes it; the smoke test does "
                    "not train)")
def test_tiny_benchmark_writes_every_section_with_sane_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmark", "--tiny", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "against floorline reader" in done.stdout, done.stdout[-3000:]
    results = json.loads(out.read_text())

    for section in SECTIONS:
        assert section in results, f"no {section} section"
    ceilings = results["ceilings"]
    for protocol in ("3.1.1", "5"):
        # Stock paho (the goals' measure) and floorline's own reader (the daemon's), each.
        for bare, echo in (("bare", "echo"), ("bare_floorline", "echo_floorline")):
            assert ceilings[bare][protocol]["rate"] > 0, bare
            for kind in ("binary", "json_block"):
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
    for kind in ("binary", "json_block"):
        block = results["daemon_block"][kind]
        assert block["search"]["steps"]
        bound = max(ceilings[e]["5"][kind]["rate"] for e in ("echo", "echo_floorline"))
        assert block["search"]["bracket"][1] == round(bound, 1)
        assert isinstance(block["ratio_floorline"], float)
    backend = results["ceilings"]["backend"]
    assert backend["batch1_windows_s"] > 0
    assert backend["batch32_windows_s"] > 0
    assert results["naive"]["search"]["steps"]
    assert len(results["targets"]) >= 6
    assert all(isinstance(t["met"], bool) for t in results["targets"])

    # Every step's accounting adds up: no more predictions than windows sent.
    steps = [s for p in ("3.1.1", "5") for s in results["daemon_sample"][p]["search"]["steps"]]
    steps += [s for k in ("binary", "json_block")
              for s in results["daemon_block"][k]["search"]["steps"]]
    for step in steps:
        assert 0 <= step["predictions"] <= step["expected"]
        assert step["sent"] > 0

    bad = [(where, value) for where, value in _numbers(results)
           if not math.isfinite(value) or (value < 0 and not where.endswith("trend_ms"))]
    assert not bad, f"negative or non-finite figures: {bad[:10]}"
