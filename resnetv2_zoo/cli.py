"""`resnetv2-zoo` command line. Each sub-command lives in its own module, which defines
`register(subparsers)` adding a parser whose `func(args)` does the job."""
import argparse
import importlib
import sys
from typing import List, Optional

from .errors import ResNetV2ZooError

# resnetv2_zoo.<module> for each sub-command, in the order `--help` lists them.
SUBCOMMAND_MODULES = ('train.demo', 'train.finetune', 'train.evaluate', 'train.predict', 'weights.convert')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='resnetv2-zoo', description='Keras ResNetV2 models as exact timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f'{__package__}.{name}').register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ResNetV2ZooError as e:
        print(f'resnetv2-zoo {args.command}: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
