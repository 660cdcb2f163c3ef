"""Image-folder loading: every PIL mode to RGB, unreadable files skipped and counted, bad layouts refused."""
import logging
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.data import build_transforms, load_rgb, load_splits, scan_image_folder, stratified_split, to_rgb


def solid(mode: str, value, size=(20, 12)) -> Image.Image:
    return Image.new(mode, size, value)


@pytest.mark.parametrize('img, expected', [
    (solid('L', 128), (128, 128, 128)),
    (solid('CMYK', (0, 255, 255, 0)), (255, 0, 0)),
    (solid('RGBA', (10, 20, 30, 255)), (10, 20, 30)),
    (solid('RGBA', (10, 20, 30, 0)), (255, 255, 255)),  # fully transparent: the white background
    (solid('LA', (40, 255)), (40, 40, 40)),
    (solid('I;16', 65535), (255, 255, 255)),  # 16-bit white stays white (Pillow's convert clips to 255 only)
    (solid('I;16', 32896), (128, 128, 128)),
    (solid('I', 257 * 7), (7, 7, 7)),
    (solid('1', 1), (255, 255, 255)),
])
def test_to_rgb_every_mode(img, expected):
    rgb = to_rgb(img)
    assert rgb.mode == 'RGB' and rgb.size == img.size
    assert rgb.getpixel((3, 3)) == expected


def test_palette_with_transparency_goes_onto_white(tmp_path):
    img = Image.new('P', (8, 8), 1)
    img.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    img.info['transparency'] = 1
    img.save(tmp_path / 'p.png')  # also a round trip through a real file, as the loader sees it
    assert load_rgb(tmp_path / 'p.png').getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new('P', (8, 8), 1)
    opaque.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    assert to_rgb(opaque).getpixel((0, 0)) == (200, 10, 10)


def write_folder(root: Path, per_class: dict) -> Path:
    for name, count in per_class.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new('RGB', (16, 16), (i * 20, 100, 50)).save(root / name / f'{i}.jpg')
    return root


def test_unreadable_files_are_skipped_counted_and_warned(tmp_path, caplog):
    root = write_folder(tmp_path / 'data', {'Black Skimmer': 3, 'Cockatoo': 3})
    jpeg = (root / 'Cockatoo' / '0.jpg').read_bytes()
    (root / 'Cockatoo' / 'truncated.jpg').write_bytes(jpeg[: len(jpeg) // 2])
    (root / 'Black Skimmer' / 'notes.jpg').write_text('not an image at all')
    (root / 'Black Skimmer' / 'README.txt').write_text('ignored: not an image file name')
    Image.new('RGB', (16, 16)).save(root / 'Cockatoo' / 'really_png.jpg', format='PNG')  # misnamed but fine
    with caplog.at_level(logging.WARNING, logger='resnetv2_zoo.train.data'):
        scan = scan_image_folder(root)
    assert scan.classes == ['Black Skimmer', 'Cockatoo']
    assert sorted(Path(p).name for p, _ in scan.skipped) == ['notes.jpg', 'truncated.jpg']
    assert len(scan.samples) == 7
    assert 'truncated.jpg' in caplog.text and 'notes.jpg' in caplog.text


def test_empty_class_is_refused(tmp_path):
    root = write_folder(tmp_path / 'data', {'a': 2, 'b': 2})
    (root / 'empty').mkdir()
    with pytest.raises(ResNetV2ZooError, match='empty.*no readable image'):
        scan_image_folder(root)


def test_class_of_only_unreadable_files_is_refused(tmp_path):
    root = write_folder(tmp_path / 'data', {'a': 2, 'b': 2})
    (root / 'c').mkdir()
    (root / 'c' / 'x.png').write_bytes(b'\x89PNG broken')
    with pytest.raises(ResNetV2ZooError, match='c.*no readable image'):
        scan_image_folder(root)


@pytest.mark.parametrize('classes', [{}, {'only': 3}])
def test_fewer_than_two_classes_is_refused(tmp_path, classes):
    root = write_folder(tmp_path / 'data', classes)
    root.mkdir(exist_ok=True)
    with pytest.raises(ResNetV2ZooError, match='at least 2'):
        scan_image_folder(root)


def test_missing_folder_and_mismatched_val_classes(tmp_path):
    with pytest.raises(ResNetV2ZooError, match='does not exist'):
        scan_image_folder(tmp_path / 'nope')
    train = write_folder(tmp_path / 'train', {'a': 2, 'b': 2})
    val = write_folder(tmp_path / 'val', {'a': 1, 'c': 1})
    with pytest.raises(ResNetV2ZooError, match='expected the training classes'):
        load_splits(train, val)


def test_stratified_split_is_seeded_and_per_class():
    samples = [(f'{c}/{i}.jpg', c) for c in range(3) for i in range(10 * (c + 1))]
    train, val = stratified_split(samples, 0.2, seed=1)
    assert (train, val) == stratified_split(samples, 0.2, seed=1)
    assert (train, val) != stratified_split(samples, 0.2, seed=2)
    assert np.bincount([t for _, t in val]).tolist() == [2, 4, 6]
    assert sorted(train + val) == sorted(samples)
    with pytest.raises(ResNetV2ZooError, match='between 0 and 1'):
        stratified_split(samples, 1.0, seed=0)


def test_transforms_use_keras_normalization_and_augment_only_train():
    model = timm.create_model('resnet50v2_keras', num_classes=2)
    train_tf, eval_tf = build_transforms(model, img_size=32, augment=True)
    white, black = Image.new('RGB', (50, 40), 'white'), Image.new('RGB', (50, 40), 'black')
    assert eval_tf(white).shape == (3, 32, 32)
    assert torch.allclose(eval_tf(white), torch.ones(3, 32, 32)) and torch.allclose(eval_tf(black), -torch.ones(1))
    gradient = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).convert('RGB')
    torch.manual_seed(0)
    assert not torch.equal(train_tf(gradient), train_tf(gradient))  # random crops/flips
    assert torch.equal(eval_tf(gradient), eval_tf(gradient))
    plain_train, plain_eval = build_transforms(model, img_size=32, augment=False)
    assert plain_train is plain_eval
