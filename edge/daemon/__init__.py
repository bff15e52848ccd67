"""The daemon that wires the stages.

Model loading, pipelines and their workers, routing, acknowledgements, generation switches and
the gateway's state.
"""

from floorline.edge.daemon.daemon import Daemon

__all__ = ["Daemon"]
