"""Detectors: pure, I/O-free anomaly detection over usage events.

The pipeline builds one :class:`Engine` per partition and calls
:meth:`Engine.observe` per event and :meth:`Engine.advance` after each batch.
"""

from .config import DetectorConfig, Settings
from .engine import Engine
from .finding import KINDS, Finding

__all__ = ["KINDS", "DetectorConfig", "Engine", "Finding", "Settings"]
