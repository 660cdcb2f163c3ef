"""Smoke tests: each benchmark runs one tiny iteration end to end and writes well-formed results.

Sized to take seconds: every process a benchmark starts imports torch or TensorFlow, so the smoke runs start
none: both benchmarks' `main` runs in the test's own process with `--in-process` (every model and method in
that process; the Keras peer in inference only: its first training step alone traces for seconds), with no
warm-up round. One more run, of throughput with one torch model in a real worker process, keeps the worker
processes, their entry point and their pipe protocol covered.
"""
import csv
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm

import resnetv2_zoo  # noqa: F401  (registers the *_keras models)

BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'
# timm benchmark.py's column names (its results CSV), which ours keep
TIMM_INFER = ('infer_samples_per_sec', 'infer_step_time', 'infer_batch_size', 'infer_img_size')
TIMM_TRAIN = ('train_samples_per_sec', 'train_step_time', 'train_batch_size', 'train_img_size')


def benchmark(name: str) -> ModuleType:
    """The benchmark script `name`.py as a module, to run its `main` in this process."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # the scripts import their sibling bench_utils
    return importlib.import_module(name)


def read_results(out_dir: Path, prefix: str):
    stems = {p.with_suffix('') for p in out_dir.iterdir()}
    assert len(stems) == 1 and next(iter(stems)).name.startswith(f'{prefix}_cpu-')
    stem = stems.pop()
    with stem.with_suffix('.csv').open() as f:
        csv_rows = list(csv.DictReader(f))
    payload = json.loads(stem.with_suffix('.json').read_text())
    assert set(payload) == {'meta', 'results'}
    assert [row['arch' if 'arch' in row else 'model'] for row in payload['results']] == [
        row['arch' if 'arch' in row else 'model'] for row in csv_rows]
    return csv_rows, payload, stem.with_suffix('.md').read_text()


@pytest.mark.slow
@pytest.mark.keras
def test_throughput_smoke(tmp_path):
    benchmark('throughput').main(['--models', 'resnet50v2_keras:optimized', 'keras/ResNet50V2:infer',
               'ort/resnet50v2_keras', '--peer', 'resnet50v2_keras:cl', '--img-size', '32', '--batch-sizes', '2',
               '--rounds', '1', '--steps', '1', '--warmup', '0', '--out-dir', str(tmp_path), '--in-process'])
    csv_rows, payload, table = read_results(tmp_path, 'throughput')
    rows = {row['model']: row for row in payload['results']}
    assert list(rows) == ['resnet50v2_keras:cl', 'resnet50v2_keras:optimized', 'keras/ResNet50V2:infer',
                          'ort/resnet50v2_keras']
    for name, row in rows.items():
        assert all(key in row for key in TIMM_INFER + ('param_count',)), name
        assert row['infer_samples_per_sec'] > 0 and row['infer_batch_size'] == 2 and row['infer_img_size'] == 32
        # one round of one step: the rate is the batch over the step time
        assert row['infer_samples_per_sec'] == pytest.approx(2000 / row['infer_step_time'], rel=1e-2)
        # in one process the peak is reset as each model starts, and all start before any runs, so only the
        # worker-process test below can compare a model's peak with its runtime memory
        assert row['infer_peak_mem_mb'] > 0 and row['infer_runtime_mem_mb'] > 0
        assert row['infer_peer'] == 'resnet50v2_keras:cl'
        assert row['infer_rounds_samples_per_sec'] == [row['infer_samples_per_sec']]
    assert rows['resnet50v2_keras:cl']['infer_ratio_to_peer'] == 1.0
    # the optimized, `infer` and onnxruntime entries are inference-only; the peer was trained one step too
    for name in ('resnet50v2_keras:optimized', 'keras/ResNet50V2:infer', 'ort/resnet50v2_keras'):
        assert not any(key.startswith('train_') for key in rows[name]), name
    assert all(key in rows['resnet50v2_keras:cl'] for key in TIMM_TRAIN)
    assert rows['resnet50v2_keras:cl']['train_samples_per_sec'] > 0
    # ResNet50V2 has 25.57 M trainable parameters in Keras and here alike
    assert rows['resnet50v2_keras:cl']['param_count'] == rows['keras/ResNet50V2:infer']['param_count'] == 25.57
    assert rows['ort/resnet50v2_keras']['param_count'] == 25.57
    assert rows['resnet50v2_keras:cl']['channels_last'] and rows['resnet50v2_keras:optimized']['optimized']
    assert set(csv_rows[0]) == set().union(*payload['results'])
    assert table.startswith('| model | precision |') and table.count('\n') == 2 + len(rows)
    assert payload['meta']['load_average_start'] and payload['meta']['torch']


@pytest.mark.slow
@pytest.mark.keras
def test_convert_speed_smoke(tmp_path):
    benchmark('convert_speed').main(['--archs', 'resnet50v2_keras', '--rounds', '1', '--warmup-rounds', '0',
                                     '--in-process', '--out-dir', str(tmp_path / 'out'), '--work-dir',
                                     str(tmp_path / 'work')])
    _, payload, table = read_results(tmp_path / 'out', 'convert_speed')
    (row,) = payload['results']
    model = timm.create_model('resnet50v2_keras')
    float32_mb = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point()) * 4 / 2 ** 20
    assert row['weights_mb'] == pytest.approx(float32_mb, abs=0.1)
    for method in ('h5py_read', 'convert_keras', 'convert_to_dir', 'create_model', 'keras_load'):
        assert 0 < row[f'{method}_s_min'] <= row[f'{method}_s'] <= row[f'{method}_s_max']
        assert row[f'{method}_peak_mb'] >= 0
    assert row['convert_keras_x_h5py'] == pytest.approx(row['convert_keras_s'] / row['h5py_read_s'], rel=1e-2)
    assert row['create_model_x_keras_load'] == pytest.approx(row['create_model_s'] / row['keras_load_s'], rel=1e-2)
    # in one process a call can reuse memory an earlier one freed, so the rise can be tiny: the ratio is rounded
    # to 3 decimals, hence abs=1e-3
    assert row['convert_keras_mem_x_weights'] == pytest.approx(
        row['convert_keras_peak_mb'] / row['weights_mb'], rel=1e-2, abs=1e-3)
    assert table.startswith('| arch | weights MiB |') and '| resnet50v2_keras |' in table


@pytest.mark.slow
def test_benchmark_with_a_worker_process(tmp_path, capsys):
    """As the benchmarks run by default: the model in a worker process (`throughput.py --worker SPEC`, the
    script's entry point), driven over the pipe protocol."""
    benchmark('throughput').main(['--models', 'resnet50v2_keras:cl', '--peer', 'resnet50v2_keras:cl', '--modes',
                                  'infer', '--img-size', '32', '--batch-sizes', '2', '--rounds', '2', '--steps', '1',
                                  '--warmup', '0', '--out-dir', str(tmp_path)])
    assert 'infer round 2/2: resnet50v2_keras:cl' in capsys.readouterr().err
    _, payload, _ = read_results(tmp_path, 'throughput')
    (row,) = payload['results']
    assert row['model'] == 'resnet50v2_keras:cl' and row['param_count'] == 25.57
    assert len(row['infer_rounds_samples_per_sec']) == 2 and row['infer_samples_per_sec'] > 0
    # the worker's own peak RSS: the model's weights alone are ~100 MB
    assert row['infer_peak_mem_mb'] > row['infer_runtime_mem_mb'] + 50
    assert payload['meta']['args']['in_process'] is False
