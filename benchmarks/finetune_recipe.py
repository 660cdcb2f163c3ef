#!/usr/bin/env python3
"""Our fine-tuning recipe against the tutorial's, on the same data, split, model, epochs and resolution.

The two runs advance epoch by epoch in turn (A B A B ...), so that load on a shared machine hits both
alike, and each keeps its own RNG streams, so its numbers are those it would reach alone. Reported per
epoch: validation accuracy; per run: best validation accuracy, test accuracy of the best checkpoint
(when the data has a test/ split) and wall time.

    python benchmarks/finetune_recipe.py                      # weather4 at 32 px, 6 epochs, on the CPU
    python benchmarks/finetune_recipe.py --data DIR --img-size 224 --epochs 10   # e.g. bird_photos on a GPU

Output: benchmarks/results/finetune_recipe_<hardware>.{csv,json,md}.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import timm
import torch
from bench_utils import RESULTS_DIR, machine_tag, markdown_table, write_results

from resnetv2_zoo.train.evaluate import evaluate_folder
from resnetv2_zoo.train.finetune import finetune_args, init_distributed, run_epoch, setup_run, write_report
from resnetv2_zoo.train.resume import rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]
WEATHER4 = REPO.parent / 'shared' / 'data' / 'weather4'
RECIPES = ('default', 'tutorial')


def start_runs(args: argparse.Namespace, work: Path) -> tuple:
    """The runs, and each one's RNG state right after it was built (as if it ran alone)."""
    data = Path(args.data)
    runs, rng = {}, {}
    for recipe in RECIPES:
        argv = ['--recipe', recipe, '--out', str(work / recipe), '--img-size', str(args.img_size), '--epochs',
                str(args.epochs), '--seed', str(args.seed), '--workers', str(args.workers), '--no-pretrained']
        argv += ['--data', str(data / 'train'), '--val-data', str(data / 'val')] if (data / 'val').is_dir() \
            else ['--data', str(data)]
        run_args = finetune_args(argv)
        Path(run_args.out).mkdir()
        dist, device = init_distributed(args.device)
        runs[recipe] = setup_run(run_args, dist, device, Path(run_args.out))
        rng[recipe] = rng_state()
    return runs, rng


def compare(args: argparse.Namespace) -> List[Dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix='finetune-recipe-') as work:
        runs, rng = start_runs(args, Path(work))
        seconds = dict.fromkeys(RECIPES, 0.0)
        for _ in range(args.epochs):
            for recipe, run in runs.items():
                set_rng_state(rng[recipe])
                start = time.perf_counter()
                run_epoch(run)
                seconds[recipe] += time.perf_counter() - start
                rng[recipe] = rng_state()
        test = Path(args.data) / 'test'
        results = []
        for recipe, run in runs.items():
            write_report(run, seconds[recipe])
            test_acc = evaluate_folder(str(run.run_dir), str(test)).accuracy if test.is_dir() else None
            history = run.progress.history
            results.append(dict(
                recipe=recipe, opt=run.args.opt, lr=run.args.lr, sched=run.args.sched, augment=run.args.augment,
                label_smoothing=run.args.label_smoothing, best_val_acc=run.progress.best_acc,
                best_epoch=run.progress.best_epoch, test_acc=test_acc, wall_s=seconds[recipe],
                median_epoch_s=statistics.median(r['seconds'] for r in history),
                **{f'val_acc_{r["epoch"]}': r['val_acc'] for r in history}))
    return results


def table(results: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    pct = lambda x: '' if x is None else f'{100 * x:.1f}%'  # noqa: E731
    by_recipe = {r['recipe']: r for r in results}
    rows = [dict(what=f'val acc, epoch {e}', **{k: pct(r[f'val_acc_{e}']) for k, r in by_recipe.items()})
            for e in range(1, args.epochs + 1)]
    rows += [dict(what='best val acc (epoch)', **{k: f'{pct(r["best_val_acc"])} ({r["best_epoch"]})'
                                                   for k, r in by_recipe.items()}),
             dict(what='test acc of best checkpoint', **{k: pct(r['test_acc']) for k, r in by_recipe.items()}),
             dict(what='wall time', **{k: f'{r["wall_s"]:.0f} s' for k, r in by_recipe.items()})]
    header = (f'resnet50v2_keras from scratch (no pretrained weights) on {Path(args.data).name}, {args.img_size} px, '
              f'{args.epochs} epochs, seed {args.seed}, {args.device or "auto"} device; the runs alternate epoch by '
              f'epoch on the same machine.\n\n')
    return header + markdown_table(rows, dict(what='', default='ours (default)', tutorial='--recipe tutorial'))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(WEATHER4), help='class folders, or train/ val/ [test/] of them')
    parser.add_argument('--img-size', type=int, default=32)
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default=None)
    args = parser.parse_args()
    results = compare(args)
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    meta = dict(data=args.data, img_size=args.img_size, epochs=args.epochs, seed=args.seed, device=device,
                torch=torch.__version__, timm=timm.__version__)
    text = table(results, args)
    for path in write_results(RESULTS_DIR / f'finetune_recipe_{machine_tag(device)}', results, meta, text):
        print(f'wrote {path}')
    print(text)


if __name__ == '__main__':
    main()
