"""Data capture: raw windows kept on the gateway for retraining (docs/monitoring.md).

``config`` (the ``capture:`` block), ``policy`` (per pipeline, on its worker thread), ``store``
(one SQLite file per gateway, its writer thread, the bounds), ``service`` (the daemon's glue and
the label command), ``export`` (``floorline capture export``).
"""
