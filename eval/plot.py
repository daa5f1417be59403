#!/usr/bin/env python3
"""Compare runs as PNG and CSV: `eval/plot.py RUN [RUN...] [--label L ...] [--out DIR]` (same as `dflsplit plot`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dflsplit, installed or not

from dflsplit.plot import plot_main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(plot_main())
