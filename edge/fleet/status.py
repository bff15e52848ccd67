"""``floorline fleet status``: every gateway's retained state and reported documents, summed up.

One row per gateway: online, running version, deployment, signer, models, last verdict,
attributes; a summary (gateways per running version and per last result, offline and not
reporting); filters; ``--json``; and the exit codes of ``floorline.edge.fleet.common``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from floorline.edge.cli import table as text_table
from floorline.edge.config.model import BrokerConfig
from floorline.edge.fleet.common import (
    EXIT_FAILED,
    EXIT_MISSING,
    EXIT_OK,
    FAILED_RESULTS,
    STDOUT,
    Collector,
    gateway_docs,
    matches,
    verdict,
    verdict_reason,
)

STALE_S = 120.0
"""A reported document whose health is older than this is "not reporting" (4 x the default
fleet.report_interval_s of 30 s)."""


@dataclass
class Filters:
    """What ``status`` shows; an empty Filters shows everything."""

    gateway: str | None = None
    version: int | None = None
    missing: int | None = None
    result: str | None = None
    attrs: dict[str, str] = field(default_factory=dict)
    deployment: str | None = None

    def any(self) -> bool:
        """Whether any filter is set."""
        return bool(self.attrs) or any(
            v is not None
            for v in (self.gateway, self.version, self.missing, self.result, self.deployment))


@dataclass
class Report:
    """What ``status`` found."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    exit_code: int


def _last(history: list[Any]) -> dict[str, Any]:
    entries = [h for h in history if isinstance(h, dict)]
    return entries[-1] if entries else {}


def verdict_text(entry: dict[str, Any]) -> str:
    """``rejected v123``; the version only when the gateway reported one."""
    if not entry:
        return "-"
    version = entry.get("version")
    return f"{entry.get('result', '?')}" + (f" v{version}" if version is not None else "")


def _count_of(value: Any) -> int:
    """VALUE as a count, 0 when a (broken) gateway reported something else."""
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0


def row(name: str, docs: dict[str, Any], now: float, stale_s: float) -> dict[str, Any]:
    """One gateway's row from its state and reported documents."""
    state = docs.get("state") or {}
    rep = docs.get("reported") or {}
    last = _last(rep.get("history") or [])
    health = rep.get("health") or {}
    pipelines = health.get("pipelines") or {}
    online = state.get("state") == "online" if state else None
    seen = health.get("ts", rep.get("ts"))
    age = now - float(seen) if isinstance(seen, (int, float)) else None
    reporting = bool(rep) and (age is None or age <= stale_s or "ts" not in health)
    return {
        "gateway": name,
        "online": online,
        "reporting": reporting,
        "report_age_s": round(age, 1) if age is not None else None,
        "version": rep.get("running_version"),
        "source": rep.get("config_source"),
        "deployment": rep.get("deployment") or "",
        "signer": rep.get("signed_by"),
        "models": ", ".join(f"{b.get('name')} {b.get('version')}"
                            for b in rep.get("bundles") or [] if isinstance(b, dict)),
        "last_result": last.get("result"),
        "last_version": last.get("version"),
        "last_apply": verdict_text(last),
        "reason": str(last.get("reason") or ""),
        "probation": rep.get("probation"),
        "attributes": {str(k): str(v) for k, v in (rep.get("attributes") or {}).items()},
        "dead_letters": sum(_count_of(p.get("dead_letters")) for p in pipelines.values()
                            if isinstance(p, dict)),
        "_reported": rep,
    }


def _keep(r: dict[str, Any], f: Filters) -> bool:
    if f.gateway is not None and r["gateway"] != f.gateway:
        return False
    if f.version is not None and r["version"] != f.version:
        return False
    if f.missing is not None and isinstance(r["version"], int) and r["version"] >= f.missing:
        return False
    if f.result is not None and r["last_result"] != f.result:
        return False
    if f.deployment is not None and r["deployment"] != f.deployment:
        return False
    return matches(f.attrs, r["attributes"])


def _count(values: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        key = "local" if v is None else str(v)
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize(rows: list[dict[str, Any]], f: Filters, *, total: int) -> Report:
    """The summary and exit code of ROWS (the filtered rows; TOTAL gateways reported)."""
    failing = []
    for r in rows:
        if f.missing is not None:
            v = verdict(r["_reported"], f.missing)
            if v in FAILED_RESULTS:
                failing.append(r["gateway"])
        elif r["last_result"] in FAILED_RESULTS:
            failing.append(r["gateway"])
    offline = [r["gateway"] for r in rows if r["online"] is False]
    silent = [r["gateway"] for r in rows if r["online"] is not False and not r["reporting"]]
    summary: dict[str, Any] = {
        "gateways": len(rows),
        "reported": total,
        "online": sum(1 for r in rows if r["online"]),
        "offline": len(offline),
        "not_reporting": len(silent),
        "versions": _count([r["version"] for r in rows]),
        "results": _count([r["last_result"] or "none" for r in rows]),
        "deployments": _count([r["deployment"] or "(none)" for r in rows]),
        "failing": failing,
        "offline_gateways": offline,
        "not_reporting_gateways": silent,
    }
    if f.missing is not None:
        summary["missing"] = {"version": f.missing, "count": len(rows),
                              "gateways": [r["gateway"] for r in rows]}
    if failing:
        code = EXIT_FAILED
    elif offline or silent or (f.missing is not None and rows) or (total == 0):
        code = EXIT_MISSING
    else:
        code = EXIT_OK
    return Report(rows=rows, summary=summary, exit_code=code)


def collect(broker: BrokerConfig, *, gateway: str | None = None,
            wait_s: float = 10.0) -> dict[str, dict[str, Any]]:
    """Every gateway's retained state and reported documents, once the retained burst is in."""
    gw = gateway or "+"
    with Collector(broker, [f"floorline/{gw}/state", f"floorline/{gw}/reported"]) as col:
        col.start(cap_s=wait_s)
        return gateway_docs(col.snapshot())


def fleet_status(
    *,
    broker: BrokerConfig,
    filters: Filters | None = None,
    as_json: bool = False,
    wait_s: float = 10.0,
    stale_s: float = STALE_S,
    out: Any = STDOUT,
) -> Report:
    """Collect, filter, print (a table and a summary, or one JSON document); the Report."""
    f = filters or Filters()
    docs = collect(broker, gateway=f.gateway, wait_s=wait_s)
    now = time.time()
    every = [row(name, docs[name], now, stale_s) for name in sorted(docs)]
    rows = [r for r in every if _keep(r, f)]
    report = summarize(rows, f, total=len(every))
    if as_json:
        body = {"gateways": [{k: v for k, v in r.items() if not k.startswith("_")}
                             for r in rows],
                "summary": report.summary, "exit_code": report.exit_code}
        print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode(), file=out)
        return report
    render(report, f, out)
    return report


def _online(r: dict[str, Any]) -> str:
    if r["online"] is None:
        return "?"
    if not r["online"]:
        return "NO"
    return "yes" if r["reporting"] else "silent"


def render(report: Report, f: Filters, out: Any) -> None:
    """The table, the failures' reasons and the summary."""
    rows, s = report.rows, report.summary
    if not s["reported"]:
        print("no gateways reported (wrong broker or topic prefix?)", file=out)
        return
    if rows:
        print(text_table.render(
            ("gateway", "online", "version", "deployment", "signer", "models", "last verdict",
             "attributes"),
            [(r["gateway"], _online(r), str(r["version"] or "-"), r["deployment"] or "-",
              str(r["signer"] or "-"), r["models"] or "-",
              r["last_apply"] + (" (probation)" if r["probation"] else ""),
              ",".join(f"{k}={v}" for k, v in sorted(r["attributes"].items())) or "-")
             for r in rows],
        ), file=out)
    for r in rows:
        if f.missing is not None:
            v = verdict(r["_reported"], f.missing)
            if v in FAILED_RESULTS:
                print(f"  {r['gateway']}: {v} v{f.missing}: "
                      f"{verdict_reason(r['_reported'], f.missing)}", file=out)
        elif r["last_result"] in FAILED_RESULTS:
            print(f"  {r['gateway']}: {r['last_apply']}: {r['reason']}", file=out)
    shown = (f"{s['gateways']} of {s['reported']} gateways" if f.any()
             else f"{s['gateways']} gateways")
    print(f"{shown}: {s['online']} online, {s['offline']} offline, "
          f"{s['not_reporting']} not reporting", file=out)
    if rows:
        print("running version: " + ", ".join(f"{k} x{n}" for k, n in s["versions"].items()),
              file=out)
        print("last result: " + ", ".join(f"{k} x{n}" for k, n in s["results"].items()),
              file=out)
    if f.missing is not None:
        print(f"{len(rows)} gateway(s) have not reached version {f.missing}", file=out)
