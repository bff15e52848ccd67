"""``floorline capture export``: stored windows as the data ``floorline-convert`` takes.

The .npz holds ``x`` (N, window, features) float32 in raw sensor units, which is what
``converter/data.py`` reads for ``--calibration`` and ``--parity-data`` (it normalizes as the
gateway does), and beside it, one entry per window: ``y`` (the operator label, "" if none),
``asset``, ``pipeline``, ``gateway``, ``seq``, ``start``, ``end`` (NaN when the input carries no
time), ``captured_at``, ``reasons``, ``model_name``, ``model_version``, ``model_sha256``,
``predicted`` (the label the model gave, "" if none) and ``score``. All plain arrays (no pickle).
A sidecar FILE.json says the same in summary (counts per label, asset, model; the filters used).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from floorline.edge.capture.service import STORE_FILE, LabelError, _time
from floorline.edge.errors import FloorlineError

_COLUMNS = ("pipeline, asset, seq, start, end, ts, gateway, model, summary, reasons, label, "
            "samples, features, data")
_ORDER = "pipeline, asset, seq"


class ExportError(FloorlineError):
    """The export cannot be written; the message says why and what to do."""


def export(state_dir: Path, out: Path, *, pipeline: str | None = None,
           label: str | None = None, since: str | None = None,
           labelled: bool = False) -> dict[str, Any]:
    """Write the matching windows to OUT (.npz) and OUT.json; returns the sidecar document."""
    path = state_dir / STORE_FILE
    if not path.is_file():
        raise ExportError(f"no capture store at {path}: is --state-dir the gateway's state_dir, "
                          "and does a pipeline have a capture block?")
    if out.suffix != ".npz":
        raise ExportError(f"--out {out}: must end in .npz (the format floorline-convert reads)")
    where: list[str] = ["1"]
    args: list[object] = []
    if pipeline is not None:
        where.append("pipeline = ?")
        args.append(pipeline)
    if label is not None:
        where.append("label = ?")
        args.append(label)
    elif labelled:
        where.append("label IS NOT NULL")
    if since is not None:
        try:
            where.append("t >= ?")
            args.append(_time(float(since) if _numeric(since) else since, "--since"))
        except LabelError as exc:
            raise ExportError(str(exc)) from None
    try:
        # Read-only, beside a running daemon: WAL lets the writer go on.
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            # Only the fixed clauses above are joined in; every value is bound.
            clauses = " AND ".join(where)
            query = f"SELECT {_COLUMNS} FROM windows WHERE {clauses} ORDER BY {_ORDER}"  # noqa: S608
            rows = conn.execute(query, args).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    if not rows:
        raise ExportError("no stored windows match (check --pipeline, --label, --since)")
    shapes = {(r[11], r[12]) for r in rows}
    if len(shapes) > 1:
        raise ExportError(f"windows of different shapes {sorted(shapes)} (different models): "
                          "export one --pipeline at a time")
    samples, features = shapes.pop()
    x = np.stack([np.frombuffer(r[13], dtype=np.float32).reshape(samples, features)
                  for r in rows])
    models = [orjson.loads(r[7]) for r in rows]
    summaries = [orjson.loads(r[8]) for r in rows]
    nan = float("nan")
    arrays: dict[str, Any] = {
        "x": x,
        "y": np.array([r[10] or "" for r in rows], dtype=str),
        "asset": np.array([r[1] for r in rows], dtype=str),
        "pipeline": np.array([r[0] for r in rows], dtype=str),
        "gateway": np.array([r[6] for r in rows], dtype=str),
        "seq": np.array([r[2] for r in rows], dtype=np.int64),
        "start": np.array([nan if r[3] is None else r[3] for r in rows], dtype=np.float64),
        "end": np.array([nan if r[4] is None else r[4] for r in rows], dtype=np.float64),
        "captured_at": np.array([r[5] for r in rows], dtype=np.float64),
        "reasons": np.array([r[9] for r in rows], dtype=str),
        "model_name": np.array([m["name"] for m in models], dtype=str),
        "model_version": np.array([m["version"] for m in models], dtype=str),
        "model_sha256": np.array([m["sha256"] for m in models], dtype=str),
        "predicted": np.array([s.get("label") or "" for s in summaries], dtype=str),
        "score": np.array([s.get("score", nan) for s in summaries], dtype=np.float64),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    doc = {
        "file": out.name,
        "windows": len(rows),
        "shape": list(x.shape),
        "units": "raw sensor units (floorline-convert normalizes as the gateway does)",
        "labels": dict(Counter(r[10] or "" for r in rows)),
        "assets": dict(Counter(r[1] for r in rows)),
        "pipelines": sorted({r[0] for r in rows}),
        "gateways": sorted({r[6] for r in rows}),
        "models": sorted({f"{m['name']} {m['version']} {m['sha256']}" for m in models}),
        "filters": {"pipeline": pipeline, "label": label, "since": since, "labelled": labelled},
    }
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
