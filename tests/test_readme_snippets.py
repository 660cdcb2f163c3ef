"""Every ```python snippet in README.md runs, as a reader would run it, offline.

Each snippet runs in its own process (`python -c`, forked already imported: tests/children.py), after the
import lines of the snippets above it (a reader who follows the README has run those); a snippet that uses a
name it does not define (`model` from the one above) runs after the snippet above it, as in the reader's
session. It runs in a temporary working directory that holds what the snippets name:

  birds_model/   a model directory (resnet50v2_keras, 3 classes: cardinal, blue jay, robin; seeded weights)
  photo.jpg      a small photo
  data/          an image folder with train/, val/ and test/ splits of the same 3 classes
  resnet50v2_weights_tf_dim_ordering_tf_kernels.h5
                 the official Keras file's layout with seeded weights (written only when a snippet names it)

`pretrained=True` resolves from a temporary `RESNETV2_ZOO_CACHE` holding converted seeded-random weights of
each architecture a snippet names, with downloads off (`HF_HUB_OFFLINE=1`), so nothing reaches the network.
A snippet that fails is reported with its README line and its error: README must change, or the code.
"""
import ast
import builtins
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from children import run_python
from PIL import Image
from timm.data import ImageNetInfo

import resnetv2_zoo  # noqa: F401  (registers the models)
from resnetv2_zoo.keras.spec import KERAS_RESNETS
from resnetv2_zoo.weights.checkpoint import save_model_dir

README = Path(__file__).resolve().parents[1] / 'README.md'
KERAS_FILE = 'resnet50v2_weights_tf_dim_ordering_tf_kernels.h5'
BIRDS = ('cardinal', 'blue jay', 'robin')


# The "Coming from Keras" tutorial trains a Keras model: tests/test_migration.py runs it (small), not this file.
KERAS_SECTION = ('<!-- coming-from-keras:start -->', '<!-- coming-from-keras:end -->')


def python_snippets(text: str):
    """(first line number, code) of each ```python block, but those of the Keras tutorial (see KERAS_SECTION)."""
    snippets, lines = [], text.splitlines()
    start, in_keras = None, False
    for number, line in enumerate(lines, 1):
        if line.strip() in KERAS_SECTION:
            in_keras = line.strip() == KERAS_SECTION[0]
        elif in_keras:
            continue
        elif start is None and line.strip() == '```python':
            start, body = number + 1, []
        elif start is not None and line.strip() == '```':
            snippets.append((start, '\n'.join(body)))
            start = None
        elif start is not None:
            body.append(line)
    return snippets


SNIPPETS = python_snippets(README.read_text())


def import_lines(code: str):
    return [line for line in code.splitlines() if re.match(r'(import|from)\s+\w', line)]


def free_names(code: str) -> set:
    """Names `code` reads but neither assigns nor imports (nor are builtins)."""
    tree = ast.parse(code)
    loaded, bound = set(), set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split('.')[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return loaded - bound


def program(index: int) -> str:
    """What a reader has run when they run snippet `index`: earlier imports, the snippet above when needed."""
    code = SNIPPETS[index][1]
    earlier_imports = [imp for _, earlier in SNIPPETS[:index] for imp in import_lines(earlier)]
    if index > 0 and free_names('\n'.join([*earlier_imports, code])):
        return program(index - 1) + '\n' + code
    return '\n'.join([*earlier_imports, code])


def test_program_continues_the_snippet_above_only_when_needed():
    assert free_names('import torch\nx = torch.ones(1)\nprint(x, [i for i in range(2)])') == set()
    assert free_names('y = model(x)') == {'model', 'x'}  # control: undefined names are found


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 1  # control: the extraction finds the blocks


def _fill_weights_cache(cache: Path) -> None:
    text = README.read_text()
    for arch in KERAS_RESNETS:
        if re.search(rf'\b{arch}\b', text):
            torch.manual_seed(0)
            save_model_dir(timm.create_model(arch), cache / f'{arch}.tf_in1k', label_names=ImageNetInfo().label_names())


@pytest.fixture(scope='session')
def weights_cache(built_once):
    """Converted seeded-random weights of each architecture the snippets name, as the cache holds them; written
    once for the run, every xdist worker included, and shared by every snippet."""
    return built_once('readme_weights_cache', _fill_weights_cache)


def make_files(cwd: Path, code: str) -> None:
    torch.manual_seed(1)
    save_model_dir(timm.create_model('resnet50v2_keras', num_classes=len(BIRDS)), cwd / 'birds_model', BIRDS)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(cwd / 'photo.jpg')
    for split, count in (('train', 4), ('val', 2), ('test', 2)):
        for k, name in enumerate(BIRDS):
            folder = cwd / 'data' / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * k, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.jpg')
    if KERAS_FILE in code:
        sys.path.insert(0, str(Path(__file__).parent))
        from keras_helpers import write_legacy_h5

        torch.manual_seed(2)
        write_legacy_h5(timm.create_model('resnet50v2_keras').state_dict(), 'resnet50v2_keras', cwd / KERAS_FILE)


@pytest.mark.slow
@pytest.mark.parametrize('index', range(len(SNIPPETS)), ids=[f'README.md:{line}' for line, _ in SNIPPETS])
def test_readme_snippet_runs(index, weights_cache, tmp_path):
    line, code = SNIPPETS[index]
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    make_files(cwd, code)
    env = dict(os.environ, RESNETV2_ZOO_CACHE=str(weights_cache), HF_HUB_OFFLINE='1',
               KERAS_HOME=str(tmp_path / 'keras'), MPLBACKEND='Agg')
    proc = run_python(program(index), cwd=cwd, env=env, timeout=600)  # `python -c`, pre-imported
    error = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    assert proc.returncode == 0, f'README.md:{line}: the snippet fails: {error}\n{proc.stderr[-2000:]}'
