"""Lets benchmark modules import their sibling helpers (plain_bucket, …)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
