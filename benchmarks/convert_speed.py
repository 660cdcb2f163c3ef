#!/usr/bin/env python3
"""Time and peak memory of converting Keras ResNet*V2 files, next to just reading them and to Keras itself.

For each architecture Keras writes a file with random weights, then these run in interleaved rounds,
each method in its own worker process (Keras's in a TensorFlow one), after an untimed warm-up round:

  h5py_read         read every tensor of the file with h5py (the floor any converter stands on)
  convert_keras     `resnetv2_zoo.weights.convert.convert_keras(path)`: the file as a timm state dict
  convert_to_dir    `convert_to_dir(path, out_dir)`: build, write and load back, as `resnetv2-zoo convert` does
  create_model      `timm.create_model(arch, pretrained=True)` from the package cache (converted once up front)
  keras_load        Keras: build the model and `load_weights(path)`

Peak memory is the largest rise of the worker's peak RSS during one call (warm-up included) over its RSS
before that call (the peak is reset first through /proc/self/clear_refs), against the size of the weights
as float32. `h5py_read` holds one tensor at a time, so its peak is the largest tensor.

    python benchmarks/convert_speed.py                       # all three depths, 3 rounds
    python benchmarks/convert_speed.py --archs resnet50v2_keras --rounds 1
    python benchmarks/convert_speed.py --archs resnet50v2_keras --rounds 1 --warmup-rounds 0 --in-process  # smoke
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench_utils import RESULTS_DIR, LocalWorker, Worker, machine_tag, markdown_table, run_script, serve, write_results

from resnetv2_zoo.keras.spec import KERAS_RESNETS

ARCHS = tuple(KERAS_RESNETS)
FILE_SUFFIXES = {'weights.h5': '.weights.h5', 'h5': '.h5', 'keras': '.keras'}
TORCH_METHODS = ('h5py_read', 'convert_keras', 'convert_to_dir', 'create_model')
KERAS_METHODS = ('keras_load',)
RATIOS = {  # name: (numerator, denominator, what the issue accepts)
    'convert_keras_x_h5py': ('convert_keras_s', 'h5py_read_s', 3.0),
    'convert_to_dir_x_h5py': ('convert_to_dir_s', 'h5py_read_s', 3.0),
    'create_model_x_keras_load': ('create_model_s', 'keras_load_s', 0.5),
    'convert_keras_mem_x_weights': ('convert_keras_peak_mb', 'weights_mb', 2.5),
    'convert_to_dir_mem_x_weights': ('convert_to_dir_peak_mb', 'weights_mb', 2.5),
}


# ---- worker side --------------------------------------------------------------------------------------------

def proc_status_mb(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak) of this process from /proc/self/status, in MiB."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(f'{field}:'):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f'no {field} in /proc/self/status')


def measure(fn: Callable[[], Any]) -> Dict[str, float]:
    """Seconds and peak RSS rise (MiB) of one call of `fn`."""
    Path('/proc/self/clear_refs').write_text('5')  # resets the peak RSS (VmHWM) to the current RSS
    before = proc_status_mb('VmRSS')
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    # the kernel updates the peak lazily: one read just after the reset can be a page or two below the RSS
    return dict(seconds=seconds, peak_mb=max(0.0, proc_status_mb('VmHWM') - before))


def h5py_read(path: str) -> int:
    """Read every dataset of the file into memory; returns the bytes read."""
    import h5py

    sizes = []

    def read(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            sizes.append(obj[()].nbytes)

    with h5py.File(path, 'r') as f:
        f.visititems(read)
    return sum(sizes)


def torch_methods(cache: str) -> Dict[str, Callable[[str, str], Any]]:
    import timm

    from resnetv2_zoo.weights.convert import convert_keras, convert_to_dir

    def to_dir(arch: str, path: str) -> None:
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            convert_to_dir(path, Path(tmp) / 'converted', arch=arch)

    os.environ.update(RESNETV2_ZOO_CACHE=cache, RESNETV2_ZOO_OFFLINE='1')
    return dict(
        h5py_read=lambda arch, path: h5py_read(path),
        convert_keras=lambda arch, path: convert_keras(path, arch=arch),
        convert_to_dir=to_dir,
        create_model=lambda arch, path: timm.create_model(arch, pretrained=True),
    )


def keras_methods(fmt: str) -> Dict[str, Callable[[str, str], Any]]:
    from resnetv2_zoo.keras.runtime import import_keras

    keras = import_keras()

    def build(arch: str) -> Any:
        keras.backend.clear_session()
        return getattr(keras.applications, KERAS_RESNETS[arch].keras_app)(weights=None)

    def make_file(arch: str, path: str) -> None:
        model = build(arch)
        if fmt == 'weights.h5':
            model.save_weights(path)
        else:
            model.save(path)

    return dict(keras_load=lambda arch, path: build(arch).load_weights(path), make_file=make_file)


def worker_handlers(spec: Dict[str, Any]) -> Dict[str, Callable[..., Dict[str, Any]]]:
    methods = keras_methods(spec['format']) if spec['kind'] == 'keras' else torch_methods(spec['cache'])
    return dict(
        run=lambda method, arch, path: measure(lambda: methods[method](arch, path)),
        weights_mb=lambda path: dict(weights_mb=h5py_read(path) / 2 ** 20),
    )


def worker_main(spec: Dict[str, Any]) -> None:
    serve(worker_handlers(spec))


# ---- parent side ------------------------------------------------------------------------------------------

def bench_arch(arch: str, workers: Dict[str, Worker], args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    path = str(work / f'{arch}{FILE_SUFFIXES[args.format]}')
    if not Path(path).is_file():
        workers['keras_load'].request('run', method='make_file', arch=arch, path=path)
    # create_model loads from the package cache: convert into it once, as first use of pretrained=True does
    from resnetv2_zoo.weights.convert import convert_to_dir
    from resnetv2_zoo.weights.pretrained import PRETRAINED_TAG

    cached = work / 'cache' / f'{arch}.{PRETRAINED_TAG}'
    if not cached.is_dir():
        convert_to_dir(path, cached, arch=arch)

    samples: Dict[str, List[Dict[str, float]]] = {method: [] for method in workers}
    peaks: Dict[str, List[float]] = {method: [] for method in workers}
    for round_idx in range(-args.warmup_rounds, args.rounds):  # negative rounds warm up
        for method, worker in workers.items():
            result = worker.request('run', method=method, arch=arch, path=path)
            # the first call's peak counts too: allocators that keep freed memory (TensorFlow's) rise only once
            peaks[method].append(result['peak_mb'])
            if round_idx >= 0:
                samples[method].append(result)
        print(f'{arch} round {round_idx + 1}/{args.rounds}: ' + ', '.join(
            f'{m} {s[-1]["seconds"]:.2f}s' for m, s in samples.items() if s), file=sys.stderr)

    row: Dict[str, Any] = dict(arch=arch, format=args.format,
                               weights_mb=round(workers['h5py_read'].request('weights_mb', path=path)['weights_mb'], 1),
                               file_mb=round(Path(path).stat().st_size / 2 ** 20, 1))
    for method, results in samples.items():
        seconds = [r['seconds'] for r in results]
        row[f'{method}_s'] = round(statistics.median(seconds), 3)
        row[f'{method}_s_min'] = round(min(seconds), 3)
        row[f'{method}_s_max'] = round(max(seconds), 3)
        row[f'{method}_peak_mb'] = round(max(peaks[method]), 1)
    for name, (num, den, _) in RATIOS.items():
        row[name] = round(row[num] / row[den], 3)
    return row


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--archs', nargs='+', choices=ARCHS, default=list(ARCHS))
    parser.add_argument('--format', choices=tuple(FILE_SUFFIXES), default='weights.h5',
                        help='Keras file format to write and convert')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--warmup-rounds', type=int, default=1, help='untimed rounds first')
    parser.add_argument('--share-worker', action='store_true',
                        help='run the torch methods in one worker process: starts faster (the smoke test), but '
                             'memory one method freed can lower the peak rise of the next')
    parser.add_argument('--in-process', action='store_true',
                        help='run every method in this process, not in worker processes: starts in seconds (the '
                             'smoke test), but torch and TensorFlow share the process, so figures are not comparable')
    parser.add_argument('--work-dir', type=Path, help='keep (and reuse) the Keras files here; default: a temp dir')
    parser.add_argument('--out-dir', type=Path, default=RESULTS_DIR)
    parser.add_argument('--name', default='', help='suffix for the results files')
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup_rounds < 0:
        parser.error('--rounds must be >= 1, --warmup-rounds >= 0')
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        (work / 'cache').mkdir(parents=True, exist_ok=True)
        spec = dict(format=args.format, cache=str(work / 'cache'))
        if args.in_process:
            local = {kind: LocalWorker(worker_handlers, dict(spec, kind=kind)) for kind in ('torch', 'keras')}
            workers = {m: local['torch'] for m in TORCH_METHODS}
            workers.update({m: local['keras'] for m in KERAS_METHODS})
        else:
            shared = Worker(__file__, dict(spec, kind='torch')) if args.share_worker else None
            workers = {m: shared or Worker(__file__, dict(spec, kind='torch')) for m in TORCH_METHODS}
            workers.update({m: Worker(__file__, dict(spec, kind='keras')) for m in KERAS_METHODS})
        try:
            rows = [bench_arch(arch, workers, args, work) for arch in args.archs]
        finally:
            for worker in {id(w): w for w in workers.values()}.values():
                worker.close()

    meta = dict(date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), machine=machine_tag('cpu'), cpu_count=os.cpu_count(),
                load_average_end=os.getloadavg(), args=vars(args),
                accepted_ratios={name: limit for name, (_, _, limit) in RATIOS.items()})
    columns = {'arch': 'arch', 'weights_mb': 'weights MiB'}
    columns.update({f'{m}_s': f'{m} s' for m in (*TORCH_METHODS, *KERAS_METHODS)})
    columns.update({name: f'{name} (<= {limit})' for name, (_, _, limit) in RATIOS.items()})
    table = markdown_table(rows, columns)
    stem = args.out_dir / '_'.join(filter(None, ['convert_speed', meta['machine'], args.name]))
    return write_results(stem, rows, meta, table)


if __name__ == '__main__':
    run_script(main, worker_main)
