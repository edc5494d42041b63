"""The inference engine. Knows nothing of Redis or HTTP: requests in, token events out.

See ``api.py`` for the contract every engine implements, ``loader.load_engine`` to build one from an
artifact directory, and ``engine_thread.EngineThread`` to run it on its own thread.
"""

import os
import sys

# OpenMP threads that spin while waiting collapse when the cores are shared: on a 2-core host with
# one other busy process, batch-1 decode fell to 1.3 tok/s with libgomp's default spinning against
# 21 tok/s with PASSIVE. On an idle host spinning is faster (31 against 16 tok/s at batch 1, +11%
# tokens/s on the benchmark's mixed workload): waking a sleeping thread costs ~50-100 us per
# parallel region on these VMs. So PASSIVE is the default, and a host that gives the worker its
# cores sets ``GOMP_SPINCOUNT`` (e.g. 300000, libgomp's own default) or ``OMP_WAIT_POLICY``.
# The runtime reads these when torch is first imported, so this only takes effect if the engine
# package is imported before torch, as the worker does; an explicit setting wins.
if "torch" not in sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ):
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats
from worker.engine.engine_thread import EngineThread
from worker.engine.loader import load_engine

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats", "EngineThread", "load_engine"]
