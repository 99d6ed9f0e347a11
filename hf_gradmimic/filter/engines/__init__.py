"""The Stage-2 engines behind one registry: name -> `Engine` that reduces a score log to its `WindowedScores`.

- ``"streaming"`` (`outofcore.OutOfCoreEngine`, the default): bounded memory, spilling sample-id ranges to disk;
- ``"memory"`` (`memory.MemoryEngine`): every record in memory, the simplest;
- ``"ray"`` (`ray.RayEngine`): the shards read and reduced on a Ray cluster.

All three give the same result bit for bit, in one read of the log (as Snorkel's ``labeling/apply/``
puts one backend per module behind a base class). `build_filter` takes its engine from here.
"""

from __future__ import annotations

from .base import Engine
from .memory import MemoryEngine
from .outofcore import OutOfCoreEngine
from .ray import RayEngine

__all__ = ["ENGINES", "Engine", "get_engine"]

_REGISTRY: dict[str, Engine] = {engine.name: engine for engine in (OutOfCoreEngine(), MemoryEngine(), RayEngine())}

ENGINES: tuple[str, ...] = tuple(_REGISTRY)
"""The engine names `build_filter` accepts, the default first."""


def get_engine(name: str) -> Engine:
    """The engine registered as ``name``; a ValueError names the known ones."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"Unknown engine {name!r}; expected one of {ENGINES}.")
    return _REGISTRY[name]
