"""`resnetv2-zoo` command line: one sub-command per job."""
import argparse
import sys
from typing import List, Optional

from .errors import ResNetV2ZooError


def _demo(args: argparse.Namespace) -> None:
    """Build each model, print its size, and run one forward pass at a small resolution."""
    import timm
    import torch

    from . import resnetv2_keras  # noqa: F401  (registers the models)

    for name in timm.list_models('*_keras'):
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, args.img_size, args.img_size))
        print(f'{name}: {params / 1e6:.2f} M parameters, logits {tuple(logits.shape)}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='resnetv2-zoo', description=__doc__)
    sub = parser.add_subparsers(dest='command', required=True)
    demo = sub.add_parser('demo', help='run the main job on an embedded default')
    demo.add_argument('--img-size', type=int, default=96)
    demo.set_defaults(func=_demo)
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
