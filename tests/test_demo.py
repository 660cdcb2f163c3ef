"""`resnetv2-zoo demo`: its synthetic data set is deterministic, and the whole job runs end to end."""
import functools
import hashlib
from pathlib import Path

import pytest

from resnetv2_zoo.cli import main
from resnetv2_zoo.train import demo
from resnetv2_zoo.train.demo import SYNTHETIC_CLASSES, make_synthetic_dataset
from resnetv2_zoo.train.finetune import RUN_FILES


def digest(root: Path) -> str:
    files = sorted(p for p in root.rglob('*') if p.is_file())
    return hashlib.sha256(b''.join(str(p.relative_to(root)).encode() + p.read_bytes() for p in files)).hexdigest()


def test_synthetic_dataset_is_deterministic(tmp_path):
    first = make_synthetic_dataset(tmp_path / 'a', train_per_class=3, test_per_class=1, size=32)
    second = make_synthetic_dataset(tmp_path / 'b', train_per_class=3, test_per_class=1, size=32)
    other_seed = make_synthetic_dataset(tmp_path / 'c', train_per_class=3, test_per_class=1, size=32, seed=1)
    assert digest(first) == digest(second) != digest(other_seed)
    assert sorted(p.name for p in (first / 'train').iterdir()) == sorted(SYNTHETIC_CLASSES)
    assert len(list((first / 'test').rglob('*.png'))) == 4


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """The one run of the demo (test_finetune covers fine-tune -> evaluate -> predict): its own synthetic set,
    drawn smaller than by default to keep the suite fast."""
    monkeypatch.setattr(demo, 'make_synthetic_dataset', functools.partial(
        make_synthetic_dataset, train_per_class=6, test_per_class=1, size=32))
    assert main(['demo', '--out', str(tmp_path), '--img-size', '32', '--epochs', '1', '--batch-size', '8']) == 0
    out = capsys.readouterr().out
    for name in RUN_FILES:
        assert str(tmp_path / 'run' / RUN_FILES[name]) in out
        assert (tmp_path / 'run' / RUN_FILES[name]).exists()
    assert '== evaluate on' in out and '== predict' in out
