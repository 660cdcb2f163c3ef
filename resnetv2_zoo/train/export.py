"""`resnetv2-zoo export CHECKPOINT -o model.onnx|model.pt2`: a deployment export, checked against eager.

`export()` is the Python API (`resnetv2_zoo.export`); the command is a thin layer over it. The work
(export, parity check, atomic write, refusing to replace what it did not write) is `weights.export`.
"""
import argparse
from typing import Optional

from ..argtypes import DefaultsHelpFormatter, image_size, positive_int
from ..errors import ResNetV2ZooError
from ..weights.export import DEFAULT_ONNX_OPSET, MIN_ONNX_OPSET, ExportResult, export_model
from .data import data_config_for
from .runtime import check_checkpoint, load_classifier

__all__ = ['export']


def export(checkpoint: str, out: str, dynamic_batch: bool = False, img_size: Optional[int] = None,
           opset: int = DEFAULT_ONNX_OPSET, batch_size: int = 1) -> ExportResult:
    """Export a checkpoint to ONNX (`out` ends in .onnx) or a `torch.export` ExportedProgram (.pt2).

    Args:
        checkpoint: a fine-tuning run directory, a model directory, a `.safetensors` file, a timm train.py
            checkpoint (`.pth.tar`), or a timm model name (pretrained).
        out: the file to write. An existing one is replaced only if resnetv2-zoo wrote it.
        dynamic_batch: a free batch dimension; else the export takes `batch_size` images per call.
        img_size: the square input resolution the export is made for; default the checkpoint's.
        opset: ONNX opset (17 or newer).
        batch_size: the batch size the export is traced and checked at.

    The export is written only after it matches the eager model within 1e-4 * max(1, max|eager|) on a
    random batch (ONNX through onnxruntime on the CPU; a .pt2 loaded back with `torch.export.load`).
    """
    if opset < MIN_ONNX_OPSET:  # before loading anything
        raise ResNetV2ZooError(f'--opset {opset}: the export needs ONNX opset {MIN_ONNX_OPSET} or newer')
    check_checkpoint(checkpoint)
    model = load_classifier(checkpoint).eval()
    input_size = tuple(data_config_for(model, img_size)['input_size'])
    return export_model(model, out, input_size=input_size, dynamic_batch=dynamic_batch, opset=opset,
                        check_batch=batch_size)


def run_export(args: argparse.Namespace) -> None:
    result = export(args.checkpoint, args.output, args.dynamic_batch, args.img_size, args.opset, args.batch_size)
    batch = 'any batch size' if result.dynamic_batch else f'batches of {args.batch_size}'
    opset = f', opset {result.opset}' if result.opset else ''
    print(f'wrote {result.path} ({result.format}{opset}; input {list(result.input_size)}, {batch}); max |export - '
          f'eager| {result.max_abs_diff:.2g} within {result.tolerance:.2g}')


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('export', help='export to ONNX (.onnx) or torch.export (.pt2), checked against eager',
                            formatter_class=DefaultsHelpFormatter,
                            description='Export a checkpoint (run directory, model directory, .safetensors file, timm '
                                        'train.py .pth.tar or timm model name) for deployment: ONNX for onnxruntime '
                                        "(needs pip install 'resnetv2-zoo[export]') or a torch.export "
                                        'ExportedProgram (.pt2, torch.export.load). The export is compared with the '
                                        'eager model before it is written, atomically; an existing output is '
                                        'replaced only if resnetv2-zoo wrote it.')
    parser.add_argument('checkpoint')
    parser.add_argument('-o', '--output', required=True, metavar='FILE', help='model.onnx or model.pt2')
    parser.add_argument('--dynamic-batch', action='store_true', help='accept any batch size')
    parser.add_argument('--batch-size', type=positive_int, default=1,
                        help='the batch size of a fixed-batch export (and of the parity check)')
    parser.add_argument('--img-size', type=image_size, default=None, help="default: the checkpoint's input size")
    parser.add_argument('--opset', type=int, default=DEFAULT_ONNX_OPSET, help=f'ONNX opset, {MIN_ONNX_OPSET} or newer')
    parser.set_defaults(func=run_export)
