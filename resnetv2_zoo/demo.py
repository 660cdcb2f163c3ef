"""`resnetv2-zoo demo`: the README's main job on an embedded default (no data needed)."""
import argparse


def run_demo(args: argparse.Namespace) -> None:
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


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('demo', help='run the main job on an embedded default')
    parser.add_argument('--img-size', type=int, default=96)
    parser.set_defaults(func=run_demo)
