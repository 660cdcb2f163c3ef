#!/usr/bin/env python3
"""Inference and training throughput of the Keras ResNetV2 ports, side by side with timm, torchvision and Keras.

Every model runs in its own worker process (its own peak memory; Keras on TensorFlow never shares a
process with torch). After a warm-up, the parent runs the workers' timed rounds interleaved, A B C A B C
..., so that load on a shared machine hits all of them alike; each model is reported as the median and
min/max over rounds, and as the median ratio to a named peer measured in the same rounds.

Models are timm names, `torchvision/NAME`, `keras/NAME` (keras.applications) or `ort/NAME` (the timm model
exported to ONNX by `resnetv2_zoo.weights.export` and run by onnxruntime on the CPU with all its graph
optimizations; inference only), each optionally with `:OPTIONS`, a `+`-joined subset of
  cl         channels_last weights and input (Keras is always NHWC)
  compile    torch.compile (Keras: XLA `jit_compile`)
  optimized  `resnetv2_zoo.models.optimize.optimize_for_inference` (BN folded; inference only)
  infer      inference only: left out of train mode (the smoke test's Keras peer, whose first training
             step alone traces for seconds)

    python benchmarks/throughput.py                      # CPU default, a few minutes
    python benchmarks/throughput.py --gpu-suite          # H200: batch 256, bf16, channels_last, +/- compile
    python benchmarks/throughput.py --models resnet50v2_keras:cl resnetv2_50:cl --peer resnetv2_50:cl
    python benchmarks/throughput.py --in-process ...    # smoke: every model in this one process, figures not comparable

On a CPU shared with other jobs, OpenMP's spin-waiting threads lose most of their time slices to the
other processes, which hurts torch far more than TensorFlow's work-stealing pool; run with
`OMP_WAIT_POLICY=PASSIVE` there (the workers inherit the environment) and say so with the results.

Output: benchmarks/results/throughput_<hardware>[_<suffix>].{csv,json,md}. Column names follow timm's
benchmark.py (`infer_samples_per_sec`, `infer_step_time` in ms, `infer_batch_size`, `param_count` in
millions, ...). Memory is `torch.cuda.max_memory_allocated` on GPU; on CPU the worker's peak RSS, and
`runtime_mem_mb`, the RSS of the framework alone (after its imports, before the model is built).
"""
import argparse
import contextlib
import importlib.metadata
import itertools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from bench_utils import (
    RESULTS_DIR,
    LocalWorker,
    Worker,
    machine_tag,
    markdown_table,
    peak_rss_mb,
    reset_peak_rss,
    run_script,
    serve,
    write_results,
)

MODEL_OPTIONS = ('cl', 'compile', 'optimized', 'infer')
PRECISIONS = {'fp32': None, 'bf16': 'bfloat16', 'fp16': 'float16'}
KERAS_POLICIES = {'fp32': 'float32', 'bf16': 'mixed_bfloat16', 'fp16': 'mixed_float16'}

CPU_MODELS = [
    'resnet50v2_keras', 'resnet50v2_keras:cl', 'resnet50v2_keras:optimized+cl+compile',
    'resnetv2_50', 'resnetv2_50:cl', 'resnet50', 'torchvision/resnet50', 'keras/ResNet50V2', 'ort/resnet50v2_keras',
]
GPU_MODELS = [
    f'{name}:{opts}'
    for name in ('resnet50v2_keras', 'resnet101v2_keras', 'resnet152v2_keras',
                 'resnetv2_50', 'resnet50', 'torchvision/resnet50')
    for opts in ('cl', 'cl+compile')
] + ['resnet50v2_keras:optimized+cl+compile']  # no Keras: the [keras] extra is tensorflow-cpu
GPU_SUITE = dict(
    device='cuda', batch_sizes=[256], precisions=['bf16'], modes=['infer', 'train'], models=GPU_MODELS,
    peer='resnetv2_50:cl', rounds=5, steps=10, warmup=10,
)
StepFn = Callable[[], None]


def parse_model(entry: str) -> Dict[str, Any]:
    name, _, opts = entry.partition(':')
    options = set(opts.split('+')) if opts else set()
    unknown = options - set(MODEL_OPTIONS)
    if unknown:
        raise argparse.ArgumentTypeError(f'{entry}: unknown options {sorted(unknown)}; known: {MODEL_OPTIONS}')
    return dict(label=entry, name=name, **{opt: opt in options for opt in MODEL_OPTIONS})


# ---- worker side: build one model and time its steps ------------------------------------------------------

def build_torch_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    import timm
    import torch
    from timm.optim import create_optimizer_v2

    import resnetv2_zoo  # noqa: F401  (registers the *_keras architectures with timm)
    from resnetv2_zoo.models.optimize import optimize_for_inference

    runtime_mem = peak_rss_mb()
    device = torch.device(spec['device'])
    name = spec['name']
    if name.startswith('torchvision/'):
        import torchvision

        model = torchvision.models.get_model(name.split('/', 1)[1], weights=None)
    else:
        model = timm.create_model(name)
    param_count = sum(p.numel() for p in model.parameters())
    memory_format = torch.channels_last if spec['cl'] else torch.contiguous_format
    model.to(device)
    if spec['optimized']:
        model = optimize_for_inference(model, channels_last=spec['cl'], compile=spec['compile'])
    else:
        model.to(memory_format=memory_format)
        if spec['compile']:
            model = torch.compile(model)

    size = spec['img_size']
    x = torch.randn(spec['batch_size'], 3, size, size, device=device).contiguous(memory_format=memory_format)
    dtype = PRECISIONS[spec['precision']]
    autocast = (lambda: torch.autocast(device.type, dtype=getattr(torch, dtype))) if dtype else contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    if spec['mode'] == 'infer':
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast():
                model(x)
    else:
        model.train()
        optimizer = create_optimizer_v2(model, 'sgd', lr=1e-4, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')
        target = torch.randint(0, 1000, (spec['batch_size'],), device=device)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x), target)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def run(steps: int) -> None:
        for _ in range(steps):
            step()
        sync()

    def memory() -> float:
        if device.type == 'cuda':
            return torch.cuda.max_memory_allocated(device) / 2 ** 20
        return peak_rss_mb()

    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
        runtime_mem = torch.cuda.memory_allocated(device) / 2 ** 20
    return dict(run=run, memory=memory, param_count=param_count, runtime_mem=runtime_mem)


def build_keras_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    import numpy as np

    from resnetv2_zoo.keras.runtime import import_keras

    keras = import_keras()
    runtime_mem = peak_rss_mb()
    if spec['device'] != 'cpu':
        raise ValueError('the Keras peer runs on CPU only here (tensorflow-cpu)')
    keras.mixed_precision.set_global_policy(KERAS_POLICIES[spec['precision']])
    size, batch_size = spec['img_size'], spec['batch_size']
    model = getattr(keras.applications, spec['name'].split('/', 1)[1])(weights=None, input_shape=(size, size, 3))
    model.compile(optimizer=keras.optimizers.SGD(1e-4, momentum=0.9), loss='sparse_categorical_crossentropy',
                  jit_compile=spec['compile'])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, size, size, 3), dtype=np.float32)
    y = rng.integers(0, 1000, batch_size)
    # predict_on_batch / train_on_batch return host values, so each step is complete when they return
    step = (lambda: model.predict_on_batch(x)) if spec['mode'] == 'infer' else (lambda: model.train_on_batch(x, y))

    def run(steps: int) -> None:
        for _ in range(steps):
            step()

    # trainable weights only, as torch's parameters(): BatchNorm moving statistics are buffers there
    param_count = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    return dict(run=run, memory=peak_rss_mb, param_count=param_count, runtime_mem=runtime_mem)


def build_ort_step(spec: Dict[str, Any]) -> Dict[str, Any]:
    """onnxruntime on the CPU: the timm model exported (and checked against eager) with the package's exporter."""
    import tempfile

    import numpy as np
    import onnxruntime
    import timm
    import torch

    import resnetv2_zoo  # noqa: F401  (registers the *_keras architectures with timm)
    from resnetv2_zoo.weights.export import export_model

    runtime_mem = peak_rss_mb()
    if spec['mode'] != 'infer' or spec['device'] != 'cpu' or spec['precision'] != 'fp32':
        raise ValueError('the onnxruntime peer runs fp32 inference on the CPU only')
    size, batch_size = spec['img_size'], spec['batch_size']
    model = timm.create_model(spec['name'].split('/', 1)[1]).eval()
    param_count = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'model.onnx'
        export_model(model, path, input_size=(3, size, size), check_batch=batch_size)
        del model
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()  # the thread count torch runs with here
        session = onnxruntime.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch_size, 3, size, size), dtype=np.float32)

    def run(steps: int) -> None:
        for _ in range(steps):
            session.run(None, {name: x})

    return dict(run=run, memory=peak_rss_mb, param_count=param_count, runtime_mem=runtime_mem)


def worker_handlers(spec: Dict[str, Any]) -> Dict[str, Callable[..., Dict[str, Any]]]:
    """What a worker answers: `start` (build the model), `run` (time steps), `memory` (its peak)."""
    build = (build_keras_step if spec['name'].startswith('keras/') else
             build_ort_step if spec['name'].startswith('ort/') else build_torch_step)
    state: Dict[str, Any] = {}

    def start() -> Dict[str, Any]:
        if spec.get('in_process'):
            reset_peak_rss()  # other models live in this process too: measure from here
        state.update(build(spec))
        return dict(param_count=state['param_count'], runtime_mem_mb=state['runtime_mem'])

    def timed(steps: int) -> Dict[str, Any]:
        t0 = time.perf_counter()
        state['run'](steps)
        return dict(seconds=time.perf_counter() - t0)

    return dict(start=start, run=timed, memory=lambda: dict(peak_mem_mb=state['memory']()))


def worker_main(spec: Dict[str, Any]) -> None:
    serve(worker_handlers(spec))


# ---- parent side: interleave the workers' rounds and summarise ---------------------------------------------

def summarize(samples: Sequence[float]) -> Dict[str, float]:
    return dict(median=statistics.median(samples), min=min(samples), max=max(samples))


def bench_group(models: List[Dict[str, Any]], peer: str, setting: Dict[str, Any],
                args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Time `models` under one setting (mode, precision, batch size) in interleaved rounds."""
    prefix = setting['mode']
    workers = {m['label']: (LocalWorker(worker_handlers, dict(m, **setting, img_size=args.img_size, device=args.device,
                                                              in_process=True)) if args.in_process else
                            Worker(__file__, dict(m, **setting, img_size=args.img_size, device=args.device)))
               for m in models}
    try:
        info = {label: w.request('start') for label, w in workers.items()}
        for w in workers.values():
            w.request('run', steps=args.warmup)
        seconds: Dict[str, List[float]] = {label: [] for label in workers}
        for round_idx in range(args.rounds):
            for label, w in workers.items():
                seconds[label].append(w.request('run', steps=args.steps)['seconds'])
            print(f'{prefix} round {round_idx + 1}/{args.rounds}: ' + ', '.join(
                f'{label} {setting["batch_size"] * args.steps / s[-1]:.1f}/s' for label, s in seconds.items()),
                file=sys.stderr)
        memory = {label: w.request('memory')['peak_mem_mb'] for label, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()

    rows = []
    for m in models:
        label = m['label']
        rates = [setting['batch_size'] * args.steps / s for s in seconds[label]]
        rate, step_ms = summarize(rates), summarize([1000 * s / args.steps for s in seconds[label]])
        ratio = summarize([r / p for r, p in zip(rates, (setting['batch_size'] * args.steps / s
                                                         for s in seconds[peer]))])
        rows.append({
            'model': label, 'arch': m['name'], 'channels_last': m['cl'], 'compile': m['compile'],
            'optimized': m['optimized'], 'precision': setting['precision'], 'device': args.device,
            'param_count': round(info[label]['param_count'] / 1e6, 2),
            f'{prefix}_samples_per_sec': round(rate['median'], 2),
            f'{prefix}_samples_per_sec_min': round(rate['min'], 2),
            f'{prefix}_samples_per_sec_max': round(rate['max'], 2),
            f'{prefix}_step_time': round(step_ms['median'], 3),
            f'{prefix}_step_time_min': round(step_ms['min'], 3),
            f'{prefix}_step_time_max': round(step_ms['max'], 3),
            f'{prefix}_batch_size': setting['batch_size'],
            f'{prefix}_img_size': args.img_size,
            f'{prefix}_peer': peer,
            f'{prefix}_ratio_to_peer': round(ratio['median'], 3),
            f'{prefix}_ratio_to_peer_min': round(ratio['min'], 3),
            f'{prefix}_ratio_to_peer_max': round(ratio['max'], 3),
            f'{prefix}_peak_mem_mb': round(memory[label], 1),
            f'{prefix}_rounds_samples_per_sec': [round(r, 2) for r in rates],  # for ratios to any other model
            f'{prefix}_runtime_mem_mb': round(info[label]['runtime_mem_mb'], 1),
        })
    return rows


def merge_modes(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per model, precision and batch size carrying both infer_* and train_* columns, as timm does."""
    merged: Dict[tuple, Dict[str, Any]] = {}
    for row in rows:
        batch_size = row.get('infer_batch_size', row.get('train_batch_size'))
        merged.setdefault((row['model'], row['precision'], batch_size), {}).update(row)
    return list(merged.values())


def results_table(rows: List[Dict[str, Any]], modes: Sequence[str]) -> str:
    columns = {'model': 'model', 'precision': 'precision'}
    table_rows = []
    for row in rows:
        table_row = dict(row)
        for mode in modes:
            if f'{mode}_samples_per_sec' in row:
                table_row[f'{mode}_rate'] = (f"{row[f'{mode}_samples_per_sec']:.1f} "
                                             f"({row[f'{mode}_samples_per_sec_min']:.1f}-"
                                             f"{row[f'{mode}_samples_per_sec_max']:.1f})")
                table_row[f'{mode}_ratio'] = (f"{row[f'{mode}_ratio_to_peer']:.2f} "
                                              f"({row[f'{mode}_ratio_to_peer_min']:.2f}-"
                                              f"{row[f'{mode}_ratio_to_peer_max']:.2f})")
        table_rows.append(table_row)
    for mode in modes:
        peer = next((r[f'{mode}_peer'] for r in rows if f'{mode}_peer' in r), '')
        columns.update({
            f'{mode}_batch_size': f'{mode} batch',
            f'{mode}_rate': f'{mode} img/s median (min-max)',
            f'{mode}_step_time': f'{mode} ms/step',
            f'{mode}_ratio': f'{mode} x {peer}',
            f'{mode}_peak_mem_mb': f'{mode} peak MiB',
        })
    return markdown_table(table_rows, columns)


def environment(args: argparse.Namespace) -> Dict[str, Any]:
    import timm
    import torch

    env = dict(
        date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), hostname=platform.node(), python=platform.python_version(),
        torch=torch.__version__, timm=timm.__version__, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), device=args.device, machine=machine_tag(args.device),
        load_average_start=os.getloadavg(), args=vars(args),
        memory_note=('peak_mem_mb: torch.cuda.max_memory_allocated; runtime_mem_mb: allocated once the model is '
                     'built (its weights)' if args.device.startswith('cuda') else
                     'peak_mem_mb: peak RSS of the model\'s own worker process (VmHWM, else ru_maxrss); '
                     'runtime_mem_mb: its RSS after importing the framework, before building the model'
                     + ('; --in-process: all in one process, the peak reset as each model starts, so these '
                        'figures are not the models\' own' if args.in_process else '')),
    )
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env['keras'] = importlib.metadata.version('keras')  # not imported: TensorFlow stays out of this process
    return env


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=CPU_MODELS, metavar='NAME[:OPTS]')
    parser.add_argument('--peer', default='resnetv2_50', help='model entry every ratio is taken against')
    parser.add_argument('--modes', nargs='+', choices=('infer', 'train'), default=['infer', 'train'])
    parser.add_argument('--precisions', nargs='+', choices=tuple(PRECISIONS), default=['fp32'])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[8])
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds per model, interleaved')
    parser.add_argument('--steps', type=int, default=2, help='steps per timed round')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model first')
    parser.add_argument('--gpu-suite', action='store_true', help=f'preset for one big GPU: {GPU_SUITE}')
    parser.add_argument('--out-dir', type=Path, default=RESULTS_DIR)
    parser.add_argument('--name', default='', help='suffix for the results files')
    parser.add_argument('--in-process', action='store_true',
                        help='run every model in this process, not one worker process each: starts in seconds (the '
                             'smoke test), but the models share the process, so figures are not comparable')
    args = parser.parse_args(argv)
    if args.gpu_suite:
        for key, value in GPU_SUITE.items():
            setattr(args, key, value)
    if min(args.rounds, args.steps, *args.batch_sizes) < 1 or args.warmup < 0:
        parser.error('--rounds, --steps and --batch-sizes must be >= 1, --warmup >= 0')
    try:
        args.models = [parse_model(m) for m in dict.fromkeys([args.peer, *args.models])]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    args = parse_args(argv)
    meta = environment(args)
    rows = []
    for mode, precision, batch_size in itertools.product(args.modes, args.precisions, args.batch_sizes):
        models = [m for m in args.models
                  if mode == 'infer' or not (m['optimized'] or m['infer'] or m['name'].startswith('ort/'))]
        if args.peer not in {m['label'] for m in models}:
            raise SystemExit(f'the peer {args.peer} cannot run in mode {mode}')
        rows += bench_group(models, args.peer, dict(mode=mode, precision=precision, batch_size=batch_size), args)
    rows = merge_modes(rows)
    meta['load_average_end'] = os.getloadavg()
    stem = args.out_dir / '_'.join(filter(None, ['throughput', meta['machine'], args.name]))
    table = results_table(rows, args.modes)
    return write_results(stem, rows, meta, table)


if __name__ == '__main__':
    run_script(main, worker_main)
