"""`resnetv2-zoo evaluate CHECKPOINT --data DIR`: accuracy, per-class precision/recall/F1, confusion matrix."""
import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import ResNetV2ZooError
from .data import ImageSamples, build_transforms, scan_image_folder
from .runtime import label_names_of, load_classifier, pick_device, predict_loader, prepare_for_device

__all__ = ['ClassReport', 'Report', 'classification_report', 'format_report', 'evaluate_folder']


@dataclass
class ClassReport:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Report:
    accuracy: float
    num_images: int
    classes: List[ClassReport]
    confusion: List[List[int]]  # rows: true class, columns: predicted class

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def confusion_matrix(predicted: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(targets * num_classes + predicted, minlength=num_classes ** 2).view(num_classes, num_classes)


def classification_report(predicted: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str]) -> Report:
    matrix = confusion_matrix(predicted, targets, len(class_names)).double()
    hits = matrix.diagonal()
    precision = hits / matrix.sum(0).clamp(min=1)
    recall = hits / matrix.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    classes = [ClassReport(name, float(p), float(r), float(f), int(n))
               for name, p, r, f, n in zip(class_names, precision, recall, f1, matrix.sum(1))]
    return Report(float(hits.sum() / max(len(targets), 1)), len(targets), classes, matrix.long().tolist())


def format_report(report: Report) -> str:
    width = max(12, *(len(c.name) for c in report.classes))
    lines = [f'accuracy {100 * report.accuracy:.2f}% on {report.num_images} images', '',
             f'{"class":<{width}}  precision  recall     f1  support']
    lines += [f'{c.name:<{width}}  {c.precision:9.3f}  {c.recall:6.3f}  {c.f1:5.3f}  {c.support:7d}'
              for c in report.classes]
    lines += ['', 'confusion matrix (rows: true, columns: predicted)',
              ' ' * width + '  ' + ' '.join(f'{i:>5d}' for i in range(len(report.classes)))]
    lines += [f'{c.name:<{width}}  ' + ' '.join(f'{n:5d}' for n in row)
              for c, row in zip(report.classes, report.confusion)]
    return '\n'.join(lines)


def evaluate_folder(checkpoint: str, data: str, batch_size: int = 32, workers: int = 0,
                    img_size: Optional[int] = None) -> Report:
    """Evaluate a checkpoint on an ImageFolder tree whose class folders are (some of) its label names."""
    model = load_classifier(checkpoint)
    names = label_names_of(model)
    scan = scan_image_folder(data)
    unknown = sorted(set(scan.classes) - set(names))
    if unknown:
        raise ResNetV2ZooError(f'{data} has class folders {unknown} that {checkpoint} does not know; '
                               f'its classes are {names}')
    samples = [(path, names.index(scan.classes[t])) for path, t in scan.samples]
    device = pick_device()
    loader = torch.utils.data.DataLoader(ImageSamples(samples, build_transforms(model, img_size, augment=False)[1]),
                                         batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == 'cuda')
    logits, targets = predict_loader(prepare_for_device(model, device), loader, device)
    return classification_report(logits.argmax(1), targets, names)


def run_evaluate(args: argparse.Namespace) -> None:
    report = evaluate_folder(args.checkpoint, args.data, args.batch_size, args.workers, args.img_size)
    if args.plot:
        from .plots import save_confusion

        save_confusion(torch.tensor(report.confusion), [c.name for c in report.classes], args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
        if args.plot:
            print(f'\nconfusion matrix plot: {args.plot}')


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('evaluate', help='accuracy, per-class precision/recall/F1 and confusion matrix',
                            description='Evaluate a checkpoint (run directory, model directory, .safetensors file '
                                        'or timm model name) on an ImageFolder tree.')
    parser.add_argument('checkpoint')
    parser.add_argument('--data', required=True, help='folder of class folders (names as the checkpoint knows them)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=0, help='DataLoader worker processes')
    parser.add_argument('--img-size', type=int, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--plot', default='confusion.png', help='confusion matrix PNG path ("" for none)')
    parser.add_argument('--json', action='store_true', help='print the report as JSON')
    parser.set_defaults(func=run_evaluate)
