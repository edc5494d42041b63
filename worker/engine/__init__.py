"""The inference engine. Knows nothing of Redis or HTTP: requests in, token events out.

See ``api.py`` for the contract every engine implements.
"""

from worker.engine.api import Engine, EngineOutput, EngineRequest, EngineStats

__all__ = ["Engine", "EngineOutput", "EngineRequest", "EngineStats"]
