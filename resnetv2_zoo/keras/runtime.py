"""The only place that imports Keras, and the order it must be imported in.

With TensorFlow 2.21 and torchvision 0.29.1, `import tensorflow` before `import torchvision` (which
`import timm` does) crashes the interpreter with a segmentation fault; the other order works. So
torch, torchvision and timm are imported first, then Keras on the TensorFlow backend. Loading
weights never comes here: only live-model conversion, `convert --verify`, the parity tests and
the Keras benchmarks do.
"""
import os
from types import ModuleType


def import_keras() -> ModuleType:
    """Import Keras (TensorFlow backend) safely after torch; a clear error if it is not installed."""
    import timm  # noqa: F401  (imports torch and torchvision before TensorFlow)

    os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    try:
        import keras
    except ImportError as e:
        raise ImportError(
            'This needs Keras with TensorFlow: pip install "resnetv2-zoo[keras]" '
            f'(tensorflow-cpu and keras). Import failed with: {e}') from e
    if keras.backend.backend() != 'tensorflow':
        raise ImportError(f'Keras must run on the TensorFlow backend, found {keras.backend.backend()!r}.')
    return keras


def import_tf_keras() -> ModuleType:
    """Import Keras 2 (`tf_keras`) safely after torch, for `--verify` on TensorFlow checkpoints and SavedModels
    (Keras 3 cannot load either); a clear error if it is not installed."""
    import timm  # noqa: F401  (imports torch and torchvision before TensorFlow)

    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    try:
        import tf_keras
    except ImportError as e:
        raise ImportError(
            'This needs Keras 2 to load a TensorFlow checkpoint or SavedModel: pip install "resnetv2-zoo[keras]" '
            f'(tf-keras). Import failed with: {e}') from e
    return tf_keras
