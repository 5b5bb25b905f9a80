"""Where the checkout is: relative checkpoint, data and storage paths in configs resolve against it."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
