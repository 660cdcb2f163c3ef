"""Run timm's own scripts (`train.py`, `validate.py`, `benchmark.py`, `inference.py`) with our models registered.

timm ships these scripts in its repository (github.com/huggingface/pytorch-image-models), not in the
wheel, and a script that has not imported `resnetv2_zoo` does not know `resnet50v2_keras`: timm says
"Unknown model". This runs the given script as `__main__`, exactly as `python SCRIPT.py ARGS...` would
(same `sys.argv`, the script's folder first on `sys.path`), after `import resnetv2_zoo`:

    resnetv2-zoo timm PATH/TO/train.py --data-dir DATA --model resnet50v2_keras --pretrained ...
    python -m resnetv2_zoo.timm_scripts PATH/TO/validate.py --data-dir DATA --model resnet50v2_keras ...

Every argument after the script goes to it unchanged, and its exit status is ours.
"""
import argparse
import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional

from .errors import ResNetV2ZooError

__all__ = ['run_timm_script']

TIMM_SCRIPTS = ('train.py', 'validate.py', 'benchmark.py', 'inference.py')
USAGE = 'resnetv2-zoo timm SCRIPT.py [ARGS...]'


def run_timm_script(script: str, args: List[str]) -> None:
    """Run `script` (a path to one of timm's scripts, or any script using timm) as `__main__` with `args`."""
    path = Path(script)
    if not path.is_file():
        raise ResNetV2ZooError(
            f'{script}: no such script. timm keeps {", ".join(TIMM_SCRIPTS)} in its repository, not in the pip '
            'package: clone github.com/huggingface/pytorch-image-models and pass the path of the one to run')
    import resnetv2_zoo  # noqa: F401  (registers the *_keras models with timm)

    sys.argv = [str(path), *args]  # the script sees itself as argv[0], then its own arguments
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python SCRIPT.py` does
    runpy.run_path(str(path), run_name='__main__')


def _run(args: argparse.Namespace) -> None:
    run_timm_script(args.script, args.script_args)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('timm', help="run timm's train.py / validate.py / benchmark.py / inference.py with the "
                                         'models registered',
                            description=__doc__.split('\n\n')[1], usage=USAGE,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('script', metavar='SCRIPT.py', help="path of timm's script (from its repository)")
    parser.add_argument('script_args', nargs=argparse.REMAINDER, metavar='ARGS', help='passed to the script unchanged')
    parser.set_defaults(func=_run)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m resnetv2_zoo.timm_scripts SCRIPT.py ARGS...`"""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(f'usage: python -m resnetv2_zoo.timm_scripts SCRIPT.py [ARGS...]\n\n{__doc__}', file=sys.stderr)
        return 0 if argv else 2
    try:
        run_timm_script(argv[0], argv[1:])
    except ResNetV2ZooError as e:
        print(f'resnetv2-zoo timm: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
