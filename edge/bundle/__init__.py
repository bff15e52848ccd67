"""The bundle format: manifest, archive, signatures, the fleet's bundle store and the self-test.

A bundle is the contract between the converter and a gateway. Everything that reads or writes one
goes through this package; nothing here imports a runtime (the self-test asks ``backends``) and
``cryptography`` is loaded only where a signature is checked or made.
"""

from floorline.edge.bundle.bundle import Bundle, Golden
from floorline.edge.bundle.manifest import Manifest

__all__ = ["Bundle", "Golden", "Manifest"]
