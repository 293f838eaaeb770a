"""Where things are: the repository root and the committed demo model."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_MODEL = REPO / "models" / "bitplan-demo"
