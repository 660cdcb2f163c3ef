"""Keras's image pipeline without TensorFlow: `image_dataset_from_directory`'s pixels and its validation split.

Someone moving from Keras compares our predictions with Keras's on the same photos. timm's eval pipeline
(resize the shorter side with antialiasing, centre crop) feeds the model other pixels, so its probabilities
differ from Keras's even for an exact conversion. `--pipeline keras` feeds the pixels Keras 3's
`keras.utils.image_dataset_from_directory` feeds, and `--split keras` takes the files its
`validation_split=F, subset=..., seed=N` takes (read from keras/src/utils/image_dataset_utils.py and
dataset_utils.py, Keras 3.15):

- decode: `tf.io.decode_image(channels=3, expand_animations=False)`. TensorFlow decodes JPEG with libjpeg's
  fast integer DCT (`dct_method='INTEGER_FAST'` is its default); Pillow uses the accurate one, which differs by
  up to 14 levels (about 1 on average) on real photos. JPEGs are therefore decoded with simplejpeg's
  libjpeg-turbo and `fastdct=True`, which gives TensorFlow's pixels bit for bit; other formats through Pillow
  (alpha dropped, not laid on white; 16-bit grey keeps its high byte), as TensorFlow decodes them.
- resize: `tf.image.resize(img, size, method='bilinear')` with its defaults (no antialiasing, half-pixel centres,
  `crop_to_aspect_ratio=pad_to_aspect_ratio=False`: the image is squashed, never cropped), on float values 0-255.
  `F.interpolate(mode='bilinear', align_corners=False, antialias=False)` computes the same up to float32 round-off.
- then the model's own normalization (timm's convention: x/255, minus mean, over std).
- split: class folders sorted (hidden ones left out), each walked recursively in sorted order for
  .bmp .gif .jpeg .jpg .png files (any case), all concatenated, then shuffled by `np.random.RandomState(seed)`;
  the last `int(F * n)` files are validation, the rest training.

Nothing here imports TensorFlow.
"""
import io
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ResNetV2ZooError

__all__ = ['PIPELINES', 'KERAS_IMAGE_EXTENSIONS', 'KERAS_SUBSETS', 'PIPELINE_HELP', 'check_pipeline',
           'decode_like_tensorflow', 'KerasImageTransform', 'keras_file_index', 'keras_subsets']

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

PIPELINES = ('timm', 'keras')
# keras.src.utils.image_dataset_utils.ALLOWLIST_FORMATS: the only files image_dataset_from_directory lists.
KERAS_IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png')
KERAS_SUBSETS = ('training', 'validation')
PIPELINE_HELP = ("image pipeline: timm (the model's resize, centre crop and mean/std) or keras "
                 '(image_dataset_from_directory\'s: squash to --img-size with bilinear resizing, no antialiasing, '
                 "no crop; JPEGs decoded as TensorFlow does; then the model's mean/std)")


def _simplejpeg() -> Any:
    try:
        import simplejpeg
    except ImportError:
        raise ResNetV2ZooError(
            '--pipeline keras needs simplejpeg to decode JPEGs as TensorFlow does (libjpeg fast integer DCT; '
            'Pillow decodes up to 14 levels apart): pip install simplejpeg') from None
    return simplejpeg


def decode_like_tensorflow(path: PathLike) -> np.ndarray:
    """The RGB uint8 (H, W, 3) array `tf.io.decode_image(data, channels=3, expand_animations=False)` gives.

    The format is read from the content, not the name (a `.jpg` that is a PNG decodes as a PNG), as
    TensorFlow does. Animated GIF/PNG: the first frame.
    """
    with open(path, 'rb') as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == 'JPEG' and img.mode in ('L', 'RGB'):
                return _simplejpeg().decode_jpeg(data, colorspace='RGB', fastdct=True, fastupsample=False)
            if img.format == 'JPEG':
                _logger.warning('%s: a %s JPEG; its pixels may differ from TensorFlow\'s', path, img.mode)
            if img.mode in ('I', 'I;16', 'I;16B', 'I;16L'):  # 16-bit grey: TensorFlow keeps the high byte
                grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(img.convert('RGB'))  # alpha dropped, as channels=3 drops it
    except ResNetV2ZooError:
        raise
    except Exception as e:  # PIL and simplejpeg raise many types; inside a DataLoader this must say which file
        raise ResNetV2ZooError(f'{path}: cannot be decoded ({type(e).__name__}: {e})') from None


class KerasImageTransform:
    """`image_dataset_from_directory`'s pixels, then the model's normalization.

    `ImageSamples` reads each file with `load` (TensorFlow's decode) instead of `load_rgb`, whose alpha lies
    on white; a PIL image (e.g. for the samples figure) is taken as it is.
    """

    def __init__(self, size: Union[int, Sequence[int]], mean: Sequence[float], std: Sequence[float]):
        _simplejpeg()  # refuse now, before any work, if it is missing
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @staticmethod
    def load(path: PathLike) -> torch.Tensor:
        """(3, H, W) uint8, decoded as TensorFlow decodes it."""
        return torch.from_numpy(np.ascontiguousarray(decode_like_tensorflow(path))).permute(2, 0, 1)

    def pixels(self, image: Union[torch.Tensor, Image.Image]) -> torch.Tensor:
        """(3, h, w) float32 0-255: `tf.image.resize(image, size, method='bilinear')`."""
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image.convert('RGB'))).permute(2, 0, 1)
        x = image.to(torch.float32).unsqueeze(0)
        return F.interpolate(x, size=self.size, mode='bilinear', align_corners=False, antialias=False)[0]

    def __call__(self, image: Union[torch.Tensor, Image.Image]) -> torch.Tensor:
        return (self.pixels(image) / 255.0 - self.mean) / self.std

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(size={self.size}, bilinear, no antialias, no crop, '
                f'mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})')


def keras_file_index(directory: PathLike) -> Tuple[List[str], List[int], List[str]]:
    """(file paths, labels, class names) as Keras 3's `index_directory(directory, 'inferred', formats, shuffle=False)`.

    Paths are `os.path.join(directory, class, relative path)`, as Keras forms them (`directory` as given).
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ResNetV2ZooError(f'data folder {directory} does not exist')
    classes = [name for name in sorted(os.listdir(directory))
               if os.path.isdir(os.path.join(directory, name)) and not name.startswith('.')]
    paths: List[str] = []
    labels: List[int] = []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        for root, _, files in sorted(os.walk(class_dir), key=lambda entry: entry[0]):
            for file_name in sorted(files):
                if file_name.lower().endswith(KERAS_IMAGE_EXTENSIONS):
                    relative = os.path.join(name, os.path.relpath(os.path.join(root, file_name), class_dir))
                    paths.append(os.path.join(directory, relative))
                    labels.append(label)
    return paths, labels, classes


def keras_subsets(directory: PathLike, validation_split: float, seed: int
                  ) -> Tuple[Dict[str, Tuple[List[str], List[int]]], List[str]]:
    """({'training': (paths, labels), 'validation': (paths, labels)}, class names) exactly as
    `image_dataset_from_directory(directory, validation_split=validation_split, subset=..., seed=seed)` lists them
    (its `file_paths`), in its order."""
    if not 0.0 < validation_split < 1.0:
        raise ResNetV2ZooError(f'--val-split must be between 0 and 1, got {validation_split}')
    if not 0 <= seed < 2 ** 32:
        raise ResNetV2ZooError(f'--seed {seed}: Keras seeds np.random.RandomState, which takes 0 to 2**32 - 1')
    paths, labels, classes = keras_file_index(directory)
    num_val = int(validation_split * len(paths))  # Keras's own expression, float rounding included
    if num_val == 0:
        raise ResNetV2ZooError(
            f'{directory}: {len(paths)} image file(s) ({" ".join(KERAS_IMAGE_EXTENSIONS)}, the types Keras lists) '
            f'give int({validation_split} * {len(paths)}) = 0 validation images; Keras would leave training empty')
    # dataset_utils.index_directory: the paths (a list) and the labels (an int32 array), each shuffled by a fresh
    # RandomState(seed), which gives both the same permutation.
    np.random.RandomState(seed).shuffle(paths)
    shuffled = np.asarray(labels, dtype=np.int32)
    np.random.RandomState(seed).shuffle(shuffled)
    labels = shuffled.tolist()
    return {'training': (paths[:-num_val], labels[:-num_val]),
            'validation': (paths[-num_val:], labels[-num_val:])}, classes


def check_pipeline(pipeline: Optional[str]) -> str:
    """`pipeline` (None: 'timm'), refused in one line unless it is one of PIPELINES and can run here (checked
    before any model is loaded)."""
    pipeline = pipeline or 'timm'
    if pipeline not in PIPELINES:
        raise ResNetV2ZooError(f'pipeline {pipeline!r}: expected one of {", ".join(PIPELINES)}')
    if pipeline == 'keras':
        _simplejpeg()
    return pipeline
