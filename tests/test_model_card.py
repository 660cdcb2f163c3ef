"""Every saved model directory carries a README.md model card in the Hub's layout: YAML front matter for the Hub,
usage that runs, the plain statement about timm's "Unknown model", and where the weights came from."""
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from keras_helpers import write_legacy_h5

import resnetv2_zoo  # noqa: F401  (registers the models with timm)
from resnetv2_zoo.cli import main
from resnetv2_zoo.weights import convert as convert_module
from resnetv2_zoo.weights.checkpoint import (
    CONFIG_NAME,
    README_NAME,
    WEIGHTS_NAME,
    is_own_model_card,
    save_model_dir,
    update_model_card,
)
from resnetv2_zoo.weights.verify import Verification

ARCH = 'resnet50v2_keras'


def front_matter(card: str) -> dict:
    assert card.startswith('---\n'), card[:80]
    return yaml.safe_load(card.split('---\n')[1])


def python_block(card: str) -> str:
    (code,) = re.findall(r'```python\n(.*?)```', card, flags=re.S)
    return code


@pytest.fixture(scope='module')
def keras_file(tmp_path_factory) -> Path:
    """A headless ResNet50V2 as a Keras 2 `.h5` written with h5py (no TensorFlow)."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=0)
    return write_legacy_h5(model.state_dict(), ARCH, tmp_path_factory.mktemp('keras') / 'resnet50v2_notop.h5',
                           'float16')


@pytest.fixture(scope='module')
def converted(keras_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('converted') / 'resnet50v2-notop'
    assert main(['convert', str(keras_file), '-o', str(out)]) == 0
    return out


def test_converted_directory_has_a_card_with_source_and_digest(converted, keras_file):
    assert sorted(p.name for p in converted.iterdir()) == sorted([CONFIG_NAME, README_NAME, WEIGHTS_NAME])
    card = (converted / README_NAME).read_text()
    meta = front_matter(card)
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    assert meta['license'] == 'apache-2.0'  # resnet50v2_keras's pretrained_cfg license
    assert {'image-classification', 'timm', 'keras', 'resnetv2-zoo'} <= set(meta['tags'])
    assert 'pip install resnetv2-zoo' in card and 'import resnetv2_zoo' in card
    assert "timm.create_model('local-dir:resnet50v2-notop', pretrained=True)" in card and "'hf-hub:" in card
    assert 'raises `RuntimeError: Unknown model (resnet50v2_keras)`' in card and 'cannot be changed' in card
    digest = hashlib.sha256(keras_file.read_bytes()).hexdigest()
    assert f'`{keras_file.name}`' in card and f'SHA-256 of the source: `{digest}`' in card
    assert 'Parity with Keras: not checked' in card  # no --verify: the card says so instead of a figure
    assert is_own_model_card(converted / README_NAME)


@pytest.mark.slow
def test_card_usage_runs_and_timm_alone_says_unknown_model(converted, monkeypatch):
    """The card's snippet loads the folder, and its warning is true: plain timm cannot."""
    monkeypatch.chdir(converted.parent)
    namespace = {}
    exec(python_block((converted / README_NAME).read_text()), namespace)
    assert namespace['model'].num_classes == 0 and namespace['config']['input_size'] == (3, 224, 224)
    proc = subprocess.run([sys.executable, '-c', f"import timm; timm.create_model('local-dir:{converted}', "
                                                 "pretrained=True)"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and 'Unknown model (resnet50v2_keras)' in proc.stderr


def test_verified_conversion_quotes_the_parity_figure(keras_file, tmp_path, monkeypatch):
    """--verify (Keras itself is stood in for: the figure is what the card must quote)."""
    monkeypatch.setattr('resnetv2_zoo.weights.verify.verify_against_keras',
                        lambda source, converted: Verification(2.5e-6, 1.2e-5, 'pooled features'))
    out = convert_module._convert_and_write(keras_file, tmp_path / 'verified', 'auto', None, single_file=False,
                                            verify=True)
    card = (out / README_NAME).read_text()
    assert 'Parity with Keras (`--verify`): max |keras - timm| over the pooled features = 2.5e-06 (tolerance 1.2e-05)' \
        in card
    assert 'not checked' not in card


def test_finetuned_directory_card_has_data_and_metrics(tmp_path):
    model = timm.create_model(ARCH, num_classes=3)
    facts = dict(val_acc='0.875000', epoch='4', epochs='6', finetune_data='weather4', finetune_weights='pretrained',
                 train_images='674', val_images='223', img_size='224')
    best = save_model_dir(model, tmp_path / 'best', ['cloudy', 'rain', 'shine'], facts)
    card = (best / README_NAME).read_text()
    meta = front_matter(card)
    assert meta['library_name'] == 'timm' and meta['pipeline_tag'] == 'image-classification'
    assert 'keras' in meta['tags'] and meta['license'] == 'apache-2.0'
    assert '3 classes: `cloudy`, `rain`, `shine`' in card
    assert 'on the image folder `weather4`: 674 training images, 223 validation images, at 224 x 224 pixels' in card
    assert '| validation accuracy (best epoch) | 87.5% |' in card and '| best epoch | 4 of 6 |' in card
    assert 'test accuracy' not in card
    assert update_model_card(best, dict(test_acc='0.8', test_images='224'))
    card = (best / README_NAME).read_text()
    assert '| test accuracy (`test/`, best epoch) | 80.0% on 224 images |' in card and is_own_model_card(
        best / README_NAME)
    front_matter(card)


def test_card_for_a_plain_timm_model_does_not_claim_keras(tmp_path):
    model = timm.create_model('resnet18', num_classes=2)  # ImageNet mean and std
    out = save_model_dir(model, tmp_path / 'small', ['a', 'b'], dict(val_acc='0.5', epoch='1'))
    card = (out / README_NAME).read_text()
    meta = front_matter(card)
    assert 'keras' not in meta['tags'] and 'timm' in meta['tags']
    assert 'Unknown model' not in card and 'normalized with mean [0.485, 0.456, 0.406]' in card


def test_our_card_is_regenerated_but_an_edited_or_foreign_readme_is_kept(tmp_path):
    model = timm.create_model(ARCH, num_classes=2)
    out = save_model_dir(model, tmp_path / 'm', ['a', 'b'], dict(val_acc='0.5', epoch='1'))
    save_model_dir(model, out, ['a', 'b'], dict(val_acc='0.75', epoch='2'))
    assert '| validation accuracy (best epoch) | 75.0% |' in (out / README_NAME).read_text()  # ours: regenerated
    edited = (out / README_NAME).read_text().replace('## Usage', '## Usage (see also our wiki)')
    (out / README_NAME).write_text(edited)
    assert not is_own_model_card(out / README_NAME)
    save_model_dir(model, out, ['a', 'b'], dict(val_acc='0.9', epoch='3'))
    assert (out / README_NAME).read_text() == edited  # edited: kept as it is
    assert not update_model_card(out, dict(test_acc='0.5')) and (out / README_NAME).read_text() == edited
    (out / README_NAME).write_text('# my own card\n')
    save_model_dir(model, out, ['a', 'b'], dict(val_acc='0.9', epoch='3'))
    assert (out / README_NAME).read_text() == '# my own card\n'
    # written with the rest: no temporary or partial file left beside it
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, README_NAME, WEIGHTS_NAME])
    assert sorted(os.listdir(tmp_path)) == ['m']
