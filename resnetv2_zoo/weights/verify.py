"""`convert --verify`: run Keras on the checkpoint it was given and compare with the converted model.

The only converter code that imports TensorFlow (through `keras.runtime`), and only when asked.
"""
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..errors import ResNetV2ZooError
from ..keras.runtime import import_keras
from ..keras.spec import KERAS_RESNETS
from .convert import ConvertedKeras, build_model

PathLike = Union[str, os.PathLike]
TOLERANCE = 1e-5  # max |keras - ours| <= TOLERANCE * max(1, max |keras|), float32


def parity_tolerance(reference: Union[np.ndarray, torch.Tensor]) -> float:
    """The largest max |reference - ours| that counts as equal: float32 round-off, relative to large outputs."""
    return TOLERANCE * max(1.0, float(abs(reference).max()))


@dataclass
class Verification:
    max_abs_diff: float
    tolerance: float
    output: str  # 'logits' or 'pooled features'

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        verdict = 'PASS' if self.passed else 'FAIL'
        return (f'verify: max |keras - timm| over the {self.output} = {self.max_abs_diff:.3g} '
                f'(tolerance {self.tolerance:.3g}): {verdict}')


def keras_reference_model(arch: str, num_classes: int) -> Any:
    """The Keras model a checkpoint of `arch` loads into: logits with a top, average-pooled features without."""
    app = getattr(import_keras().applications, KERAS_RESNETS[arch].keras_app)
    if num_classes:
        return app(weights=None, include_top=True, classes=num_classes, classifier_activation=None)
    return app(weights=None, include_top=False, pooling='avg', input_shape=(None, None, 3))


def verify_against_keras(source: Union[PathLike, Any], converted: ConvertedKeras, image_size: int = 224,
                         batch_size: int = 2, seed: int = 0) -> Verification:
    """Run Keras (loading `source` its own way) and the converted model on one seeded batch."""
    try:
        if isinstance(source, (str, os.PathLike)):
            keras_model = keras_reference_model(converted.arch, converted.num_classes)
            _keras_load_weights(keras_model, Path(source), converted.metadata['source_format'])
        else:
            keras_model = source
    except ImportError as e:
        raise ResNetV2ZooError(f'--verify needs TensorFlow and Keras: {e}') from e
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    keras_out = np.asarray(keras_model(images.permute(0, 2, 3, 1).numpy(), training=False))
    with torch.no_grad():
        ours = build_model(converted)(images).numpy()
    diff = float(np.abs(keras_out - ours).max()) if keras_out.shape == ours.shape else float('inf')
    return Verification(diff, parity_tolerance(keras_out), 'logits' if converted.num_classes else 'pooled features')


def _keras_load_weights(keras_model: Any, path: Path, source_format: str) -> None:
    """Keras picks the reader by file suffix; link the file under the suffix of the format it really is."""
    suffix = {'weights_h5': '.weights.h5', 'keras_zip': '.keras'}.get(source_format, '.h5')
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / f'model{suffix}'
        link.symlink_to(path.resolve())
        keras_model.load_weights(str(link))
