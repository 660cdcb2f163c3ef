"""`--pipeline keras` and `--split keras` against Keras 3 itself: the pixels, the file lists, the probabilities.

What Keras computes comes from `keras.utils.image_dataset_from_directory` run here (TensorFlow decode and
resize, Keras's index and split); ours from `resnetv2_zoo.train.keras_pipeline`, which imports no TensorFlow.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import timm  # noqa: F401  (torch and timm before TensorFlow: see keras.runtime)
import torch
import torchvision
from PIL import Image
from timm.data import create_transform

import resnetv2_zoo
from resnetv2_zoo.errors import ResNetV2ZooError
from resnetv2_zoo.train.data import load_rgb, load_splits, scan_keras_split
from resnetv2_zoo.train.finetune import finetune_args, setup_run
from resnetv2_zoo.train.keras_pipeline import KerasImageTransform, keras_subsets

# A handful of weather4 photos covering every decode path: RGB JPEGs, a grayscale JPEG, a `.jpeg`, a PNG
# named .jpg, an RGBA PNG (Keras drops alpha), a palette GIF named .jpg.
WEATHER4_PICKS = {
    'cloudy': ['val/cloudy/cloudy1.jpg', 'val/cloudy/cloudy71.jpg', 'val/cloudy/cloudy131.jpg'],
    'rain': ['train/rain/rain141.jpg', 'train/rain/rain22.jpeg', 'val/rain/rain26.jpg'],
    'shine': ['train/shine/shine127.jpg', 'val/shine/shine101.jpg'],
    'sunrise': ['val/sunrise/sunrise30.jpg', 'val/sunrise/sunrise4.jpg'],
}
SIZE = 64
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # Keras 'tf' preprocessing: x / 127.5 - 1


def copy_picks(weather4: Path, root: Path, picks: Dict[str, List[str]] = WEATHER4_PICKS) -> Path:
    for label, files in picks.items():
        (root / label).mkdir(parents=True)
        for name in files:
            shutil.copy(weather4 / name, root / label / Path(name).name)
    return root


def keras_dataset(keras, root: Path, **options):
    return keras.utils.image_dataset_from_directory(str(root), image_size=(SIZE, SIZE), verbose=False, **options)


def keras_pixels(keras, root: Path) -> Dict[str, np.ndarray]:
    """Keras's float32 (H, W, 3) 0-255 images by file path (shuffle=False: in file_paths order)."""
    dataset = keras_dataset(keras, root, shuffle=False, batch_size=64)
    images = np.concatenate([np.asarray(x) for x, _ in dataset])
    return dict(zip(dataset.file_paths, images))


@pytest.mark.keras
@pytest.mark.shared_data
def test_keras_pipeline_pixels_equal_image_dataset_from_directory(weather4, tmp_path):
    from resnetv2_zoo.keras.runtime import import_keras

    keras = import_keras()
    root = copy_picks(weather4, tmp_path / 'photos')
    expected = keras_pixels(keras, root)
    assert len(expected) == 10
    ours = KerasImageTransform(SIZE, MEAN, STD)
    # timm's eval pipeline as resnet50v2_keras's pretrained cfg sets it, at the same size
    timm_eval = create_transform(input_size=(3, SIZE, SIZE), mean=MEAN, std=STD, crop_pct=0.875,
                                 interpolation='bilinear', crop_mode='center')
    diffs, timm_diffs, pil_diffs = [], [], []
    for path, keras_image in expected.items():
        pixels = ours.pixels(ours.load(path)).permute(1, 2, 0).numpy()
        diffs.append(np.abs(pixels - keras_image).max())
        # the model input is the model's normalization of exactly these pixels
        torch.testing.assert_close(ours(ours.load(path)), (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - 0.5) / 0.5,
                                   rtol=0, atol=1e-6)
        # controls: timm's eval pipeline (shorter side, antialiased, centre crop), and Pillow's JPEG decode
        timm_image = (timm_eval(load_rgb(path)) * 0.5 + 0.5) * 255
        timm_diffs.append(np.abs(timm_image.permute(1, 2, 0).numpy() - keras_image).max())
        pil_diffs.append(np.abs(ours.pixels(Image.open(path)).permute(1, 2, 0).numpy() - keras_image).max())
    # The same decode bit for bit; the bilinear resize agrees up to float32 round-off (TensorFlow interpolates as
    # a + (b - a) * t, torch as a * (1 - t) + b * t). Measured on all 223 weather4/val photos: 0 at 64 px,
    # at most 2.7e-3 (of 0-255) at 224 px.
    assert max(diffs) <= 1e-3, diffs
    assert min(timm_diffs) > 20, timm_diffs
    # Pillow decodes JPEG with the accurate DCT, TensorFlow with the fast one: several levels apart
    jpeg = [d for d, path in zip(pil_diffs, expected) if Image.open(path).format == 'JPEG']
    assert min(jpeg) > 1, pil_diffs


def make_synthetic_folder(root: Path) -> Path:
    """Class folders with every case Keras's index has a rule for: file types it takes and ignores (any case),
    hidden files it takes, a hidden class folder it skips, a nested folder it walks."""
    rng = np.random.default_rng(0)
    layout = {
        'b_class': ['x1.png', 'X2.JPG', 'a.jpeg', 'z.bmp', 'skip.webp', 'skip.tif', 'notes.txt', '.hidden.png',
                    'sub/deep1.png', 'sub/deep0.gif'],
        'a_class': [f'img{i}.png' for i in (3, 10, 1, 22, 2)] + ['sub dir/q.png', 'sub/r.png'],
        'c class': [f'{i}.jpg' for i in range(6)],
        '.hidden_class': ['h.png'],
    }
    for label, files in layout.items():
        for name in files:
            path = root / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith('.txt'):
                path.write_text('not an image')
                continue
            image = Image.fromarray(rng.integers(0, 256, (8 + len(name), 9, 3), dtype=np.uint8))
            image.save(path, format={'.jpg': 'JPEG', '.jpeg': 'JPEG', '.tif': 'TIFF'}.get(path.suffix.lower(),
                                                                                            path.suffix[1:].upper()))
    return root


@pytest.mark.keras
@pytest.mark.shared_data
def test_keras_split_file_lists_equal_keras(weather4, tmp_path):
    from resnetv2_zoo.keras.runtime import import_keras

    keras = import_keras()
    synthetic = make_synthetic_folder(tmp_path / 'synthetic')
    for root in (str(weather4 / 'val'), str(synthetic)):
        lists = {}
        for seed in (123, 124):
            train_ds, val_ds = keras.utils.image_dataset_from_directory(
                root, validation_split=0.2, subset='both', seed=seed, image_size=(SIZE, SIZE), verbose=False)
            subsets, classes = keras_subsets(root, 0.2, seed)
            assert classes == train_ds.class_names
            assert subsets['training'][0] == train_ds.file_paths
            assert subsets['validation'][0] == val_ds.file_paths
            # labels: the index of each file's class folder, as Keras labels it
            for paths, labels in subsets.values():
                assert labels == [classes.index(Path(p).relative_to(root).parts[0]) for p in paths]
            lists[seed] = subsets['validation'][0]
        assert lists[123] != lists[124]  # control: the seed decides the split
    # finetune's split (decode-checked samples) and evaluate's subsets keep exactly Keras's lists and labels
    subsets, classes = keras_subsets(str(synthetic), 0.2, 123)
    splits = load_splits(synthetic, val_split=0.2, seed=123, split='keras')
    assert splits.classes == classes == ['a_class', 'b_class', 'c class']
    assert [p for p, _ in splits.train] == subsets['training'][0]
    assert [p for p, _ in splits.val] == subsets['validation'][0]
    assert [t for _, t in splits.val] == subsets['validation'][1]
    assert not splits.skipped and len(splits.train) + len(splits.val) == 20  # .webp .tif .txt and the hidden class out
    stratified = load_splits(synthetic, val_split=0.2, seed=123)
    assert sorted(stratified.val) != sorted(splits.val)


def test_keras_split_refusals(tmp_path):
    root = make_synthetic_folder(tmp_path / 'data')
    with pytest.raises(ResNetV2ZooError, match='0 validation images'):
        keras_subsets(root, 0.01, 123)
    dataset = tmp_path / 'dataset'
    for split in ('train', 'val'):
        shutil.copytree(root, dataset / split)
    with pytest.raises(ResNetV2ZooError, match='--split keras splits one folder'):
        load_splits(dataset, val_split=0.2, seed=123, split='keras')
    (root / 'c class' / '0.jpg').write_bytes(b'\xff\xd8 truncated')  # unreadable: skipped after the split
    training, validation = scan_keras_split(root, 0.2, 123)
    assert [p for p, _ in training.skipped + validation.skipped] == [str(root / 'c class' / '0.jpg')]
    from resnetv2_zoo.train.evaluate import evaluate

    with pytest.MonkeyPatch.context() as mp:  # without simplejpeg, refused up front: Pillow's JPEG pixels differ
        mp.setitem(sys.modules, 'simplejpeg', None)
        with pytest.raises(ResNetV2ZooError, match='needs simplejpeg'):
            KerasImageTransform(SIZE, MEAN, STD)
    with pytest.raises(ResNetV2ZooError, match='needs --val-split F and --seed N'):
        evaluate('resnet50v2_keras', str(root), split='keras', val_split=0.2)
    with pytest.raises(ResNetV2ZooError, match='add --split keras'):
        evaluate('resnet50v2_keras', str(root), seed=123)


@pytest.fixture(scope='module')
def keras_reference(weather4, tmp_path_factory) -> dict:
    """A Keras ResNet50V2 at 64 px with 4 classes and seeded random weights, its conversion, a few weather4
    photos, and Keras's probabilities on them (`image_dataset_from_directory(shuffle=False)`, 'tf' scaling)."""
    from keras_helpers import randomize_weights, save_keras

    from resnetv2_zoo.keras.runtime import import_keras
    from resnetv2_zoo.weights.convert import convert_to_dir

    keras = import_keras()
    model = keras.applications.ResNet50V2(weights=None, include_top=True, classes=4, classifier_activation=None,
                                          input_shape=(SIZE, SIZE, 3))
    randomize_weights(model, seed=3)
    directory = tmp_path_factory.mktemp('keras_reference')
    converted = convert_to_dir(save_keras(model, directory, 'weights_h5'), directory / 'model',
                               label_names=list(WEATHER4_PICKS))
    root = copy_picks(weather4, directory / 'photos')
    dataset = keras_dataset(keras, root, shuffle=False, batch_size=64)
    images, labels = (np.concatenate(parts) for parts in zip(*[(np.asarray(x), np.asarray(y)) for x, y in dataset]))
    probs = softmax(np.asarray(model.predict(images / 127.5 - 1, verbose=0)))
    assert len(set(probs.argmax(1))) > 1  # the checks below would be weak if every image got one class
    validation = keras_dataset(keras, root, validation_split=0.2, subset='validation', seed=123).file_paths
    return dict(converted=str(converted), root=root, paths=dataset.file_paths, classes=dataset.class_names,
                labels=labels, probs=probs, validation=validation)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.shared_data
def test_predict_keras_pipeline_gives_keras_probabilities(keras_reference):
    from resnetv2_zoo.train.predict import predict

    ref = keras_reference

    def probabilities(**options) -> np.ndarray:
        result = predict(ref['converted'], [str(ref['root'])], top_k=4, img_size=SIZE, device='cpu', **options)
        ours = {p.path: dict(p.top) for p in result.predictions}
        return np.array([[ours[path][name] for name in ref['classes']] for path in ref['paths']])

    ours = probabilities(pipeline='keras')
    # measured 9e-7: the same pixels up to resize round-off, the same function up to float32 round-off
    assert np.abs(ours - ref['probs']).max() <= 1e-3
    assert (ours.argmax(1) == ref['probs'].argmax(1)).all()
    # control: timm's pipeline (shorter side, antialiased, centre crop) on the same files (measured 0.075)
    assert np.abs(probabilities() - ref['probs']).max() > 1e-2


@pytest.mark.keras
@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_keras_split_gives_keras_accuracy_on_keras_validation_files(keras_reference, capsys):
    from resnetv2_zoo.cli import main

    ref = keras_reference
    assert len(ref['validation']) == 2  # int(0.2 * 10)
    assert main(['evaluate', ref['converted'], '--data', str(ref['root']), '--img-size', str(SIZE), '--pipeline',
                 'keras', '--split', 'keras', '--val-split', '0.2', '--seed', '123', '--device', 'cpu',
                 '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    index = [ref['paths'].index(p) for p in ref['validation']]
    truth, predicted = ref['labels'][index], ref['probs'][index].argmax(1)
    assert report['num_images'] == 2
    assert report['accuracy'] == float((truth == predicted).mean())
    seen = sorted(set(truth.tolist()) | set(predicted.tolist()))
    assert [c['name'] for c in report['classes']] == [ref['classes'][i] for i in seen]
    assert report['confusion'] == [[int(((truth == t) & (predicted == p)).sum()) for p in seen] for t in seen]


def test_finetune_takes_keras_split_and_pipeline(tmp_path):
    """The run trains and validates on Keras's lists, validating on Keras's pixels; training images get them too
    without augmentation, timm's augmentation with it."""
    root = make_synthetic_folder(tmp_path / 'data')
    subsets, _ = keras_subsets(str(root), 0.2, 7)
    dist = argparse.Namespace(rank=0, world_size=1, distributed=False)
    for augment, train_kind in (('--no-augment', KerasImageTransform), ('--augment', torchvision.transforms.Compose)):
        args = finetune_args(['--data', str(root), '--out', str(tmp_path / 'run'), '--model', 'test_resnet',
                              '--no-pretrained', '--img-size', '32', '--batch-size', '4', '--val-split', '0.2',
                              '--seed', '7', '--split', 'keras', '--pipeline', 'keras', augment])
        run = setup_run(args, dist, torch.device('cpu'), tmp_path / 'run')
        assert [p for p, _ in run.splits.train] == subsets['training'][0]
        assert [p for p, _ in run.splits.val] == subsets['validation'][0]
        assert isinstance(run.eval_transform, KerasImageTransform) and run.eval_transform.size == (32, 32)
        assert isinstance(run.train_set.transform, train_kind)
    default = setup_run(finetune_args(['--data', str(root), '--out', str(tmp_path / 'run'), '--model', 'test_resnet',
                                       '--no-pretrained', '--img-size', '32', '--batch-size', '4']),
                        dist, torch.device('cpu'), tmp_path / 'run')
    assert not isinstance(default.eval_transform, KerasImageTransform)  # control: timm's pipeline by default
    assert sorted(default.splits.val) != sorted(run.splits.val)


@pytest.mark.slow
def test_finetune_run_with_keras_split_and_pipeline(tmp_path):
    root = make_synthetic_folder(tmp_path / 'data')
    subsets, _ = keras_subsets(str(root), 0.2, 123)
    result = resnetv2_zoo.finetune(data=root, out=tmp_path / 'run', epochs=1, model='test_resnet', pretrained=False,
                                   img_size=32, batch_size=4, workers=0, val_split=0.2, seed=123, split='keras',
                                   pipeline='keras', recipe='tutorial')
    assert result.summary['val_images'] == len(subsets['validation'][0]) == 4
    assert result.summary['train_images'] == len(subsets['training'][0]) == 16
    assert result.summary['args']['pipeline'] == 'keras' and result.summary['args']['split'] == 'keras'
    assert result.val_report.num_images == 4
