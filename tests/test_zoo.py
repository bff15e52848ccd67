"""Every zoo shape converts to every target its format can express, and a gateway runs it.

The zoo and the checks live in ``tests/zoo.py`` (``python -m tests.zoo`` prints the table).
One module-scoped run converts each model once per target; each test then asserts its model's
cells, so a failure names the shape and target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import zoo

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[zoo.Row]]:
    rows = zoo.run(None, Path(tmp_path_factory.mktemp("zoo")))
    by_model: dict[str, list[zoo.Row]] = {}
    for row in rows:
        by_model.setdefault(row.model, []).append(row)
    print("\n" + zoo.table(rows))
    return by_model


@pytest.mark.parametrize("model", [m.name for m in zoo.ZOO])
def test_model_converts_to_every_target_and_runs_on_the_gateway(
    cells: dict[str, list[zoo.Row]], model: str
) -> None:
    rows = cells[model]
    kind = next(m.kind for m in zoo.ZOO if m.name == model)
    assert [r.target for r in rows] == (["onnx"] if kind == "sklearn" else zoo.KERAS_TARGETS)
    failed = [f"{r.target}: {r.detail}" for r in rows if not r.ok]
    assert not failed, failed
    for row in rows:
        if row.agreement != "-":
            agreeing, total = (int(v) for v in row.agreement.split()[-1].split("/"))
            assert total >= 256
            assert agreeing / total >= 0.99
