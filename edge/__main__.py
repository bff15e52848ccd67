"""``python -m floorline.edge`` is the ``floorline`` command."""

import sys

from floorline.edge.cli import main

sys.exit(main())
