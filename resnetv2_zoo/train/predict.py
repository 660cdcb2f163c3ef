"""`resnetv2-zoo predict CHECKPOINT IMAGE_OR_DIR...`: top-k class names with probabilities.

`predict()` is the Python API (`resnetv2_zoo.predict`); the command is a thin layer over it.
"""
import argparse
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..argtypes import DefaultsHelpFormatter, image_size, non_negative_int, positive_int
from ..errors import ResNetV2ZooError
from ..weights.checkpoint import output_activation
from ..weights.decode import top_k_labels
from .data import build_transforms, check_images, image_files_under
from .evaluate import add_inference_options
from .keras_pipeline import PIPELINE_HELP, PIPELINES, check_pipeline
from .runtime import (
    check_checkpoint,
    label_names_of,
    load_classifier,
    pick_device,
    predict_samples,
    prepare_for_inference,
    resolve_amp,
)

__all__ = ['Prediction', 'PredictResult', 'predict', 'predict_files']


@dataclass
class Prediction:
    path: str
    top: List[Tuple[str, float]]  # (class name, probability), most likely first; k is clipped to the class count


@dataclass
class PredictResult:
    """What `predict` returns: one `Prediction` per readable image, in the order found."""

    predictions: List[Prediction]
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable files left out

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def predict(checkpoint: str, images: Sequence[str], top_k: int = 5, img_size: Optional[int] = None,
            batch_size: int = 32, workers: int = 0, device: Optional[str] = None, amp: str = 'auto',
            optimize: bool = True, progress: bool = False, pipeline: str = 'timm') -> PredictResult:
    """Top-k classes of image files and of the images under folders.

    Args:
        checkpoint: a fine-tuning run directory, a model directory, a `.safetensors` file, a timm train.py
            checkpoint (`.pth.tar`, read with `weights_only=True`), or a timm model name (pretrained, ImageNet).
        images: image files and folders (searched recursively).
        top_k: classes per image, most likely first (at most the number of classes).
        img_size: input resolution; default the checkpoint's.
        batch_size, workers: of the DataLoader.
        device, amp, optimize, progress: as for `evaluate`.
        pipeline: 'timm' (the model's resize, centre crop, mean/std) or 'keras' (image_dataset_from_directory's
            pixels: squashed to `img_size` with bilinear resizing, no antialiasing, no crop; the model's mean/std).

    Unreadable files are warned about and listed in `skipped`; an animated image is classified on its
    first frame.
    """
    check_checkpoint(checkpoint)
    pipeline = check_pipeline(pipeline)
    check = check_images(image_files_under(images))
    files = check.readable
    if not files:
        raise ResNetV2ZooError(f'no readable image in {", ".join(map(str, images))}')
    torch_device = pick_device(device)
    dtype = resolve_amp(torch_device, amp)
    model = load_classifier(checkpoint)
    activation = output_activation(model)
    logits, _ = predict_samples(prepare_for_inference(model, torch_device, optimize), [(f, 0) for f in files],
                                build_transforms(model, img_size, augment=False, pipeline=pipeline)[1], torch_device,
                                batch_size=batch_size, workers=workers, progress=progress, amp=dtype)
    tops = top_k_labels(logits, label_names_of(model), top_k, activation)
    predictions = [Prediction(f, top) for f, top in zip(files, tops)]
    return PredictResult(predictions, list(check.skipped))


def predict_files(checkpoint: str, paths: Sequence[str], k: int = 5, img_size: Optional[int] = None,
                  batch_size: int = 32, workers: int = 0, **options: Any) -> List[Prediction]:
    """`predict(...).predictions`, under its earlier name."""
    return predict(checkpoint, paths, k, img_size, batch_size, workers, **options).predictions


def run_predict(args: argparse.Namespace) -> None:
    result = predict(args.checkpoint, args.images, args.top_k, args.img_size, args.batch_size, args.workers,
                     device=args.device, amp=args.amp, optimize=args.optimize, progress=args.progress,
                     pipeline=args.pipeline)
    if args.json:
        print(json.dumps([asdict(p) for p in result.predictions], indent=2))
        return
    for prediction in result.predictions:
        print(prediction.path)
        for name, prob in prediction.top:
            print(f'  {100 * prob:6.2f}%  {name}')


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('predict', help='top-k classes of images',
                            formatter_class=DefaultsHelpFormatter,
                            description='Classify image files and folders with a checkpoint (run directory, model '
                                        'directory, .safetensors file, timm train.py .pth.tar, or timm model name '
                                        'for ImageNet).')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_DIR')
    parser.add_argument('--top-k', type=positive_int, default=5,
                        help='classes shown per image (at most the number of classes)')
    parser.add_argument('--img-size', type=image_size, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--pipeline', choices=PIPELINES, default='timm', help=PIPELINE_HELP)
    parser.add_argument('--batch-size', type=positive_int, default=32, help='images per batch')
    parser.add_argument('--workers', type=non_negative_int, default=0, help='DataLoader worker processes')
    parser.add_argument('--json', action='store_true', help='print the predictions as JSON')
    add_inference_options(parser)
    parser.set_defaults(func=run_predict)
