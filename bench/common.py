"""Helpers the benchmarks share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def baseline_rss_mb(modules: str) -> float:
    """RSS (MB) of a fresh Python that has imported ``modules`` (comma-separated) and holds no model:
    the interpreter cost a benchmark's peak RSS is compared against."""
    code = (f"import {modules}; "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip())
