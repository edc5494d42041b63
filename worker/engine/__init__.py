"""The inference engine. Knows nothing of Redis or HTTP: requests in, token events out.

See ``api.py`` for the contract every engine implements, ``loader.load_engine`` to build one from an
artifact directory, and ``engine_thread.EngineThread`` to run it on its own thread.
"""

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats
from worker.engine.engine_thread import EngineThread
from worker.engine.loader import load_engine

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats", "EngineThread", "load_engine"]
