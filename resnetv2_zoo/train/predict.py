"""`resnetv2-zoo predict CHECKPOINT IMAGE_OR_DIR...`: top-k class names with probabilities."""
import argparse
import json
import logging
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import ResNetV2ZooError
from .data import ImageSamples, build_transforms, image_files_under, load_rgb
from .runtime import label_names_of, load_classifier, pick_device, predict_loader, prepare_for_device

__all__ = ['Prediction', 'predict_files', 'top_k']

_logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    top: List[Tuple[str, float]]  # (class name, probability), most likely first


def top_k(logits: torch.Tensor, names: Sequence[str], k: int) -> List[List[Tuple[str, float]]]:
    probs, indices = logits.softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)
    return [[(names[i], float(p)) for p, i in zip(row_p, row_i)] for row_p, row_i in zip(probs, indices.tolist())]


def readable(paths: Sequence[str]) -> List[str]:
    """The paths that load as images; the others are reported and left out."""
    good = []
    for path in paths:
        try:
            load_rgb(path)
        except Exception as e:  # PIL raises many types for files that are not (complete) images
            _logger.warning('skipping %s: not a readable image (%s: %s)', path, type(e).__name__, e)
        else:
            good.append(path)
    return good


def predict_files(checkpoint: str, paths: Sequence[str], k: int = 5, img_size: Optional[int] = None,
                  batch_size: int = 32) -> List[Prediction]:
    files = readable(image_files_under(paths))
    if not files:
        raise ResNetV2ZooError(f'no readable image in {", ".join(map(str, paths))}')
    model = load_classifier(checkpoint)
    device = pick_device()
    dataset = ImageSamples([(f, 0) for f in files], build_transforms(model, img_size, augment=False)[1])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    logits, _ = predict_loader(prepare_for_device(model, device), loader, device)
    return [Prediction(f, top) for f, top in zip(files, top_k(logits, label_names_of(model), k))]


def run_predict(args: argparse.Namespace) -> None:
    predictions = predict_files(args.checkpoint, args.images, args.top_k, args.img_size, args.batch_size)
    if args.json:
        print(json.dumps([asdict(p) for p in predictions], indent=2))
        return
    for prediction in predictions:
        print(prediction.path)
        for name, prob in prediction.top:
            print(f'  {100 * prob:6.2f}%  {name}')


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('predict', help='top-k classes of images',
                            description='Classify image files and folders with a checkpoint (run directory, model '
                                        'directory, .safetensors file or timm model name for ImageNet).')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_DIR')
    parser.add_argument('--top-k', type=int, default=5)
    parser.add_argument('--img-size', type=int, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--json', action='store_true', help='print the predictions as JSON')
    parser.set_defaults(func=run_predict)
