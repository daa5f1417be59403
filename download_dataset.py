#!/usr/bin/env python
"""Fetch a real dataset into the layout dflsplit reads (needs internet).

    python download_dataset.py mnist   --root data     # data/MNIST/raw/...
    python download_dataset.py cifar10 --root data     # data/cifar-10-batches-py/...
    python download_dataset.py femnist --root data/femnist   # prints LEAF's steps

MNIST and CIFAR-10 use torchvision's own downloaders (checksums verified), then the
files are converted once into dflsplit's cache. Point `dataset.root` in the config at
the same folder. FEMNIST is produced by LEAF's preprocessing script, which this
script explains. `digits` and `synthetic` need no download.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOWNLOADABLE = ("mnist", "cifar10", "femnist")

FEMNIST_STEPS = """\
FEMNIST comes from LEAF (https://github.com/TalwalkarLab/leaf), whose script downloads
NIST Special Database 19 and writes per-writer JSON files:

  git clone https://github.com/TalwalkarLab/leaf
  cd leaf/data/femnist
  ./preprocess.sh -s niid --sf 1.0 -k 0 -t sample     # --sf 0.05 for a 5% sample
  mkdir -p {root}/train {root}/test
  cp data/train/*.json {root}/train/
  cp data/test/*.json  {root}/test/

Then set in the config:  dataset: {{name: femnist, root: {root}}}
dflsplit converts the JSON once into {root}/dflsplit-cache/ on first use.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Download a dataset into the on-disk layout dflsplit reads (dataset.root).",
        epilog="digits (the default) and synthetic need no download.",
    )
    parser.add_argument("name", choices=DOWNLOADABLE, help="which dataset")
    parser.add_argument("--root", required=True, type=Path,
                        help="folder to download into; use the same path as dataset.root in the config")
    args = parser.parse_args(argv)
    if args.root.exists() and not args.root.is_dir():
        parser.error(f"--root {args.root}: exists and is not a folder")
    return args


def _offline_message(name: str, root: Path, err: BaseException) -> str:
    return (
        f"error: could not download {name} into {root}: {type(err).__name__}: {err}\n"
        f"This needs internet access. On an offline machine, download elsewhere with\n"
        f"  python download_dataset.py {name} --root DIR\n"
        f"and copy DIR here; then set dataset.root to it."
    )


def download(name: str, root: Path) -> int:
    """Fetch `name` into `root`; returns a process exit status."""
    if name == "femnist":
        print(FEMNIST_STEPS.format(root=root))
        return 0
    from urllib.error import URLError

    from torchvision import datasets as tv

    root.mkdir(parents=True, exist_ok=True)
    try:
        if name == "mnist":
            tv.MNIST(str(root), train=True, download=True)
            tv.MNIST(str(root), train=False, download=True)
        else:
            tv.CIFAR10(str(root), train=True, download=True)
    except (URLError, OSError, RuntimeError) as e:
        print(_offline_message(name, root, e), file=sys.stderr)
        return 1

    from dflsplit.config import DatasetConfig
    from dflsplit.datasets import DATASETS

    cls = DATASETS.get(name)
    cls.prepare(DatasetConfig(name=name, root=str(root)), root)
    ds = cls(DatasetConfig(name=name, root=str(root)), root, 0)
    print(f"{name}: {ds.train_size()} training and {ds.test_size()} test samples under {root.resolve()}")
    print(f"set in the config:  dataset: {{name: {name}, root: {root}}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return download(args.name, args.root)


if __name__ == "__main__":
    sys.exit(main())
