"""ondeck: an on-demand automation platform."""

from __future__ import annotations

__version__ = "0.1.0"
