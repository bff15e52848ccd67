"""``floorline fleet``: the operator's side of fleet pushes.

    floorline fleet keygen PREFIX
    floorline fleet push (--gateway ID ... | --group NAME | --selector k=v,...) --config FILE
                         [--bundle DIR ...] --key KEY [--deployment NAME] [--wait]
    floorline fleet status [--json] [--version V] [--missing V] [--result R] [--attr k=v ...]
                           [--deployment D] [--gateway ID]
    floorline fleet rollout start|status|stop|resume ...
    floorline fleet gc [--dry-run]
    floorline fleet clear (--gateway ID ... | --group NAME | --selector NAME | --rollout NAME)

The work is done in ``common`` (broker options, connections, retained views, exit codes),
``push`` (push, keygen, clear, gc), ``status`` and ``rollout``; this module keeps the names
the rest of the code and the tests import.
"""

from __future__ import annotations

from typing import Any

from floorline.edge.config.model import BrokerConfig
from floorline.edge.fleet.common import (
    EXIT_BROKER,
    EXIT_FAILED,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_USAGE,
    STDOUT,
    BrokerUnreachableError,
    UsageError,
    broker_config,
    connect,
)
from floorline.edge.fleet.push import clear, gc, keygen, push, wait_verdicts
from floorline.edge.fleet.status import Filters, Report, fleet_status

__all__ = [
    "EXIT_BROKER",
    "EXIT_FAILED",
    "EXIT_MISSING",
    "EXIT_OK",
    "EXIT_USAGE",
    "BrokerUnreachableError",
    "Filters",
    "Report",
    "UsageError",
    "broker_config",
    "clear",
    "connect",
    "fleet_status",
    "gc",
    "keygen",
    "push",
    "status",
    "wait_verdicts",
]


def status(*, broker: BrokerConfig, gateway: str | None = None, wait_s: float = 2.0,
           out: Any = STDOUT) -> list[dict[str, Any]]:
    """Collect retained state and reported documents; print a table; return the rows."""
    report = fleet_status(broker=broker, filters=Filters(gateway=gateway), wait_s=wait_s,
                          out=out)
    return report.rows
