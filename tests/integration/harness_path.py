"""The chaos harness (its own embedded stack per test), for integration tests that need their own."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chaos"))

from harness import chaos_stack

__all__ = ["chaos_stack"]
