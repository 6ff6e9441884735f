#!/usr/bin/env python3
"""Download CIFAR-10 once (torchvision) into a local folder, for configs/fedavg_cifar10.yaml.

Needs network access to the dataset's host; on a machine without it, copy an existing
``cifar-10-batches-py`` folder into ROOT instead.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/cifar10", help="where to put the dataset (default %(default)s)")
    args = parser.parse_args(argv)
    from torchvision.datasets import CIFAR10

    try:
        for train in (True, False):
            ds = CIFAR10(args.root, train=train, download=True)
            print(f"CIFAR-10 {'train' if train else 'test'}: {len(ds)} images in {args.root}")
    except (OSError, RuntimeError) as exc:
        print(f"error: could not download CIFAR-10 into {args.root!r}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
