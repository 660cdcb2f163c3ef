"""Issue 11's migration story end to end, as a Keras user lives it (README "Coming from Keras").

The tutorial code (keras_tutorial.py; README.md's own block once it is there) builds ResNet50V2 by hand with
Keras's default `BatchNormalization()` (epsilon 1e-3), trains it from scratch for one epoch on raw 0-255 pixels
of a few weather4 photos, and checkpoints it with `ModelCheckpoint(save_weights_only=True)`. The README's commands
then convert that file, evaluate it on Keras's validation split with Keras's pixels, and fine-tune it one more
epoch in PyTorch. Keras's numbers must come back: `model.evaluate`'s accuracy exactly, `model.predict`'s
probabilities within 1e-3 (the same pixels up to resize round-off, the same function up to float32 round-off).

One epoch from scratch leaves the BatchNorm moving statistics near their initial 0 and 1: the probabilities
saturate to 0 and 1, and epsilon 1e-3 and 1.001e-5 give nearly the same outputs. So, as a longer training would,
the statistics are first set to those of the training images (one training-mode pass), then every variance is
redrawn small (1e-3 to 1e-2) with its gamma rescaled so that the model computes the same function. Epsilon then
matters, and the control, the conversion without `--bn-eps`, must be far from Keras.
"""
import contextlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import timm  # noqa: F401  (torch and timm before TensorFlow: see keras.runtime)
import torch
from keras_helpers import save_keras
from keras_tutorial import tutorial_code, tutorial_commands, with_sizes

from resnetv2_zoo.cli import main
from resnetv2_zoo.keras.spec import KERAS_RESNETS, keras_layer_names
from resnetv2_zoo.train.keras_pipeline import keras_subsets
from resnetv2_zoo.weights.checkpoint import load_model

pytestmark = [pytest.mark.keras, pytest.mark.slow, pytest.mark.shared_data,
              # tf.data's own functions stay graphs under run_functions_eagerly (below), as intended here
              pytest.mark.filterwarnings('ignore:Even though the `tf.config.experimental_run_functions_eagerly`'),
              # Keras's own notice on the tutorial's model.fit(train_ds) (the dataset shuffles itself)
              pytest.mark.filterwarnings('ignore:`shuffle=True` was passed, but will be ignored')]

SIZE, BATCH, PER_CLASS = 64, 8, 8
SEED, VAL_SPLIT = 123, 0.2  # the tutorial's, in its code and in its commands
CODE_SIZES = dict(IMG_SIZE=SIZE, BATCH_SIZE=BATCH, EPOCHS=1)
COMMAND_SIZES = {'--img-size': str(SIZE)}
KERAS_BN_EPS = 1e-3  # BatchNormalization()'s default
APPLICATIONS_BN_EPS = 1.001e-5  # what the converter assumes without --bn-eps


@dataclass
class Tutorial:
    """The tutorial run in `root` (the working directory of its code and commands) and Keras's results."""

    root: Path
    commands: Dict[str, List[str]]  # the README's resnetv2-zoo commands at SIZE, by sub-command
    classes: List[str]
    val_files: List[str]  # Keras's validation files (val_ds.file_paths), in its order
    labels: np.ndarray  # their labels
    probs: np.ndarray  # Keras's model.predict on them, in that order
    accuracy: float  # Keras's model.evaluate(val_ds) accuracy
    keras2_h5: Path  # the same weights in Keras 2's .h5 layout (ModelCheckpoint('best_model.h5') in Keras 2)
    converted: Path  # the README's `convert` output
    summary: str  # what that `convert` printed
    seconds: Dict[str, float]


def cli(argv: List[str]) -> str:
    """`resnetv2-zoo ARGV` in this process; its stdout (it must succeed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, f'resnetv2-zoo {" ".join(argv)} exited {code}'
    return out.getvalue()


def link_photos(source: Path, root: Path, per_class: int) -> Path:
    """Class folders of symbolic links to the first `per_class` photos of each class of `source` (never copied)."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (root / class_dir.name).mkdir(parents=True)
        for photo in sorted(class_dir.iterdir())[:per_class]:
            (root / class_dir.name / photo.name).symlink_to(photo)
    return root


def recalibrate_bn(keras: Any, model: Any, images: np.ndarray) -> None:
    """Set every BatchNorm's moving statistics to those of its inputs on `images` (one training-mode pass with
    momentum 0), as a long training run leaves them: one epoch leaves them near their initial 0 and 1, and the
    probabilities saturate to 0 and 1, where a wrong conversion hardly shows."""
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum


def shrink_bn_variances(keras: Any, model: Any, seed: int = 0) -> int:
    """Redraw every BatchNorm moving variance in [1e-3, 1e-2] and scale its gamma by sqrt((new + eps) / (old + eps)):
    the same function, but now epsilon is of the variances' order. Returns the number of BatchNorms."""
    rng = np.random.default_rng(seed)
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in layers:
        assert layer.epsilon == KERAS_BN_EPS, (layer.name, layer.epsilon)
        gamma, beta, mean, variance = layer.get_weights()
        small = rng.uniform(1e-3, 1e-2, variance.shape)
        gamma = gamma * np.sqrt((small + layer.epsilon) / (variance + layer.epsilon))
        layer.set_weights([v.astype(np.float32) for v in (gamma, beta, mean, small)])
    return len(layers)


@pytest.fixture(scope='module')
def tutorial(weather4, tmp_path_factory) -> Tutorial:
    """The tutorial's Keras code and its `convert` command, run once for the module."""
    from resnetv2_zoo.keras.runtime import import_keras

    keras = import_keras()
    import tensorflow as tf

    root = tmp_path_factory.mktemp('tutorial')
    link_photos(weather4 / 'train', root / 'photos', PER_CLASS)
    seconds = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the tutorial's paths (photos, best.weights.h5) are relative, as a user types them
        keras.utils.set_random_seed(0)
        # Eager execution: the same computation up to float32 round-off, without tf.function's tracing of a
        # 190-layer model, which takes half a minute on a busy 2-core machine for a few steps of work.
        eager = tf.config.functions_run_eagerly()
        tf.config.run_functions_eagerly(True)
        try:
            start = time.perf_counter()
            namespace: Dict[str, Any] = {}
            exec(compile(with_sizes(tutorial_code(), CODE_SIZES), 'README.md: Coming from Keras', 'exec'), namespace)
            seconds['keras tutorial (build, 1 epoch, evaluate)'] = time.perf_counter() - start
            model, val_ds = namespace['model'], namespace['val_ds']
            # hand-built, with keras.applications' layer names (those with weights, in its order)
            assert [layer.name for layer in model.layers if layer.weights] == keras_layer_names(
                KERAS_RESNETS['resnet50v2_keras'].block_counts, include_top=True)
            # The validation files in a fixed order: subset='both' leaves validation unshuffled (file_paths order);
            # subset='validation' would shuffle them, and shuffle=False would not shuffle the index before splitting
            # (other files).
            _, ordered = keras.utils.image_dataset_from_directory(
                'photos', validation_split=VAL_SPLIT, subset='both', seed=SEED, image_size=(SIZE, SIZE),
                batch_size=BATCH, verbose=False)
            assert ordered.file_paths == val_ds.file_paths
            labels = np.concatenate([np.asarray(y) for _, y in ordered])
            recalibrate_bn(keras, model, np.concatenate([np.asarray(x) for x, _ in namespace['train_ds']]))
            trained = model.predict(ordered, verbose=0)
            assert shrink_bn_variances(keras, model) == 49  # every BatchNorm of ResNet50V2
            probs = model.predict(ordered, verbose=0)
            assert np.abs(probs - trained).max() <= 1e-4  # the same function
            _, accuracy = model.evaluate(val_ds, verbose=0)
            # informative probabilities: most images are not saturated to 0 and 1, where differences vanish
            assert (probs.max(1) < 0.99).mean() >= 0.5, probs
            # checkpoint both ways: as ModelCheckpoint(save_weights_only=True) writes it in Keras 3 (its hooks,
            # over the tutorial's file) and in Keras 2's .h5 layout
            checkpoint = keras.callbacks.ModelCheckpoint('best.weights.h5', save_weights_only=True)
            checkpoint.set_model(model)
            checkpoint.on_epoch_end(0, logs={})
            (root / 'keras2').mkdir()
            keras2_h5 = save_keras(model, root / 'keras2', 'legacy_h5_weights')
        finally:
            tf.config.run_functions_eagerly(eager)
        commands = tutorial_commands(COMMAND_SIZES)
        start = time.perf_counter()
        summary = cli(commands['convert'])
        seconds['convert'] = time.perf_counter() - start
    converted = root / commands['convert'][commands['convert'].index('-o') + 1]
    return Tutorial(root=root, commands=commands, classes=list(val_ds.class_names),
                    val_files=list(val_ds.file_paths), labels=labels, probs=probs, accuracy=float(accuracy),
                    keras2_h5=keras2_h5, converted=converted, summary=summary, seconds=seconds)


def probabilities(tutorial: Tutorial, model_dir: Path) -> np.ndarray:
    """`predict --pipeline keras` on Keras's validation files: (files, classes) in Keras's order."""
    out = cli(['predict', str(model_dir), *tutorial.val_files, '--pipeline', 'keras', '--img-size', str(SIZE),
               '--top-k', str(len(tutorial.classes)), '--json', '--device', 'cpu', '--no-progress'])
    found = {os.path.realpath(p['path']): dict(p['top']) for p in json.loads(out)}
    return np.array([[found[os.path.realpath(path)][name] for name in tutorial.classes]
                     for path in tutorial.val_files])


def check_accuracy(tutorial: Tutorial, accuracy: float) -> None:
    """`accuracy` is Keras's `model.evaluate` accuracy (a float32 mean: the counts of correct images are compared)."""
    n = len(tutorial.val_files)
    assert round(accuracy * n) == round(tutorial.accuracy * n)
    assert accuracy == pytest.approx(tutorial.accuracy, abs=1e-6)


def check_probabilities(tutorial: Tutorial, model_dir: Path) -> float:
    """`predict --pipeline keras` gives Keras's top-1 and accuracy; returns the largest probability difference."""
    probs = probabilities(tutorial, model_dir)
    assert (probs.argmax(1) == tutorial.probs.argmax(1)).all()
    check_accuracy(tutorial, float((probs.argmax(1) == tutorial.labels).mean()))
    return float(np.abs(probs - tutorial.probs).max())


def test_readme_commands_give_keras_numbers(tutorial, monkeypatch):
    monkeypatch.chdir(tutorial.root)
    # the converter says what it was given and what it assumed: the weights-only file cannot say eps or pixels
    assert 'BatchNorm eps 0.001 (given)' in tutorial.summary and 'preprocessing raw (given)' in tutorial.summary
    config = json.loads((tutorial.converted / 'config.json').read_text())
    assert config['model_args']['bn_eps'] == KERAS_BN_EPS
    assert config['label_names'] == tutorial.classes
    # Keras's validation split is reproduced file for file
    subsets, classes = keras_subsets('photos', VAL_SPLIT, SEED)
    assert classes == tutorial.classes and subsets['validation'][0] == tutorial.val_files
    assert len(tutorial.val_files) == int(VAL_SPLIT * PER_CLASS * len(classes))
    report = json.loads(cli(tutorial.commands['evaluate'] + ['--json', '--device', 'cpu', '--no-progress']))
    assert report['num_images'] == len(tutorial.val_files)
    check_accuracy(tutorial, report['accuracy'])
    # the same confusion matrix as Keras's predictions give, over the classes seen
    truth, predicted = tutorial.labels, tutorial.probs.argmax(1)
    seen = sorted(set(truth.tolist()) | set(predicted.tolist()))
    assert [c['name'] for c in report['classes']] == [tutorial.classes[i] for i in seen]
    assert report['confusion'] == [[int(((truth == t) & (predicted == p)).sum()) for p in seen] for t in seen]
    difference = check_probabilities(tutorial, tutorial.converted)
    print(f'Keras 3 .weights.h5: max |p - p_keras| = {difference:.2e}; {tutorial.seconds}')
    assert difference <= 1e-3


def test_keras2_h5_checkpoint_gives_keras_numbers(tutorial, monkeypatch):
    monkeypatch.chdir(tutorial.root)
    argv = tutorial.commands['convert']
    argv = ['convert', str(tutorial.keras2_h5), '-o', 'keras2_model'] + argv[argv.index('-o') + 2:]
    summary = cli(argv)
    assert 'legacy_h5_weights' in summary and 'BatchNorm eps 0.001 (given)' in summary
    difference = check_probabilities(tutorial, Path('keras2_model'))
    print(f'Keras 2 .h5: max |p - p_keras| = {difference:.2e}')
    assert difference <= 1e-3


def test_conversion_without_bn_eps_is_far_from_keras(tutorial, monkeypatch):
    """The control: the tutorial's checkpoint converted without --bn-eps (so with keras.applications' 1.001e-5) gives
    probabilities far from Keras's; the checks above would catch a converter that ignores the option."""
    monkeypatch.chdir(tutorial.root)
    argv = list(tutorial.commands['convert'])
    del argv[argv.index('--bn-eps'):argv.index('--bn-eps') + 2]
    argv[argv.index('-o') + 1] = 'no_eps_model'
    summary = cli(argv)
    assert f'BatchNorm eps {APPLICATIONS_BN_EPS} (assumed)' in summary
    assert json.loads(Path('no_eps_model/config.json').read_text())['keras_conversion']['bn_eps'] == APPLICATIONS_BN_EPS
    difference = np.abs(probabilities(tutorial, Path('no_eps_model')) - tutorial.probs).max()
    print(f'without --bn-eps: max |p - p_keras| = {difference:.3f}')
    assert difference > 0.1


def test_finetune_converted_model_one_more_epoch(tutorial, monkeypatch):
    monkeypatch.chdir(tutorial.root)
    argv = tutorial.commands['finetune'] + ['--epochs', '1', '--batch-size', str(BATCH), '--device', 'cpu']
    cli(argv)
    run = Path(argv[argv.index('--out') + 1])
    summary = json.loads((run / 'summary.json').read_text())
    subsets, _ = keras_subsets('photos', VAL_SPLIT, SEED)
    assert summary['train_images'] == len(subsets['training'][0])
    assert summary['val_images'] == len(tutorial.val_files)
    assert summary['args']['split'] == summary['args']['pipeline'] == 'keras'
    assert summary['epochs'] == 1
    tuned, start = load_model(run / 'best'), load_model(tutorial.converted)
    # the Keras model's epsilon and pixel scaling carry over; the weights moved
    assert tuned.pretrained_cfg['mean'] == start.pretrained_cfg['mean']
    assert tuned.pretrained_cfg['std'] == start.pretrained_cfg['std']
    assert {m.eps for m in tuned.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {KERAS_BN_EPS}
    before, after = start.state_dict(), tuned.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
