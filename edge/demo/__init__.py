"""The demo plant: vibration physics, the simulator, an embedded broker and the live table.

Not part of the runtime: nothing in the daemon imports this package (tests/test_packaging.py
checks), and its broker needs the ``demo`` extra.
"""
