"""The Python API, one function per command: `resnetv2_zoo.evaluate(...)`, `predict`, `export`, `convert`, ...

Each returns a result dataclass and raises `ResNetV2ZooError` (one clear message) on bad input; the
`resnetv2-zoo` commands are thin layers over the same functions. `import resnetv2_zoo` stays light:
the package loads this module, and the heavy ones behind it, on first use of a name (module `__getattr__`).
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .train.demo import DemoResult, demo
from .train.evaluate import Report, evaluate
from .train.export import export
from .train.finetune import FinetuneResult, finetune
from .train.predict import Prediction, PredictResult, predict
from .weights.checkpoint import load_model, read_weights_metadata
from .weights.export import ExportResult
from .weights.pretrained import decode_predictions

__all__ = ['ConvertResult', 'DemoResult', 'ExportResult', 'FinetuneResult', 'Prediction', 'PredictResult', 'Report',
           'convert', 'decode_predictions', 'demo', 'evaluate', 'export', 'finetune', 'load_model', 'predict']

PathLike = Union[str, os.PathLike]


@dataclass
class ConvertResult:
    """What `convert` wrote."""

    path: Path  # the model directory, or the single .safetensors file
    architecture: str
    num_classes: int


def convert(source: PathLike, out: PathLike, arch: str = 'auto', label_names: Optional[Sequence[str]] = None,
            single_file: Optional[bool] = None, allow_nonfinite: bool = False, bn_eps: Optional[float] = None,
            pooling: Optional[str] = None, preprocess: Optional[str] = None, hidden_act: Optional[str] = None,
            output_act: Optional[str] = None) -> ConvertResult:
    """Convert a Keras ResNet checkpoint (.h5, .weights.h5, .keras, TF checkpoint, SavedModel) without TensorFlow.

    Args:
        source: the Keras file or directory (or a live Keras model).
        out: a model directory (timm's save_for_hf layout, loadable as `local-dir:`), or a `.safetensors` file.
        arch: the expected timm architecture, or 'auto' to detect it from the file.
        label_names: one class name per output, stored with the weights.
        single_file: write one self-describing `.safetensors` file; default: when `out` ends in `.safetensors`.
        allow_nonfinite: accept NaN/Inf weights (refused by default).
        bn_eps, pooling, preprocess, hidden_act, output_act: what a weights-only file cannot say (and overrides of
            what a .keras / full .h5 declares), as `resnetv2-zoo convert --bn-eps ...`; see `KerasOptions`.

    The written model is loaded back and checked; an existing output is replaced only if resnetv2-zoo wrote it.
    """
    from .weights.convert import KerasOptions, convert_to_dir, convert_to_file

    if single_file is None:
        single_file = str(out).endswith('.safetensors')
    write = convert_to_file if single_file else convert_to_dir
    options = KerasOptions(bn_eps, pooling, preprocess, hidden_act, output_act)
    path = Path(write(source, out, arch=arch, label_names=label_names, allow_nonfinite=allow_nonfinite,
                      options=options))
    metadata = read_weights_metadata(path if single_file else path / 'model.safetensors')
    return ConvertResult(path, metadata['architecture'], int(metadata['num_classes']))
