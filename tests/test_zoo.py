"""Every zoo shape converts to every target its format can express, and a gateway runs it.

The zoo and the checks live in ``tests/zoo.py`` (``python -m tests.zoo`` prints the table).
One run converts each model once per target; each test then asserts its model's cells, so a
failure names the shape and target. The run is ``python -m tests.zoo`` itself, started by
``tests/conftest.py`` at the start of the session at the lowest CPU priority: it is four minutes
of pure computation, and the rest of the suite mostly waits on brokers and daemons, so it runs in
their idle time instead of after them.
"""

from __future__ import annotations

import pytest

from tests import zoo
from tests.conftest import ZOO_RUN

pytestmark = pytest.mark.tensorflow


@pytest.fixture(scope="module")
def cells(request: pytest.FixtureRequest) -> dict[str, list[zoo.Row]]:
    run = request.config.stash.get(ZOO_RUN, None)
    assert run is not None, "tests/conftest.py did not start the zoo run"
    rows = run.result()
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
