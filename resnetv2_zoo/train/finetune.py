"""`resnetv2-zoo finetune`: adapt a (pretrained) ResNetV2 to an image folder, resumably, on CPU, GPU or many GPUs.

The recipe is timm's (create_optimizer_v2 / create_scheduler_v2, ModelEmaV3); `--recipe tutorial` is the
original tutorial's, kept for side-by-side comparison. Runs launched through `torchrun` train with
DistributedDataParallel and only rank 0 writes. A run stopped at any point (even by SIGKILL) continues
with `--resume RUN_DIR` to the same result an uninterrupted run reaches: every shuffle is seeded per
epoch, and the resume checkpoint holds the position inside the epoch and every RNG state.
"""
import argparse
import csv
import itertools
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import timm
import torch
import torch.distributed as torch_dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from ..errors import ResNetV2ZooError, WeightsUnavailableError
from ..weights.atomic import atomic_file
from ..weights.checkpoint import load_model, save_model_dir
from .data import DataSplits, ImageSamples, build_transforms, load_splits
from .evaluate import classification_report, format_report
from .runtime import BEST_DIR, amp_dtype, autocast, pick_device, predict_loader, prepare_for_device, to_device

__all__ = ['RECIPES', 'RUN_FILES', 'run_finetune', 'add_finetune_arguments', 'register']

# Each recipe setting is also a command-line option that overrides it.
RECIPES: Dict[str, Dict[str, Any]] = {
    'default': dict(opt='adamw', lr=1e-3, weight_decay=0.05, sched='cosine', warmup_epochs=1, decay_epochs=None,
                    decay_rate=0.1, batch_size=32, label_smoothing=0.1, augment=True, clip_grad=1.0),
    # The tutorial: Adam at 1e-4, batch 32, no augmentation, learning rate x 0.92 every 4 epochs.
    'tutorial': dict(opt='adam', lr=1e-4, weight_decay=0.0, sched='step', warmup_epochs=0, decay_epochs=4,
                     decay_rate=0.92, batch_size=32, label_smoothing=0.0, augment=False, clip_grad=0.0),
}
RUN_FILES = dict(metrics='metrics.csv', samples='samples.png', curves='curves.png', confusion='confusion.png',
                 predictions='predictions.png', summary='summary.json', best=BEST_DIR, resume='last.pt')
METRIC_COLUMNS = ('epoch', 'lr', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'seconds', 'images_per_s')
RESUME_FORMAT = 1
GRID_IMAGES = 16


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: Optional[str]) -> Tuple[Distributed, torch.device]:
    """The process group `torchrun` asks for (through its environment variables), and this rank's device."""
    dist = Distributed(int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1)),
                       int(os.environ.get('LOCAL_RANK', 0)))
    device = pick_device(device_name)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', dist.local_rank)
        torch.cuda.set_device(device)
    if dist.enabled and not torch_dist.is_initialized():
        torch_dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist, device


def all_reduce_sum(values: Sequence[float], dist: Distributed, device: torch.device) -> List[float]:
    if not dist.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(obj: Any, dist: Distributed) -> List[Any]:
    if not dist.enabled:
        return [obj]
    gathered = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a shard per rank) that can start part-way into an epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, dist: Distributed, seed: int, epoch: int, start: int = 0):
        super().__init__(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def rng_state() -> Dict[str, Any]:
    """Every RNG training draws from, as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    return dict(
        python=random.getstate(),
        numpy=dict(key=torch.from_numpy(np_state['state']['key'].astype(np.int64)), pos=np_state['state']['pos'],
                   has_gauss=np_state['has_gauss'], gauss=np_state['gauss']),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state['python'])
    np_state = state['numpy']
    np.random.set_state(dict(bit_generator='MT19937', has_gauss=np_state['has_gauss'], gauss=np_state['gauss'],
                             state=dict(key=np_state['key'].numpy().astype(np.uint32), pos=np_state['pos'])))
    torch.set_rng_state(state['torch'])
    if state['cuda']:
        torch.cuda.set_rng_state_all(state['cuda'])


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's options without the CLI's callback: what the resume checkpoint and summary.json record."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def notice(message: str, dist: Distributed) -> None:
    if dist.is_main:
        print(f'notice: {message}', file=sys.stderr, flush=True)


def create_classifier(args: argparse.Namespace, num_classes: int, dist: Distributed,
                      resuming: bool) -> Tuple[torch.nn.Module, str]:
    """(model with a `num_classes` head, where its weights came from)."""
    if resuming:
        return timm.create_model(args.model, num_classes=num_classes), 'resume checkpoint'  # weights: loaded next
    if args.init:
        return load_model(args.init, num_classes=num_classes), f'init {args.init}'
    if args.pretrained is False:
        return timm.create_model(args.model, num_classes=num_classes), 'scratch'
    try:
        return timm.create_model(args.model, pretrained=True, num_classes=num_classes), 'pretrained'
    except WeightsUnavailableError as e:
        if args.pretrained:
            raise
        notice(f'{e}\n  -> training {args.model} from scratch (random initialization). Pass --pretrained to make '
               f'this an error, or --init FILE to start from a converted checkpoint.', dist)
        return timm.create_model(args.model, num_classes=num_classes), 'scratch'


def set_bn_momentum(model: torch.nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def set_backbone_frozen(model: torch.nn.Module, frozen: bool) -> None:
    for param in model.parameters():
        param.requires_grad = not frozen
    for param in model.get_classifier().parameters():
        param.requires_grad = True


@dataclass
class Progress:
    """Where the run is; saved in the resume checkpoint."""
    epoch: int = 0  # the epoch in progress (0-based)
    step: int = 0  # batches of that epoch already trained
    num_updates: int = 0
    loss_sum: float = 0.0  # this process's running train totals for the epoch in progress
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0  # train time spent on the epoch in progress
    best_acc: float = -1.0
    best_epoch: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0
        self.loss_sum = self.correct = self.seen = self.seconds = 0.0


class Run:
    """One fine-tuning run: data, model, optimizer and schedule, and the files in its directory."""

    def __init__(self, args: argparse.Namespace, dist: Distributed, device: torch.device,
                 resume_state: Optional[Dict[str, Any]] = None):
        self.args, self.dist, self.device = args, dist, device
        self.run_dir = Path(args.out)
        seed_everything(args.seed + dist.rank)
        self.splits: DataSplits = load_splits(args.data, args.val_data, args.val_split, args.seed)
        self.classes = self.splits.classes
        if resume_state is not None and resume_state['classes'] != self.classes:
            raise ResNetV2ZooError(f'{args.data} now has classes {self.classes}, the run was started with '
                                   f'{resume_state["classes"]}')
        self.model, self.source = create_classifier(args, len(self.classes), dist, resume_state is not None)
        set_bn_momentum(self.model, args.bn_momentum)
        img_size = args.img_size or self.model.pretrained_cfg['input_size'][-1]
        # Saved checkpoints carry the resolution they were trained at, so evaluate/predict default to it.
        self.model.pretrained_cfg = dict(self.model.pretrained_cfg, input_size=(3, img_size, img_size),
                                         test_input_size=(3, img_size, img_size))
        self.model = prepare_for_device(self.model, device)
        self.train_transform, self.eval_transform = build_transforms(self.model, img_size, args.augment)
        self.train_set = ImageSamples(self.splits.train, self.train_transform)
        # Validation shards without padding, so reduced metrics count every image exactly once.
        self.val_set = ImageSamples(self.splits.val[dist.rank::dist.world_size], self.eval_transform)
        self.steps_per_epoch = len(self.splits.train) // dist.world_size // args.batch_size
        if self.steps_per_epoch == 0:
            raise ResNetV2ZooError(f'{len(self.splits.train)} training images over {dist.world_size} process(es) do '
                                   f'not fill one batch of {args.batch_size}; lower --batch-size')
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 0.01,
            min_lr=args.lr * 0.01, step_on_epochs=args.sched != 'cosine', updates_per_epoch=self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay, use_warmup=True) if args.ema_decay else None
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        self.progress = Progress()
        self.train_model: Optional[torch.nn.Module] = None
        self.frozen: Optional[bool] = None
        if resume_state is not None:
            self.load_state(resume_state)

    # --- checkpoints -------------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        return self.run_dir / RUN_FILES[name]

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def save_resume(self) -> None:
        """Write the resume checkpoint (rank 0), atomically; a collective call, since it gathers RNG states."""
        rng_states = all_gather(rng_state(), self.dist)
        if not self.dist.is_main:
            return
        state = dict(
            format=RESUME_FORMAT, args=plain_args(self.args), classes=self.classes, source=self.source,
            progress=asdict(self.progress),
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema is not None else None, rng=rng_states)
        with atomic_file(self.path('resume')) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as e:  # how torch reports a failed write (disk full): not an OSError
                raise OSError(str(e)) from e

    def load_state(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        if self.ema is not None:
            self.ema.load_state_dict(state['ema'])
        self.progress = Progress(**state['progress'])
        self.source = state['source']
        if len(state['rng']) == self.dist.world_size:
            set_rng_state(state['rng'][self.dist.rank])
        else:
            notice(f'resuming on {self.dist.world_size} processes a run saved from {len(state["rng"])}: '
                   f'the data order is kept, augmentation randomness is reseeded', self.dist)

    def save_best(self, val_acc: float) -> None:
        if self.dist.is_main:
            save_model_dir(self.eval_model(), self.path('best'), label_names=self.classes,
                           metadata=dict(val_acc=f'{val_acc:.6f}', epoch=str(self.progress.epoch + 1)))

    def write_metrics(self) -> None:
        with atomic_file(self.path('metrics')) as tmp, open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(self.progress.history)

    # --- training ----------------------------------------------------------------------------------------
    def wrap_for_training(self, frozen: bool) -> None:
        """(Re)build the module the train loop calls; DDP must be rebuilt when the trainable set changes."""
        if frozen == self.frozen:
            return
        set_backbone_frozen(self.model, frozen)
        module = self.model
        if self.dist.enabled:
            module = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == 'cuda'
                                             else None)
        self.train_model = torch.compile(module) if self.args.compile else module
        self.frozen = frozen

    def train_loader(self, epoch: int, start_step: int) -> DataLoader:
        sampler = ResumableSampler(self.train_set, self.dist, self.args.seed, epoch, start_step * self.args.batch_size)
        return DataLoader(self.train_set, batch_size=self.args.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.args.workers, pin_memory=self.device.type == 'cuda',
                          # its own generator: creating the iterator must not draw from the global RNG
                          generator=torch.Generator().manual_seed(self.args.seed * 1000 + epoch))

    def train_epoch(self) -> None:
        args, progress = self.args, self.progress
        self.wrap_for_training(frozen=progress.epoch < args.freeze_epochs)
        self.train_model.train()
        loader = self.train_loader(progress.epoch, progress.step)
        bar = tqdm(loader, total=self.steps_per_epoch, initial=progress.step, leave=False, dynamic_ncols=True,
                   desc=f'epoch {progress.epoch + 1}/{args.epochs}', disable=not self.dist.is_main)
        start = time.perf_counter() - progress.seconds
        for images, targets in bar:
            images, targets = to_device(images, self.device), targets.to(self.device, non_blocking=True)
            with autocast(self.device):
                logits = self.train_model(images)
                loss = self.criterion(logits.float(), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if args.clip_grad:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            progress.num_updates += 1
            self.scheduler.step_update(progress.num_updates)
            if self.ema is not None:
                self.ema.update(self.model, step=progress.num_updates)
            progress.step += 1
            progress.loss_sum += loss.item() * len(targets)
            progress.correct += (logits.argmax(1) == targets).sum().item()
            progress.seen += len(targets)
            progress.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f'{progress.loss_sum / progress.seen:.3f}',
                            acc=f'{100 * progress.correct / progress.seen:.1f}%',
                            img_s=f'{progress.seen * self.dist.world_size / progress.seconds:.1f}')
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0 \
                    and progress.step < self.steps_per_epoch:
                self.save_resume()
                if self.dist.is_main:
                    bar.write(f'saved resume checkpoint at epoch {progress.epoch + 1}, '
                              f'step {progress.step}/{self.steps_per_epoch}')
        bar.close()

    @torch.inference_mode()
    def validate(self) -> Tuple[float, float]:
        """(loss, accuracy) of the evaluated model on the whole validation set, reduced over ranks."""
        loader = DataLoader(self.val_set, batch_size=self.args.batch_size, num_workers=self.args.workers,
                            pin_memory=self.device.type == 'cuda', generator=torch.Generator())
        logits, targets = predict_loader(self.eval_model(), loader, self.device)
        loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction='sum').item()
        correct = (logits.argmax(1) == targets).sum().item()
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, len(targets)], self.dist, self.device)
        return loss_sum / count, correct / count

    def finish_epoch(self) -> None:
        progress, args = self.progress, self.args
        lr = self.optimizer.param_groups[0]['lr']
        if self.dist.enabled:  # each rank updated its BatchNorm statistics on its own shard: average them
            distribute_bn(self.model, self.dist.world_size, reduce=True)
            if self.ema is not None:
                distribute_bn(self.ema.module, self.dist.world_size, reduce=True)
        loss_sum, correct, seen = all_reduce_sum([progress.loss_sum, progress.correct, progress.seen],
                                                 self.dist, self.device)
        val_loss, val_acc = self.validate()
        row = dict(epoch=progress.epoch + 1, lr=lr, train_loss=loss_sum / seen, train_acc=correct / seen,
                   val_loss=val_loss, val_acc=val_acc, seconds=progress.seconds,
                   images_per_s=seen / max(progress.seconds, 1e-9))
        progress.history.append(row)
        improved = val_acc > progress.best_acc
        if improved:
            progress.best_acc, progress.best_epoch = val_acc, progress.epoch + 1
            self.save_best(val_acc)
        if self.dist.is_main:
            self.write_metrics()
            print(f'epoch {row["epoch"]:>3d}/{args.epochs}  lr {lr:.2e}  train loss {row["train_loss"]:.4f} '
                  f'acc {100 * row["train_acc"]:5.1f}%  val loss {val_loss:.4f} acc {100 * val_acc:5.1f}%'
                  f'{"  *best*" if improved else ""}  {row["seconds"]:.1f}s  {row["images_per_s"]:.1f} img/s',
                  flush=True)
        self.scheduler.step(progress.epoch + 1)
        progress.start_epoch(progress.epoch + 1)
        self.save_resume()

    def train(self) -> None:
        while self.progress.epoch < self.args.epochs:
            self.train_epoch()
            self.finish_epoch()

    # --- outputs -----------------------------------------------------------------------------------------
    def write_report(self, wall_seconds: float) -> Dict[str, Any]:
        """Figures and summary.json for the best checkpoint, reloaded from disk (which checks it loads)."""
        from .plots import save_confusion, save_curves, save_predictions_grid

        best = prepare_for_device(load_model(self.path('best')), self.device)
        val_samples = self.splits.val
        loader = DataLoader(ImageSamples(val_samples, self.eval_transform), batch_size=self.args.batch_size,
                            num_workers=self.args.workers)
        logits, targets = predict_loader(best, loader, self.device)
        predicted = logits.argmax(1)
        report = classification_report(predicted, targets, self.classes)
        save_curves(self.progress.history, self.path('curves'))
        save_confusion(torch.tensor(report.confusion), self.classes, self.path('confusion'))
        shown = np.linspace(0, len(val_samples) - 1, min(GRID_IMAGES, len(val_samples))).round().astype(int)
        save_predictions_grid([val_samples[i][0] for i in shown], predicted[shown].tolist(), targets[shown].tolist(),
                              self.classes, self.path('predictions'))
        summary = dict(
            model=self.args.model, weights=self.source, classes=self.classes, device=str(self.device),
            world_size=self.dist.world_size, train_images=len(self.splits.train), val_images=len(val_samples),
            skipped_images=len(self.splits.skipped),
            skipped=[dict(path=p, reason=r) for p, r in self.splits.skipped],
            epochs=self.args.epochs, best_epoch=self.progress.best_epoch, best_val_acc=self.progress.best_acc,
            final_val_acc=self.progress.history[-1]['val_acc'], best_report=report.to_dict(),
            wall_seconds=wall_seconds, args=plain_args(self.args),
            outputs={name: str(self.path(name)) for name in RUN_FILES})
        with atomic_file(self.path('summary')) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        print('\n' + format_report(report), flush=True)
        return summary


def prepare_run_dir(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if (out / RUN_FILES['resume']).exists():
        raise ResNetV2ZooError(f'{out} already holds a run; continue it with --resume {out} or choose another --out')
    out.mkdir(parents=True, exist_ok=True)


def read_resume_state(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / RUN_FILES['resume']
    if not path.is_file():
        raise ResNetV2ZooError(f'nothing to resume: {path} does not exist')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a foreign or damaged file: torch raises pickle/zip errors of many kinds
        raise ResNetV2ZooError(f'{path} is not a resume checkpoint ({type(e).__name__}: {e})') from e
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise ResNetV2ZooError(f'{path} has resume format {found}, expected {RESUME_FORMAT}')
    return state


def run_finetune(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Train as `args` says; returns the summary on rank 0 (None on other ranks)."""
    start = time.perf_counter()
    resume_state = None
    if args.resume:
        resume_state = read_resume_state(Path(args.resume))
        args = argparse.Namespace(**dict(resume_state['args'], out=args.resume))
    dist, device = init_distributed(args.device)
    if dist.is_main and resume_state is None:
        prepare_run_dir(args)
    torch.backends.cudnn.benchmark = device.type == 'cuda'
    run = Run(args, dist, device, resume_state)
    if dist.is_main:
        splits = run.splits
        print(f'{len(splits.train)} training and {len(splits.val)} validation images in {len(run.classes)} classes '
              f'({", ".join(run.classes)}); {len(splits.skipped)} unreadable file(s) skipped. Model {args.model} '
              f'({run.source}) on {device}' + (f' x {dist.world_size} processes' if dist.enabled else '') + '.',
              flush=True)
        if resume_state is None:
            from .plots import save_samples_grid

            save_samples_grid(splits.train[:: max(1, len(splits.train) // GRID_IMAGES)][:GRID_IMAGES], run.classes,
                              run.path('samples'))
        else:
            print(f'resuming at epoch {run.progress.epoch + 1}, step {run.progress.step}', flush=True)
    run.train()
    summary = run.write_report(time.perf_counter() - start) if dist.is_main else None
    if dist.enabled:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return summary


def finetune_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `finetune` options as the CLI does (for callers such as the demo and the benchmark)."""
    parser = argparse.ArgumentParser(prog='resnetv2-zoo finetune')
    add_finetune_arguments(parser)
    return resolve_recipe(parser.parse_args(argv))


def resolve_recipe(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every recipe option the command line left unset from the chosen recipe."""
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group('data')
    data.add_argument('--data', help='training images, one folder per class')
    data.add_argument('--val-data', help='validation images (same class folders); default: split off --data')
    data.add_argument('--val-split', type=float, default=0.2, help='stratified validation fraction of --data')
    data.add_argument('--img-size', type=int, default=None, help="training resolution (default: the model's)")
    data.add_argument('--workers', type=int, default=0 if not torch.cuda.is_available() else min(8, os.cpu_count()),
                      help='DataLoader worker processes per rank')
    model = parser.add_argument_group('model')
    model.add_argument('--model', default='resnet50v2_keras', help='timm model name')
    model.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                       help='start from ImageNet weights; default: if available, else from scratch with a notice')
    model.add_argument('--init', help='start from this converted checkpoint (model directory or .safetensors)')
    recipe = parser.add_argument_group('recipe (each option overrides the --recipe setting)')
    recipe.add_argument('--recipe', choices=sorted(RECIPES), default='default')
    recipe.add_argument('--epochs', type=int, default=10)
    recipe.add_argument('--batch-size', type=int, default=None)
    recipe.add_argument('--opt', default=None, help='timm optimizer name (adamw, adam, sgd, lamb, ...)')
    recipe.add_argument('--lr', type=float, default=None)
    recipe.add_argument('--weight-decay', type=float, default=None)
    recipe.add_argument('--sched', default=None, help='timm scheduler name (cosine, step, ...)')
    recipe.add_argument('--warmup-epochs', type=int, default=None)
    recipe.add_argument('--decay-epochs', type=float, default=None, help='step scheduler: epochs between decays')
    recipe.add_argument('--decay-rate', type=float, default=None, help='step scheduler: lr factor per decay')
    recipe.add_argument('--label-smoothing', type=float, default=None)
    recipe.add_argument('--augment', action=argparse.BooleanOptionalAction, default=None,
                        help='random resized crops, flips and colour jitter on training images')
    recipe.add_argument('--clip-grad', type=float, default=None, help='gradient norm limit (0: none)')
    recipe.add_argument('--freeze-epochs', type=int, default=0, help='epochs training only the new head first')
    recipe.add_argument('--bn-momentum', type=float, default=0.1,
                        help="BatchNorm running-statistics momentum (PyTorch convention); Keras's 0.01 suits long "
                             'ImageNet training but lags far behind the weights over a short fine-tune')
    recipe.add_argument('--ema-decay', type=float, default=0.0, help='keep and evaluate an EMA of the weights')
    run = parser.add_argument_group('run')
    run.add_argument('--out', help='run directory for checkpoints, metrics and figures')
    run.add_argument('--resume', metavar='RUN_DIR', help='continue the run in RUN_DIR where it stopped')
    run.add_argument('--checkpoint-every', type=int, default=0,
                     help='also save the resume checkpoint every N steps (default: at the end of each epoch)')
    run.add_argument('--seed', type=int, default=0)
    run.add_argument('--device', default=None, help='default: cuda when available, else cpu')
    run.add_argument('--compile', action='store_true', help='torch.compile the model')


def run_finetune_command(args: argparse.Namespace) -> None:
    if not args.resume and not (args.data and args.out):
        raise ResNetV2ZooError('finetune needs --data DIR and --out RUN_DIR (or --resume RUN_DIR)')
    run_finetune(resolve_recipe(args))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('finetune', help='fine-tune a model on an image folder',
                            description='Fine-tune a ResNetV2 on a folder of class folders and write checkpoints, '
                                        'metrics and figures to a run directory.')
    add_finetune_arguments(parser)
    parser.set_defaults(func=run_finetune_command)
