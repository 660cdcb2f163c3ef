"""What the test modules share: Keras models built once per session, the real-photo data, and the tiers.

Tiers (markers declared in pyproject.toml):
  keras        runs real Keras on TensorFlow; every test that does is marked
  slow         takes more than a few seconds
  shared_data  needs ../shared (real photos); skipped only where that directory is absent
`make test` runs everything; `make test-fast` runs `-m "not keras and not slow"` for the edit loop.

The Keras ResNet50V2 takes seconds to build and each file it writes is ~100 MB, so one seeded model
(with and without its top) and its files serve every module that only reads them; a test that trains or
edits a Keras model builds its own (`keras_helpers.build_keras_resnetv2`).
"""
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Tuple

# `make test` runs the suite in two pytest-xdist workers on the two cores: one compute thread each (and in the
# processes they start), or every worker's torch and TensorFlow would spin on both cores at once.
if os.environ.get('PYTEST_XDIST_WORKER'):
    for _name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS'):
        os.environ.setdefault(_name, '1')

import pytest  # noqa: E402
from filelock import FileLock, Timeout  # noqa: E402

if TYPE_CHECKING:  # imported where used: the pytest process that only hands tests to the workers never needs torch
    from keras_helpers import KerasResNet

SHARED = Path(__file__).resolve().parents[2] / 'shared'
WEATHER4 = SHARED / 'data' / 'weather4'


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    items[:] = schedule_for_two_workers(items)
    if SHARED.is_dir():
        return
    skip = pytest.mark.skip(reason=f'needs the shared data directory {SHARED}, absent here')
    for item in items:
        if 'shared_data' in item.keywords:
            item.add_marker(skip)


def _estimated_cost(item: pytest.Item) -> float:
    """Rough seconds, from the tiers, or as a test measured itself (`@pytest.mark.slow(seconds=25)`, for the few
    that take far longer than the rest): what the schedule needs is which groups are heavy."""
    slow = item.get_closest_marker('slow')
    return slow.kwargs.get('seconds', 4.0) if slow else 1.0 if item.get_closest_marker('keras') else 0.1


def schedule_for_two_workers(items: list) -> list:
    """The test order, for `make test`'s `pytest -n 2 --dist worksteal`.

    worksteal hands each worker one half of the list (by count, in order) and lets a worker that runs out take
    the last half of the other's queue. So: the Keras tests (270 of the 600 CPU-seconds) make the first half, so
    that only one worker imports TensorFlow and builds the session's Keras models (about 15 CPU-seconds less than
    both doing it), each module's Keras tests in one piece (its module-scoped fixtures are built once), then the
    other modules lightest per test up to its share of the items, so that the boundary never cuts into the second
    half's heavy head; the second half holds the rest, also by module. Each half runs its heaviest groups first and
    its light ones last, so that what the first worker to run out steals, and what runs at the very end, is short.
    Without xdist the order is only a regrouping.
    """
    groups: Dict[Tuple[str, bool], list] = {}
    for item in items:
        groups.setdefault((item.nodeid.split('::')[0], item.get_closest_marker('keras') is not None), []).append(item)
    cost = {key: sum(map(_estimated_cost, group)) for key, group in groups.items()}
    first = [key for key in groups if key[1]]
    rest = sorted((key for key in groups if not key[1]), key=lambda key: cost[key] / len(groups[key]))
    while rest and sum(len(groups[key]) for key in first) < len(items) // 2:
        first.append(rest.pop(0))  # the lightest per item left
    rest.sort(key=lambda key: cost[key])
    order = [key for half in (first, rest) for key in sorted(half, key=lambda key: -cost[key])]
    return [item for key in order for item in groups[key]]


@pytest.fixture(autouse=True)
def _keras_marker_is_honest(request: pytest.FixtureRequest):
    """A test that imports TensorFlow must be marked `keras`, or `make test-fast` would run Keras after all.
    (Checked where TensorFlow was not loaded yet: always in `make test-fast`, which deselects the keras tests.)"""
    loaded = 'tensorflow' in sys.modules
    yield
    if request.node.get_closest_marker('keras') is None and (
            'keras_resnet50v2' in request.fixturenames or (not loaded and 'tensorflow' in sys.modules)):
        pytest.fail(f'{request.node.nodeid} runs Keras but is not marked keras', pytrace=False)


@pytest.fixture(scope='module', autouse=True)
def _module_folders_removed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Remove the folders a module's fixtures made (`tmp_path_factory.mktemp`) once its tests are done, unless one
    of them failed. A passing test's own `tmp_path` goes when it ends (`tmp_path_retention_policy = "failed"` in
    pyproject.toml); without this the modules' Keras files and fine-tune runs would pile up to 10 GB by the end.
    (An autouse fixture is set up before, and torn down after, the module's other fixtures. A session fixture
    defined in a test module serves that module only; `run_folder`, shared by the whole run, is kept.)"""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before - {base / 'shared_by_workers'}:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope='session')
def weather4() -> Path:
    """The real 4-class photos (train/val/test). Where ../shared exists they must be there: a failure, not a skip."""
    if not SHARED.is_dir():
        pytest.skip(f'needs the shared data directory {SHARED}, absent here')
    for split in ('train', 'val', 'test'):
        assert (WEATHER4 / split).is_dir(), f'{SHARED} is present but {WEATHER4 / split} is missing'
    return WEATHER4


@pytest.fixture(scope='session')
def keras_resnet50v2(tmp_path_factory) -> 'KerasResNet':
    """Keras's ResNet50V2, seeded random weights, with and without the top; read-only (see KerasResNet).
    Its files are written once for the whole run, every xdist worker included."""
    from keras_helpers import KerasResNet

    return KerasResNet('resnet50v2_keras', run_folder(tmp_path_factory) / 'keras_resnet50v2', seed=1)


def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test run that every xdist worker sees: the workers' base temporary folders share a
    parent that belongs to this run alone; without xdist the run's own base folder serves."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'shared_by_workers'
    root.mkdir(exist_ok=True)
    return root


BUILD_ONCE_TIMEOUT_S = 900  # the longest build (a tf-keras model saved in five formats) takes about a minute


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `build(folder)` once per test run: by the first xdist worker to ask, while the
    other waits for it (bounded), instead of both building the same Keras models and files.

    It lives in `run_folder`. `build` writes into a temporary folder renamed into place when it
    returns, so a folder that is there is complete; if it raises, the next caller builds anew.
    """
    root = run_folder(tmp_path_factory)
    done = root / name
    if done.is_dir():
        return done
    try:
        with FileLock(str(root / f'{name}.lock'), timeout=BUILD_ONCE_TIMEOUT_S):
            if not done.is_dir():
                partial = root / f'.{name}.{os.getpid()}'
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                build(partial)
                partial.rename(done)
    except Timeout:
        pytest.fail(f'waited {BUILD_ONCE_TIMEOUT_S} s for another pytest worker to build {done}', pytrace=False)
    return done


@pytest.fixture(scope='session')
def built_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`built_once(name, build)`: the folder `build` filled once for the whole run, every xdist worker included."""
    return lambda name, build: build_once(tmp_path_factory, name, build)
