#!/usr/bin/env python3
"""Turn a run folder into CSV and PNG (same as `dflsplit plot RUN_DIR`)."""

from dflsplit.plot import plot_main

if __name__ == "__main__":
    raise SystemExit(plot_main())
