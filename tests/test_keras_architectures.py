"""Issue 11: Keras checkpoints as people build and save them convert exactly, or are refused with one line.

Every variant of `keras_variants` (eps 1e-3 with small variances, max pooling, hidden-Dense and sigmoid
heads, the base nested two deep or renamed, Rescaling/Normalization input layers, a Keras 2 file) is saved
by Keras as `.keras`, full-model `.h5` and weights-only, converted, and compared with Keras on the same raw
pixels: Keras gets them preprocessed as the model expects, ours gets timm's normalization with the mean/std
the converter recorded, and the converter's recorded final activation. Controls show the comparison would
catch a converter that ignored eps, pooling or the head.
"""
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Optional, Sequence, Tuple

import h5py
import numpy as np
import pytest
import torch
from keras_variants import (
    FULL_FORMATS,
    IMAGE_SIZE,
    NUM_CLASSES,
    VARIANTS,
    WEIGHTS_FORMAT,
    KerasVariants,
    edit_keras_config,
    iter_layer_configs,
    raw_images,
    refused_models,
)

from resnetv2_zoo import cli
from resnetv2_zoo.errors import KerasFileError, ResNetV2ZooError
from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.weights.checkpoint import load_model
from resnetv2_zoo.weights.convert import KerasOptions, build_model, convert_keras, convert_to_dir
from resnetv2_zoo.weights.verify import parity_tolerance

pytestmark = [pytest.mark.keras, pytest.mark.slow,
              pytest.mark.filterwarnings('ignore:You are saving your model as an HDF5 file:UserWarning')]

IMAGES = raw_images(batch_size=2, seed=0)  # raw RGB 0-255, NHWC
LABELS = ['cloudy', 'rain', 'shine', 'sunrise']
ACTIVATIONS = {'linear': lambda x: x, 'softmax': lambda x: x.softmax(-1), 'sigmoid': torch.sigmoid}
DEFAULT_BN_EPS = 1.001e-5  # keras.applications' ResNetV2


def _formats(name: str) -> Tuple[str, ...]:
    return ('h5', WEIGHTS_FORMAT) if VARIANTS[name].keras2 else (*FULL_FORMATS, WEIGHTS_FORMAT)


CASES = [(name, file_format) for name in VARIANTS for file_format in _formats(name)]


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread():
    """One torch thread while this module runs: on the two shared cores, a tiny forward with two threads
    waits for the other processes (measured 0.4-1.2 s vs 0.1 s per 64x64 forward under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def variants(tmp_path_factory):
    """Every variant built on first use and shared by the module; its ~100 MB files are removed at the end."""
    built = KerasVariants(tmp_path_factory.mktemp('keras_variants'))
    yield built
    shutil.rmtree(built.directory, ignore_errors=True)


def _options(variant, file_format: str, **overrides) -> KerasOptions:
    """What the user tells the converter: nothing for a full file, the variant's options for a weights-only one."""
    given = variant.weights_options if file_format == WEIGHTS_FORMAT else {}
    return KerasOptions(**{**given, **overrides})


# --- the parity check, shared by every test ---

def our_outputs(model: torch.nn.Module, output_activation: str, images: np.ndarray) -> np.ndarray:
    """The converted model on raw pixels `images` (NHWC), normalized with the mean/std it records, then the
    final activation the converter read; as `predict` runs it."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean'], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std'], dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0
    with torch.no_grad():
        return ACTIVATIONS[output_activation](model.eval()((x - mean) / std)).numpy()


def parity(model: torch.nn.Module, output_activation: str, keras_out: np.ndarray,
           images: np.ndarray = IMAGES) -> Tuple[float, float]:
    """(max |keras - ours|, the project tolerance)."""
    ours = our_outputs(model, output_activation, images)
    diff = float(np.abs(keras_out - ours).max()) if ours.shape == keras_out.shape else float('inf')
    return diff, parity_tolerance(keras_out)


def assert_parity(converted, keras_out: np.ndarray, images: np.ndarray = IMAGES,
                  model: Optional[torch.nn.Module] = None) -> None:
    """`converted` (or `model`, e.g. loaded back from its directory) gives Keras's outputs within the tolerance."""
    model = build_model(converted) if model is None else model
    diff, tolerance = parity(model, converted.output_activation, keras_out, images)
    assert diff <= tolerance, (f'max |keras - ours| = {diff:.3g} > {tolerance:.3g}; '
                               f'{converted.summary}; model_kwargs {converted.model_kwargs}')


def assert_parity_fails(converted, keras_out: np.ndarray, margin: float = 1000.0, **model_kwargs) -> float:
    """A control: `converted` built with `model_kwargs` changed (say, as a converter ignoring eps would) must
    fail the parity check, by far more than round-off."""
    if model_kwargs:
        converted = dataclasses.replace(converted, model_kwargs={**converted.model_kwargs, **model_kwargs})
    diff, tolerance = parity(build_model(converted), converted.output_activation, keras_out)
    assert diff > margin * tolerance, f'control passed: max |keras - ours| = {diff:.3g}, tolerance {tolerance:.3g}'
    return diff


def test_variants_are_not_vacuous(variants):
    """Keras's outputs differ between the two images and between inputs preprocessed differently, and the
    eps variant's variances are small enough that eps matters."""
    for name in ('bn_eps_1e-3', 'max_predictions', 'sigmoid'):
        out = variants[name].outputs(IMAGES)
        assert np.abs(out[0] - out[1]).max() > 1e-3, name
    flat = variants['max_predictions']
    assert np.abs(flat.outputs(IMAGES, 'tf') - flat.outputs(IMAGES, 'unit')).max() > 1e-2
    model = variants['bn_eps_1e-3'].model
    bns = [layer for layer in model.layers if type(layer).__name__ == 'BatchNormalization']
    assert max(float(layer.moving_variance.numpy().max()) for layer in bns) <= 1e-3
    assert {layer.epsilon for layer in bns} == {1e-3}


# --- every variant x format: exact, and read as what it is (with controls that fail) ---

def _check_bn_eps(converted, variant, file_format: str) -> None:
    assert converted.model_kwargs['bn_eps'] == pytest.approx(1e-3), converted.model_kwargs
    assert re.search(r'0\.001|1e-0?3', converted.summary) and 'softmax' in converted.summary, converted.summary
    if file_format == 'keras':  # a converter ignoring eps: off by far more than round-off
        assert_parity_fails(converted, variant.outputs(IMAGES), bn_eps=DEFAULT_BN_EPS)


def _check_max_pooling(converted, variant, file_format: str) -> None:
    assert converted.model_kwargs.get('global_pool') == 'max', converted.model_kwargs
    assert 'max' in converted.summary, converted.summary
    if file_format == 'keras':  # converted as average pooling, as before issue 11
        assert_parity_fails(converted, variant.outputs(IMAGES), global_pool='avg')


def _check_max_features(converted, variant, file_format: str) -> None:
    assert converted.num_classes == 0 and variant.outputs(IMAGES).shape == (2, 2048)  # pooled features
    _check_max_pooling(converted, variant, file_format)


def _check_hidden_dense(converted, variant, file_format: str) -> None:
    assert converted.model_kwargs.get('head_hidden') == [32], converted.model_kwargs
    assert 'relu' in converted.summary and '32' in converted.summary, converted.summary
    if file_format == WEIGHTS_FORMAT:  # the hidden layer taken as linear: the head is not just the last Dense
        assert_parity_fails(converted, variant.outputs(IMAGES), head_act=['linear'])


CHECKS = {
    'bn_eps_1e-3': _check_bn_eps,
    'max_features': _check_max_features,
    'max_sequential': _check_max_pooling,
    'max_predictions': _check_max_pooling,
    'hidden_dense': _check_hidden_dense,
    'keras2_rich': _check_hidden_dense,
}


@pytest.mark.parametrize('name,file_format', CASES, ids=[f'{n}-{f}' for n, f in CASES])
def test_variant_converts_exactly(variants, name: str, file_format: str):
    variant = variants[name]
    converted = convert_keras(variant.file(file_format), options=_options(variant, file_format))
    assert converted.output_activation == variant.output_act, converted.summary
    assert '\n' not in converted.summary
    if file_format != WEIGHTS_FORMAT:  # the file declares its input shape
        assert tuple(converted.pretrained_cfg['input_size']) == (3, IMAGE_SIZE, IMAGE_SIZE), converted.summary
    assert_parity(converted, variant.outputs(IMAGES))
    if name in CHECKS:
        CHECKS[name](converted, variant, file_format)


@pytest.mark.parametrize('name', ['hidden_dense', 'nested_two_deep'])
def test_live_model_converts_exactly(variants, name: str):
    """A keras.Model in memory, nested, declares its architecture as its file would."""
    variant = variants[name]
    converted = convert_keras(variant.model)
    assert converted.output_activation == variant.output_act
    assert_parity(converted, variant.outputs(IMAGES))


@pytest.mark.parametrize('kind', ['torch', 'caffe', 'raw', 'unit'])  # 'tf', the default, in every weights_h5 case
def test_weights_only_preprocess_option(variants, kind: str):
    """One weights-only file, the Keras model fed each way: `preprocess` names what Keras took, and the
    recorded mean/std (and, for caffe, the stem) reproduce it."""
    variant = variants['max_predictions']
    converted = convert_keras(variant.file(WEIGHTS_FORMAT), options=_options(variant, WEIGHTS_FORMAT, preprocess=kind))
    assert_parity(converted, variant.outputs(IMAGES, preprocess_as=kind))


def test_weights_only_without_its_eps_is_wrong(variants):
    """The tutorial's checkpoint, weights only, converted without saying its eps: wrong, as the issue found;
    the option is what makes it exact."""
    variant = variants['bn_eps_1e-3']
    converted = convert_keras(variant.file(WEIGHTS_FORMAT), options=KerasOptions(output_act='softmax'))
    assert converted.model_kwargs.get('bn_eps', DEFAULT_BN_EPS) == pytest.approx(DEFAULT_BN_EPS)
    assert 'assumed' in converted.summary, converted.summary
    assert_parity_fails(converted, variant.outputs(IMAGES))


# --- refusals: one line, naming the layer, its class and what is supported; nothing written ---

@pytest.fixture(scope='module')
def refused_files(variants) -> dict:
    """The models of `keras_variants.refused_models`, saved as `.keras` and `.h5`."""
    directory = variants.directory / 'refused'
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in refused_models(import_keras()).items():
        for suffix in ('keras', 'h5') if name == 'conv_head' else ('keras',):
            files[name, suffix] = directory / f'{name}.{suffix}'
            model.save(files[name, suffix])
    return files


def _cli_refuses(argv: Sequence[str], out: Path, capsys, *fragments: str) -> str:
    """Run `resnetv2-zoo convert`, expect a non-zero exit with one error line holding `fragments`, and
    nothing at `out` (nor beside it)."""
    before = sorted(out.parent.iterdir())
    code = cli.main(['convert', *map(str, argv), '-o', str(out)])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code != 0, captured
    assert len(lines) == 1 and lines[0].startswith('resnetv2-zoo convert: error:'), captured.err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    assert 'Traceback' not in captured.err
    assert not out.exists() and sorted(out.parent.iterdir()) == before
    return lines[0]


@pytest.mark.parametrize('name,suffix,fragments', [
    ('conv_head', 'keras', ('head_conv', 'Conv2D')),
    ('conv_head', 'h5', ('head_conv', 'Conv2D')),
    ('bn_head', 'keras', ('head_bn', 'BatchNormalization')),
    ('flatten_2x2', 'keras', ('flatten', 'Flatten')),
    ('two_inputs', 'keras', ('input',)),
])
def test_unrepresentable_heads_are_refused(refused_files, tmp_path, capsys, name: str, suffix: str, fragments):
    line = _cli_refuses([refused_files[name, suffix]], tmp_path / 'out', capsys, *fragments)
    if name != 'two_inputs':
        assert 'support' in line.lower(), line


def test_refusal_is_a_keras_file_error(refused_files, tmp_path):
    with pytest.raises(KerasFileError) as info:
        convert_to_dir(refused_files['conv_head', 'keras'], tmp_path / 'out')
    assert isinstance(info.value, ResNetV2ZooError) and '\n' not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _edited(variant, file_format: str, directory: Path, edit) -> Path:
    """A copy of the variant's full-model file whose architecture config is changed by `edit`."""
    src = variant.file(file_format)
    dst = directory / src.name
    if file_format == 'keras':
        return edit_keras_config(src, dst, edit)
    shutil.copyfile(src, dst)
    with h5py.File(dst, 'a') as f:
        config = json.loads(f.attrs['model_config'])
        edit(config)
        f.attrs['model_config'] = json.dumps(config)
    return dst


def _layer(config: dict, class_name: str, name: Optional[str] = None) -> dict:
    return next(layer for layer in iter_layer_configs(config)
                if layer['class_name'] == class_name and (name is None or layer['config']['name'] == name))


@pytest.mark.parametrize('file_format', FULL_FORMATS)
def test_custom_layer_class_is_refused(variants, tmp_path, capsys, file_format: str):
    def custom(config: dict) -> None:
        layer = _layer(config, 'Dropout')
        layer.update(class_name='MyLayer', module='my_pkg', registered_name='my_pkg>MyLayer')

    path = _edited(variants['hidden_dense'], file_format, tmp_path, custom)
    (tmp_path / 'work').mkdir()
    _cli_refuses([path], tmp_path / 'work' / 'out', capsys, 'MyLayer')


@pytest.mark.parametrize('file_format', FULL_FORMATS)
def test_mixed_bn_epsilons_are_refused(variants, tmp_path, capsys, file_format: str):
    def mixed(config: dict) -> None:
        _layer(config, 'BatchNormalization', 'conv3_block1_preact_bn')['config']['epsilon'] = 1e-3

    path = _edited(variants['hidden_dense'], file_format, tmp_path, mixed)  # the base nested in the model
    (tmp_path / 'work').mkdir()
    _cli_refuses([path], tmp_path / 'work' / 'out', capsys, 'conv3_block1_preact_bn', 'BatchNormalization')


@pytest.mark.parametrize('file_format', FULL_FORMATS)
def test_stride_in_the_wrong_block_is_refused(variants, tmp_path, capsys, file_format: str):
    """A hand-built ResNet with the applications' names but timm's stride placement (first block of the stage): the
    weights fit, the outputs would not."""
    def restride(config: dict) -> None:
        _layer(config, 'Conv2D', 'conv3_block4_2_conv')['config']['strides'] = [1, 1]
        _layer(config, 'Conv2D', 'conv3_block1_2_conv')['config']['strides'] = [2, 2]

    path = _edited(variants['hidden_dense'], file_format, tmp_path, restride)
    (tmp_path / 'work').mkdir()
    _cli_refuses([path], tmp_path / 'work' / 'out', capsys, 'conv3_block', '_2_conv', 'strides')


def test_weights_only_nested_head_needs_options(variants, tmp_path, capsys):
    """Two Dense layers and no hidden activation given: the names cannot say what the head computes."""
    path = variants['hidden_dense'].file(WEIGHTS_FORMAT)
    line = _cli_refuses([path], tmp_path / 'out', capsys, "model.save('x.keras')")
    assert 'hidden' in line.lower(), line


# --- --verify: against the model in the file ---

def _cli_convert(argv: Sequence[str], capsys) -> Tuple[int, str]:
    code = cli.main(['convert', *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize('name,file_format', [('nested_two_deep', 'keras'), ('max_predictions', 'h5')])
def test_verify_passes_and_the_directory_loads_back(variants, tmp_path, capsys, name: str, file_format: str):
    """A nested model verifies against itself as Keras loads it; a max-pooled one too (the issue's --verify
    rebuilt an average-pooled reference and passed a wrong conversion). The written directory loads back
    (config.json's model_args: pooling, head) to Keras's outputs."""
    variant = variants[name]
    out = tmp_path / 'out'
    code, text = _cli_convert([variant.file(file_format), '-o', out, '--verify'], capsys)
    assert code == 0, text
    assert 'PASS' in text and (out / 'model.safetensors').is_file(), text
    diff, tolerance = parity(load_model(out), variant.output_act, variant.outputs(IMAGES))
    assert diff <= tolerance, f'loaded back from {out}: max |keras - ours| = {diff:.3g} > {tolerance:.3g}'


def test_verify_mismatch_fails_with_the_figure(variants, tmp_path, capsys):
    """The eps-1e-3 model converted with the default eps forced by --bn-eps (an option overrides the file):
    --verify compares with the model in the file, so it fails, prints the difference, and writes nothing."""
    out = tmp_path / 'out'
    code, text = _cli_convert([variants['bn_eps_1e-3'].file('keras'), '-o', out, '--verify',
                               '--bn-eps', str(DEFAULT_BN_EPS)], capsys)
    assert code != 0, text
    assert 'FAIL' in text and re.search(r'=\s*\d+(\.\d+)?(e[-+]?\d+)?', text), text
    assert 'Traceback' not in text and list(tmp_path.iterdir()) == []


def test_cli_options_for_a_keras2_weights_only_checkpoint(variants, tmp_path, capsys):
    """Keras 2's ModelCheckpoint(save_weights_only=True) file of a fine-tuned model (raw pixels rescaled inside,
    a hidden Dense): the CLI options describe it, the printed line says what was given and what assumed, and
    the directory loads back to Keras's outputs."""
    variant = variants['keras2_rich']
    out = tmp_path / 'out'
    code, text = _cli_convert([variant.file(WEIGHTS_FORMAT), '-o', out, '--preprocess', 'unit', '--hidden-act', 'relu',
                               '--output-act', 'linear'], capsys)
    assert code == 0, text
    summary = [line for line in text.splitlines() if 'relu' in line]
    assert len(summary) == 1 and 'given' in summary[0] and 'assumed' in summary[0], text
    diff, tolerance = parity(load_model(out), variant.output_act, variant.outputs(IMAGES))
    assert diff <= tolerance, f'loaded back from {out}: max |keras - ours| = {diff:.3g} > {tolerance:.3g}'


# --- truthful metadata ---

def _config(out: Path) -> dict:
    return json.loads((out / 'config.json').read_text())


def _notes(config: dict) -> str:
    return ' '.join(config['pretrained_cfg'].get('notes', ()))


def _assert_not_official(config: dict) -> None:
    text = json.dumps(config)
    assert 'tf_in1k' not in text, config['pretrained_cfg']
    notes = _notes(config)
    assert not re.search(r'top-?1|ImageNet weights|\d+(\.\d+)?%', notes), notes


def test_converted_metadata_describes_the_file(variants, tmp_path):
    """A fine-tuned Keras 2 model (Rescaling, nested base, hidden-Dense head): its own input size, mean/std 0/1
    (Rescaling 1/255 of raw pixels), its labels, its source named, no ImageNet claim; it loads back exactly."""
    variant = variants['keras2_rich']
    source = variant.file('h5')
    out = convert_to_dir(source, tmp_path / 'out', label_names=LABELS)
    config = _config(out)
    _assert_not_official(config)
    assert source.name in _notes(config), _notes(config)
    cfg = config['pretrained_cfg']
    assert cfg['input_size'] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert cfg['mean'] == pytest.approx([0.0] * 3) and cfg['std'] == pytest.approx([1.0] * 3)
    assert config.get('label_names', cfg.get('label_names')) == LABELS
    model = load_model(out)
    assert list(model.pretrained_cfg.get('label_names', LABELS)) == LABELS
    diff, tolerance = parity(model, variant.output_act, variant.outputs(IMAGES))
    assert diff <= tolerance, f'loaded back from {out}: max |keras - ours| = {diff:.3g} > {tolerance:.3g}'


def test_weights_only_metadata_records_the_options(variants, tmp_path):
    """The tutorial's weights-only checkpoint with its options: eps, preprocessing and the final activation are
    in config.json, and the directory loads back to Keras's outputs."""
    variant = variants['bn_eps_1e-3']
    source = variant.file(WEIGHTS_FORMAT)
    out = convert_to_dir(source, tmp_path / 'out', options=_options(variant, WEIGHTS_FORMAT))
    config = _config(out)
    _assert_not_official(config)
    assert source.name in _notes(config), _notes(config)
    assert config['model_args']['bn_eps'] == pytest.approx(1e-3), config['model_args']
    cfg = config['pretrained_cfg']
    assert cfg['mean'] == pytest.approx([0.5] * 3) and cfg['std'] == pytest.approx([0.5] * 3)  # tf: [-1, 1]
    assert config['num_classes'] == NUM_CLASSES and 'softmax' in json.dumps(config)
    diff, tolerance = parity(load_model(out), variant.output_act, variant.outputs(IMAGES))
    assert diff <= tolerance, f'loaded back from {out}: max |keras - ours| = {diff:.3g} > {tolerance:.3g}'


def test_adapted_normalization_unbiased_dense_and_activation_layer(variants, tmp_path, capsys):
    """An adapted Normalization (statistics in the weights, an integer `count` beside them), a Dense without bias and
    the sigmoid in its own Activation layer: converted exactly, and `--verify` compares probabilities, since the
    activation is not in the Dense it could switch off."""
    keras = import_keras()
    layers = keras.layers
    normalization = layers.Normalization()
    normalization.adapt(raw_images(batch_size=4, seed=3))
    inputs = keras.Input((IMAGES.shape[1], IMAGES.shape[2], 3))
    x = layers.GlobalAveragePooling2D()(variants.base('maps')(normalization(inputs)))
    dense = layers.Dense(NUM_CLASSES, use_bias=False)
    model = keras.Model(inputs, layers.Activation('sigmoid')(dense(x)))
    dense.set_weights([np.random.default_rng(5).normal(0, 2048 ** -0.5, (2048, NUM_CLASSES)).astype(np.float32)])
    path = tmp_path / 'adapted.keras'
    model.save(path)
    converted = convert_keras(path)
    assert converted.output_activation == 'sigmoid' and 'Normalization' in converted.summary
    assert_parity(converted, np.asarray(model(IMAGES)))
    code, text = _cli_convert([path, '-o', tmp_path / 'out', '--verify'], capsys)
    assert code == 0 and 'probabilities' in text and 'PASS' in text, text
