"""The drift reference stored in the manifest: a summary of data files, for drift detection.

From the raw windows of the conversion's data files (``--reference-data``, or by default
``--calibration`` and ``--parity-data``), read again in raw sensor units so a feature stage or a
normalization does not matter: per input feature, histograms of each window's ``mean`` and
``std`` (``std`` for windows of 2 samples or more), and per head the model's outputs on the same
windows (a classification head's top-1 class frequencies, an anomaly score's or each regression
value's histogram). Continuous statistics get decile bins (equal mass on the data: 10 bins, so
PSI compares like with like); a statistic constant on the data gets two edges just around its
value, so a move either way shows. Edges are rounded to 6 significant digits and the counts are
taken with the rounded edges and the gateway's own :func:`floorline.edge.stream.drift.bin_index`.
Why per-window statistics and not raw samples: see ``floorline.edge.stream.drift``.

With ``--reference-data`` the summary is of those files alone (windows of the plant's normal
operation): calibration data must cover every class, faults too, for int8, and a reference made of
it reads a healthy plant as drifting. ``--no-reference`` writes none. Without data files
(synthetic parity inputs) there is no summary: drift detection needs what the plant's data looks
like, and the bundle says so by leaving ``reference`` out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from floorline.converter import data
from floorline.converter.errors import CalibrationDataError
from floorline.converter.progress import step
from floorline.edge.backends.base import join_outputs
from floorline.edge.bundle.manifest import (
    Head,
    InputSpec,
    ReferenceHistogram,
    ReferenceSummary,
    Task,
)
from floorline.edge.stream.drift import bin_index, window_statistics
from floorline.edge.stream.heads import HeadLayout
from floorline.edge.stream.normalization import normalize

if TYPE_CHECKING:
    from floorline.converter.convert import ConvertRequest, Source

BINS = 10
MAX_WINDOWS = 5000
"""Windows summarized at most (a seeded sample of the data files): the reference's own noise in
PSI is about (BINS - 1) / MAX_WINDOWS, far below any level worth alarming on."""


def _edges(values: NDArray[np.float64], bins: int = BINS) -> list[float]:
    qs = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = sorted({float(f"{q:.6g}") for q in qs})
    if len(edges) < 2:  # (nearly) constant: bins below, at and above the value
        c = edges[0]
        delta = max(abs(c) * 1e-5, 1e-9)
        edges = [float(f"{c - delta:.8g}"), float(f"{c + delta:.8g}")]
    return edges


def _histogram(kind: str, name: str, statistic: str, values: NDArray[np.float64],
               edges: list[float], column: int = 0) -> ReferenceHistogram:
    # Counted with the gateway's own binning, so equal data gives equal counts on both sides.
    idx = bin_index(values[:, None], np.asarray([edges], dtype=np.float64))[:, 0]
    counts = np.bincount(idx, minlength=len(edges) + 1)
    return ReferenceHistogram.model_validate({
        "kind": kind, "name": name, "statistic": statistic, "column": column,
        "edges": edges, "counts": [int(c) for c in counts],
    })


def summarize(raw: NDArray[Any], heads: list[Head], values: NDArray[Any] | None,
              features: list[str], *, data_name: str) -> ReferenceSummary:
    """The summary of raw windows RAW (n, W, F) and their head VALUES (``HeadLayout.values``)."""
    n = len(raw)
    windows = raw.reshape(n, -1, raw.shape[-1])
    stats = window_statistics(windows, windows.shape[1] > 1)
    hists: list[ReferenceHistogram] = []
    for f, name in enumerate(features):
        for statistic, block in zip(("mean", "std"), stats, strict=False):
            column = block[:, f]
            hists.append(_histogram("input", name, statistic, column, _edges(column)))
    if values is not None:
        layout = HeadLayout(heads)
        start = 0
        for head, width in zip(heads, layout.widths, strict=True):
            part = values[:, start : start + width].astype(np.float64)
            start += width
            if head.task is Task.CLASSIFICATION:
                if width >= 2:
                    top = np.argmax(part, axis=1).astype(np.float64)
                    hists.append(_histogram("output", head.name, "class", top,
                                            [c + 0.5 for c in range(width - 1)]))
                continue
            # An anomaly head's score is its first value (the shares follow); regression: each.
            for col in range(1 if head.task is Task.ANOMALY else width):
                v = part[:, col]
                if np.isfinite(v).all():
                    hists.append(_histogram("output", head.name, "value", v, _edges(v), col))
    return ReferenceSummary(data=data_name, windows=n, histograms=hists)


MIN_REFERENCE_WINDOWS = 100
"""Windows ``--reference-data`` must hold at least: with 10 bins the reference's own PSI noise is
about (BINS - 1) / windows, 0.09 at 100, which with a gateway's 200 live windows (0.045) stays
well under the 0.25 alarm level; fewer and a healthy plant could alarm on the reference's noise."""


@dataclass(frozen=True)
class ReferenceData:
    """Raw windows to summarize, and what they are (the summary's ``data``)."""

    raw: NDArray[np.float32]
    name: str


def load_reference_data(req: ConvertRequest, spec: InputSpec,
                        say: Callable[[str], None]) -> ReferenceData | None:
    """The raw windows REQ's reference is made of, or None for no reference (said once).

    Read before anything is exported, so a wrong ``--reference-data`` file costs no conversion.
    """
    if req.no_reference:
        if req.reference_data:
            raise CalibrationDataError(
                "--reference-data and --no-reference: give one or the other"
            )
        say("drift reference: none (--no-reference): gateways will run this bundle with drift "
            "detection off")
        return None
    if req.reference_data:
        files = [(p, "reference") for p in req.reference_data]
    else:
        files = [(p, name) for p, name in ((req.calibration, "calibration"),
                                           (req.parity_data, "parity")) if p is not None]
    if not files:
        say("drift reference: none (no --calibration or --parity-data): gateways will run this "
            "bundle with drift detection off")
        return None
    # Raw units: the data files read without normalization or feature stage.
    raw_spec = InputSpec.model_construct(
        **{**dict(spec), "normalization": None, "preprocessing": None}
    )
    raw = np.concatenate([data.load_inputs(p, raw_spec, origin=f"{name} data")
                          for p, name in files])
    if req.reference_data and len(raw) < MIN_REFERENCE_WINDOWS:
        paths = ", ".join(str(p) for p in req.reference_data)
        raise CalibrationDataError(
            f"reference data {paths}: {len(raw)} windows, too few for a drift reference (needs "
            f"at least {MIN_REFERENCE_WINDOWS}; a few thousand of normal operation are best)"
        )
    if len(raw) > MAX_WINDOWS:
        pick = np.random.default_rng(req.seed).permutation(len(raw))[:MAX_WINDOWS]
        raw = raw[np.sort(pick)]
    names = list(dict.fromkeys(name for _, name in files))
    return ReferenceData(raw, "+".join(names))


def reference(ref: ReferenceData | None, spec: InputSpec, heads: list[Head], source: Source,
              say: Callable[[str], None]) -> ReferenceSummary | None:
    """The summary of REF's windows for the manifest (None without any)."""
    if ref is None:
        return None
    with step("drift reference", say):
        x = _model_input(ref.raw, spec)
        values = HeadLayout(heads).values(x, join_outputs(source.predict(x)))
        summary = summarize(ref.raw, heads, values, [f.name for f in spec.features],
                            data_name=ref.name)
    say(f"drift reference: {summary.windows} windows, {len(summary.histograms)} histograms")
    if ref.name != "reference":
        # One line, for the mix this default makes: int8 calibration data covers every class.
        say(f"drift reference: made of the {ref.name} data; if it holds faults or balanced "
            "classes a healthy plant reads as drifting: pass --reference-data with windows of "
            "normal operation (or --no-reference)")
    return summary


def _model_input(raw: NDArray[np.float32], spec: InputSpec) -> NDArray[np.float32]:
    # What the model takes for raw windows, as the gateway computes it (a feature stage, if the
    # bundle has one, then normalization).
    if getattr(spec, "preprocessing", None) is not None:
        from floorline.edge.stream.normalization import model_input  # noqa: PLC0415

        return model_input(raw, spec)
    return normalize(raw, spec)
