#!/usr/bin/env python3
"""Run timm's own `benchmark.py` with this package's `*_keras` models registered.

timm ships `benchmark.py` in its repository, not in the wheel, so pass its path first; every later
argument goes to it unchanged:

    python benchmarks/timm_benchmark.py ~/pytorch-image-models/benchmark.py \\
        --model resnet50v2_keras --bench inference -b 8 --img-size 224 --channels-last

which is the same as
    python -c "import resnetv2_zoo, runpy, sys; sys.argv = sys.argv[1:]; \\
               runpy.run_path(sys.argv[0], run_name='__main__')" PATH/TO/benchmark.py --model resnet50v2_keras ...
"""
import runpy
import sys

import resnetv2_zoo  # noqa: F401  (registers resnet50v2_keras, resnet101v2_keras, resnet152v2_keras with timm)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith('-'):
        sys.exit(__doc__)
    sys.argv = sys.argv[1:]  # timm's script sees itself as argv[0], then its own arguments
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
