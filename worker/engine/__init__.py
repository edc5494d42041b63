"""The inference engine. Knows nothing of Redis or HTTP: requests in, token events out.

See ``api.py`` for the contract every engine implements, ``loader.load_engine`` to build one from an
artifact directory, and ``engine_thread.EngineThread`` to run it on its own thread.
"""

import os
import sys

# OpenMP threads that spin while waiting collapse when the cores are shared (measured on a 2-core
# host with other busy processes: a float32 [32x576]@[576x1536] matmul took 18 ms spinning, 1.2 ms
# with PASSIVE). The runtime reads this when torch is first imported, so it only takes effect if
# the engine package is imported before torch, as the worker does; an explicit setting wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats
from worker.engine.engine_thread import EngineThread
from worker.engine.loader import load_engine

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats", "EngineThread", "load_engine"]
