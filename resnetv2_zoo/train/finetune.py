"""`resnetv2-zoo finetune`: adapt a (pretrained) ResNetV2 to an image folder, resumably, on CPU, GPU or many GPUs.

The recipe is timm's (create_optimizer_v2 / create_scheduler_v2, ModelEmaV3); `--recipe tutorial` is the
original tutorial's, kept for side-by-side comparison. Runs launched through `torchrun` or SLURM `srun`
(timm's `init_distributed_device`) train with DistributedDataParallel and only rank 0 writes. A run stopped
at any point (Ctrl-C, or even SIGKILL) continues with `--resume RUN_DIR` to the same result an
uninterrupted run reaches (see `resume.py`). The loop is timm train.py's shape: `train_one_epoch`, then
`validate`, with the run's parts held in a plain `Run` record.

`finetune()` is the Python API (`resnetv2_zoo.finetune`); the command is a thin layer over it.
"""
import argparse
import contextlib
import csv
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import timm
import torch
import torch.distributed as torch_dist
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn, init_distributed_device, is_primary, random_seed, reduce_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..argtypes import (
    MIN_IMAGE_SIZE,
    float_in,
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from ..errors import ResNetV2ZooError, WeightsUnavailableError
from ..weights.atomic import atomic_file
from ..weights.checkpoint import README_NAME, inspect_checkpoint, load_model, save_model_dir, update_model_card
from . import resume
from .data import SPLITS, DataSplits, ImageSamples, build_transforms, data_config_for, load_splits
from .evaluate import ClassReport, Report, classification_report, format_report
from .keras_pipeline import PIPELINE_HELP, PIPELINES, check_pipeline
from .resume import RUN_FILES, Progress, ResumableSampler, plain_args
from .runtime import (
    TIMM_CHECKPOINT_SUFFIXES,
    amp_dtype,
    autocast,
    check_model_name,
    load_timm_checkpoint,
    pick_device,
    predict_samples,
    prepare_for_device,
    to_device,
)

__all__ = ['RECIPES', 'RUN_FILES', 'Run', 'FinetuneResult', 'finetune', 'setup_run', 'train_one_epoch', 'validate',
           'run_epoch', 'run_finetune', 'finetune_args', 'add_finetune_arguments', 'output_lines', 'register']

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

# Each recipe setting is also a command-line option that overrides it.
RECIPES: Dict[str, Dict[str, Any]] = {
    'default': dict(opt='adamw', lr=1e-3, weight_decay=0.05, sched='cosine', warmup_epochs=1, decay_epochs=None,
                    decay_rate=0.1, batch_size=32, label_smoothing=0.1, augment=True, clip_grad=1.0),
    # The tutorial: Adam at 1e-4, batch 32, no augmentation, learning rate x 0.92 every 4 epochs.
    'tutorial': dict(opt='adam', lr=1e-4, weight_decay=0.0, sched='step', warmup_epochs=0, decay_epochs=4,
                     decay_rate=0.92, batch_size=32, label_smoothing=0.0, augment=False, clip_grad=0.0),
}
# Defaults of the other options. The parser leaves every option None unless given, so that `--resume` can
# tell which flags were typed; `resolve_options` fills these in for a new run.
DEFAULTS: Dict[str, Any] = dict(recipe='default', val_split=0.2, split='stratified', pipeline='timm',
                                model='resnet50v2_keras', epochs=10, freeze_epochs=0,
                                bn_momentum=0.1, ema_decay=0.0, checkpoint_every=0, seed=0, compile=False,
                                workers=0 if not torch.cuda.is_available() else min(8, os.cpu_count() or 1))
METRIC_COLUMNS = ('epoch', 'lr', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'seconds', 'images_per_s')
GRID_IMAGES = 16
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C


def init_distributed(device_name: Optional[str]) -> Tuple[argparse.Namespace, torch.device]:
    """This process's place in a torchrun / SLURM / MPI launch and its device.

    The namespace holds timm's fields (`rank`, `local_rank`, `world_size`, `distributed`) for `is_primary`.
    """
    device = pick_device(device_name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ResNetV2ZooError(f'--device {device_name}: CUDA is not available on this machine')
    dist = argparse.Namespace(device=str(device))
    return dist, init_distributed_device(dist)


def is_timm_checkpoint(path: str) -> bool:
    """A timm train.py checkpoint (`.pth.tar` and kin) rather than one of our safetensors checkpoints."""
    return os.path.isfile(path) and path.endswith(TIMM_CHECKPOINT_SUFFIXES)


def init_architecture(path: str) -> str:
    """The architecture an `--init` checkpoint holds (refusing, in one line, a file that is not one)."""
    if is_timm_checkpoint(path):
        return load_timm_checkpoint(path).pretrained_cfg['architecture']
    return inspect_checkpoint(path).architecture


def load_init(path: str, num_classes: int) -> torch.nn.Module:
    """`--init`: a converted checkpoint (model directory, `.safetensors`) or a timm train.py checkpoint (read with
    `torch.load(weights_only=True)`), with a new `num_classes` head unless it already has that many classes."""
    if not is_timm_checkpoint(path):
        return load_model(path, num_classes=num_classes)
    model = load_timm_checkpoint(path)
    if model.num_classes != num_classes:
        model.reset_classifier(num_classes)
    return model


def _weights_problem(model_name: str, error: Exception) -> WeightsUnavailableError:
    """Any failure to fetch a timm model's pretrained weights (huggingface_hub's LocalEntryNotFoundError offline,
    an HTTP error, a missing file) as the one-line error our own models give."""
    if isinstance(error, WeightsUnavailableError):
        return error
    reason = (str(error).strip().splitlines() or [''])[0]
    reason = reason if len(reason) <= 160 else reason[:157] + '...'
    return WeightsUnavailableError(f'no pretrained weights for {model_name} could be loaded ({type(error).__name__}'
                                   f'{": " + reason if reason else ""})')


def create_classifier(args: argparse.Namespace, num_classes: int, resuming: bool = False
                      ) -> Tuple[torch.nn.Module, str]:
    """(model with a `num_classes` head, where its weights came from).

    Without `--pretrained` (None), a model whose weights cannot be had (offline, none published) trains from
    scratch after a notice; with `--pretrained` that is an error, and with `--no-pretrained` nothing is fetched.
    """
    if resuming:
        return timm.create_model(args.model, num_classes=num_classes), 'resume checkpoint'  # weights: loaded next
    if args.init:
        return load_init(args.init, num_classes), f'init {args.init}'
    if args.pretrained is False:
        return timm.create_model(args.model, num_classes=num_classes), 'scratch'
    cfg = timm.models.get_pretrained_cfg(args.model) if timm.is_model(args.model) else None
    try:
        if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
            # timm would warn and hand back random weights as if they were pretrained
            raise WeightsUnavailableError(f'timm has no pretrained weights for {args.model}')
        return timm.create_model(args.model, pretrained=True, num_classes=num_classes), 'pretrained'
    except Exception as e:
        if isinstance(e, ResNetV2ZooError) and not isinstance(e, WeightsUnavailableError):
            raise  # a refusal of ours (a damaged cache, a bad local-dir), not missing weights
        problem = _weights_problem(args.model, e)
        if args.pretrained:
            raise problem from e
    _logger.warning('%s\n  -> training %s from scratch (random initialization). Pass --pretrained to make this '
                    'an error, or --init FILE to start from a converted checkpoint.', problem, args.model)
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


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    """timm's scheduler for `args.epochs` epochs (cosine steps per update, others per epoch)."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_rate=args.decay_rate, warmup_epochs=args.warmup_epochs, warmup_lr=args.lr * 0.01,
        min_lr=args.lr * 0.01, step_on_epochs=args.sched != 'cosine', updates_per_epoch=steps_per_epoch)
    return scheduler


@dataclass
class Run:
    """The parts one fine-tuning run trains with and the folder it writes; the functions below do the work."""
    args: argparse.Namespace
    dist: argparse.Namespace  # rank, world_size, distributed (see init_distributed)
    device: torch.device
    run_dir: Path
    splits: DataSplits
    source: str  # where the starting weights came from
    model: torch.nn.Module
    ema: Optional[ModelEmaV3]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    train_set: ImageSamples
    eval_transform: Any
    steps_per_epoch: int
    progress: Progress = field(default_factory=Progress)
    train_module: Optional[torch.nn.Module] = None  # what the loop calls (DDP / compiled); rebuilt on (un)freezing
    frozen: Optional[bool] = None

    @property
    def classes(self) -> List[str]:
        return self.splits.classes

    def path(self, name: str) -> Path:
        return self.run_dir / RUN_FILES[name]

    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def setup_run(args: argparse.Namespace, dist: argparse.Namespace, device: torch.device, run_dir: Path,
              resume_state: Optional[Dict[str, Any]] = None) -> Run:
    """Data, model, optimizer and schedule for `args`; continued from `resume_state` when given. Writes nothing."""
    random_seed(args.seed, dist.rank)
    # runs saved before --split and --pipeline existed resume as they ran
    splits = load_splits(args.data, args.val_data, args.val_split, args.seed,
                         split=getattr(args, 'split', None) or 'stratified')
    if resume_state is not None and resume_state['classes'] != splits.classes:
        raise ResNetV2ZooError(f'{args.data} now has classes {splits.classes}, the run was started with '
                               f'{resume_state["classes"]}')
    model, source = create_classifier(args, len(splits.classes), resuming=resume_state is not None)
    set_bn_momentum(model, args.bn_momentum)
    args.img_size = args.img_size or model.pretrained_cfg['input_size'][-1]
    # Saved checkpoints carry the resolution they were trained at, so evaluate/predict default to it.
    size = (3, args.img_size, args.img_size)
    # The fine-tuned model is not the weights it started from: no pretrained tag, no claim of their accuracy.
    model.pretrained_cfg = model.default_cfg = dict(
        model.pretrained_cfg, input_size=size, test_input_size=size, test_pool_size=None, tag=None, url=None,
        hf_hub_id=None, notes=(f'Fine-tuned by resnetv2-zoo on the image folder {Path(args.data).name} from '
                               f'{source}.',))
    model = prepare_for_device(model, device)
    train_transform, eval_transform = build_transforms(model, args.img_size, args.augment,
                                                       pipeline=getattr(args, 'pipeline', None) or 'timm')
    steps_per_epoch = len(splits.train) // dist.world_size // args.batch_size
    if steps_per_epoch == 0:
        raise ResNetV2ZooError(f'{len(splits.train)} training images over {dist.world_size} process(es) do not fill '
                               f'one batch of {args.batch_size}; lower --batch-size')
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    run = Run(args, dist, device, Path(run_dir), splits, source, model,
              ModelEmaV3(model, decay=args.ema_decay, use_warmup=True) if args.ema_decay else None,
              optimizer, create_scheduler(args, optimizer, steps_per_epoch),
              torch.amp.GradScaler(device.type, enabled=amp_dtype(device) == torch.float16),
              torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing),
              ImageSamples(splits.train, train_transform), eval_transform, steps_per_epoch)
    if resume_state is not None:
        resume.restore_checkpoint(run, resume_state)
    return run


def train_module_for(run: Run, frozen: bool) -> torch.nn.Module:
    """The module the train loop calls; DDP must be rebuilt when the trainable set changes."""
    if frozen != run.frozen:
        set_backbone_frozen(run.model, frozen)
        module = run.model
        if run.dist.distributed:
            module = DistributedDataParallel(module, device_ids=[run.device.index] if run.device.type == 'cuda'
                                             else None)
        run.train_module = torch.compile(module) if run.args.compile else module
        run.frozen = frozen
    return run.train_module


def train_loader(train_set: ImageSamples, args: argparse.Namespace, dist: argparse.Namespace, device: torch.device,
                 epoch: int, start_step: int) -> DataLoader:
    """Epoch `epoch`'s seeded shuffle of this rank's shard, from batch `start_step` on."""
    sampler = ResumableSampler(train_set, dist.world_size, dist.rank, args.seed, epoch, start_step * args.batch_size)
    return DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                      num_workers=args.workers, pin_memory=device.type == 'cuda',
                      # its own generator: creating the iterator must not draw from the global RNG
                      generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))


def _logging_beside(bar: tqdm) -> contextlib.AbstractContextManager:
    """Route the package's console log lines through tqdm while its bar is drawn, so they don't cut through it."""
    package_logger = logging.getLogger(__name__.split('.')[0])
    if bar.disable or not package_logger.handlers:
        return contextlib.nullcontext()
    return logging_redirect_tqdm([package_logger])


def train_one_epoch(model: torch.nn.Module, train_module: torch.nn.Module, loader: DataLoader,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                    criterion: torch.nn.Module, ema: Optional[ModelEmaV3], progress: Progress,
                    args: argparse.Namespace, device: torch.device, steps_per_epoch: int, world_size: int,
                    save_checkpoint: Callable[[], None], primary: bool = True) -> None:
    """Train the batches `loader` has left of epoch `progress.epoch`, keeping this rank's totals in `progress`."""
    train_module.train()
    bar = tqdm(loader, total=steps_per_epoch, initial=progress.step, leave=False, dynamic_ncols=True,
               desc=f'epoch {progress.epoch + 1}/{args.epochs}', disable=not primary)
    start = time.perf_counter() - progress.seconds
    with _logging_beside(bar):
        for images, targets in bar:
            images, targets = to_device(images, device), targets.to(device, non_blocking=True)
            with autocast(device):
                logits = train_module(images)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            progress.num_updates += 1
            scheduler.step_update(progress.num_updates)
            if ema is not None:
                ema.update(model, step=progress.num_updates)
            progress.step += 1
            progress.loss_sum += loss.item() * len(targets)
            progress.correct += (logits.argmax(1) == targets).sum().item()
            progress.seen += len(targets)
            progress.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f'{progress.loss_sum / progress.seen:.3f}',
                            acc=f'{100 * progress.correct / progress.seen:.1f}%',
                            img_s=f'{progress.seen * world_size / progress.seconds:.1f}')
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0 and progress.step < steps_per_epoch:
                save_checkpoint()
                if primary:
                    _logger.info('saved resume checkpoint at epoch %d, step %d/%d', progress.epoch + 1, progress.step,
                                 steps_per_epoch)
    bar.close()


def reduce_sums(values: Sequence[float], dist: argparse.Namespace, device: torch.device) -> List[float]:
    """Each value summed over all ranks."""
    if not dist.distributed:
        return list(values)
    return reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device), 1).tolist()  # n=1: sums


def validate(model: torch.nn.Module, samples: Sequence[Tuple[str, int]], transform: Any, device: torch.device,
             args: argparse.Namespace, dist: argparse.Namespace) -> Tuple[float, float]:
    """(loss, accuracy) of `model` on the validation set; each rank predicts its shard of `samples`, unpadded,
    so the reduced totals count every image exactly once."""
    logits, targets = predict_samples(model, samples[dist.rank::dist.world_size], transform, device,
                                      batch_size=args.batch_size, workers=args.workers)
    loss_sum = torch.nn.functional.cross_entropy(logits, targets, reduction='sum').item()
    correct = (logits.argmax(1) == targets).sum().item()
    loss_sum, correct, count = reduce_sums([loss_sum, correct, len(targets)], dist, device)
    return loss_sum / count, correct / count


def run_epoch(run: Run) -> None:
    """Train what is left of the current epoch, then validate and record it, and save the resume checkpoint."""
    progress, args = run.progress, run.args
    loader = train_loader(run.train_set, args, run.dist, run.device, progress.epoch, progress.step)
    train_one_epoch(run.model, train_module_for(run, frozen=progress.epoch < args.freeze_epochs), loader,
                    run.optimizer, run.scheduler, run.scaler, run.criterion, run.ema, progress, args, run.device,
                    run.steps_per_epoch, run.dist.world_size, lambda: resume.save_checkpoint(run), is_primary(run.dist))
    lr = run.optimizer.param_groups[0]['lr']
    if run.dist.distributed:  # each rank updated its BatchNorm statistics on its own shard: average them
        distribute_bn(run.model, run.dist.world_size, reduce=True)
        if run.ema is not None:
            distribute_bn(run.ema.module, run.dist.world_size, reduce=True)
    loss_sum, correct, seen = reduce_sums([progress.loss_sum, progress.correct, progress.seen], run.dist, run.device)
    val_loss, val_acc = validate(run.eval_model(), run.splits.val, run.eval_transform, run.device, args, run.dist)
    row = dict(epoch=progress.epoch + 1, lr=lr, train_loss=loss_sum / seen, train_acc=correct / seen,
               val_loss=val_loss, val_acc=val_acc, seconds=progress.seconds,
               images_per_s=seen / max(progress.seconds, 1e-9))
    progress.history.append(row)
    improved = val_acc > progress.best_acc
    if improved:
        progress.best_acc, progress.best_epoch = val_acc, progress.epoch + 1
        if is_primary(run.dist):
            save_model_dir(run.eval_model(), run.path('best'), label_names=run.classes,
                           metadata=dict(val_acc=f'{val_acc:.6f}', epoch=str(progress.epoch + 1), **card_facts(run)))
    if is_primary(run.dist):
        write_metrics(progress.history, run.path('metrics'))
        print(f'epoch {row["epoch"]:>3d}/{args.epochs}  lr {lr:.2e}  train loss {row["train_loss"]:.4f} '
              f'acc {100 * row["train_acc"]:5.1f}%  val loss {val_loss:.4f} acc {100 * val_acc:5.1f}%'
              f'{"  *best*" if improved else ""}  {row["seconds"]:.1f}s  {row["images_per_s"]:.1f} img/s', flush=True)
    run.scheduler.step(progress.epoch + 1)
    progress.start_epoch(progress.epoch + 1)
    resume.save_checkpoint(run)


def card_facts(run: Run) -> Dict[str, str]:
    """What the best model's card (and weights metadata) say about the run: names, not local paths."""
    source = f'init {Path(run.args.init).name}' if run.args.init else run.source
    return dict(epochs=str(run.args.epochs), finetune_data=Path(run.args.data).name, finetune_weights=source,
                train_images=str(len(run.splits.train)), val_images=str(len(run.splits.val)),
                img_size=str(run.args.img_size))


def write_metrics(history: List[Dict[str, float]], path: Path) -> None:
    with atomic_file(path) as tmp, open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def write_report(run: Run, wall_seconds: float) -> Dict[str, Any]:
    """Figures and summary.json for the best checkpoint, reloaded from disk (which checks it loads)."""
    from .plots import save_confusion, save_curves, save_predictions_grid

    best = prepare_for_device(load_model(run.path('best')), run.device)
    val_samples = run.splits.val
    logits, targets = predict_samples(best, val_samples, run.eval_transform, run.device,
                                      batch_size=run.args.batch_size, workers=run.args.workers)
    predicted = logits.argmax(1)
    report = classification_report(predicted, targets, run.classes)
    save_curves(run.progress.history, run.path('curves'))
    save_confusion(torch.tensor(report.confusion), run.classes, run.path('confusion'))
    shown = np.linspace(0, len(val_samples) - 1, min(GRID_IMAGES, len(val_samples))).round().astype(int)
    save_predictions_grid([val_samples[i][0] for i in shown], predicted[shown].tolist(), targets[shown].tolist(),
                          run.classes, run.path('predictions'))
    test_report = None
    if run.splits.test:  # the dataset root's test/: scored once, with the best checkpoint
        test_logits, test_targets = predict_samples(best, run.splits.test, run.eval_transform, run.device,
                                                    batch_size=run.args.batch_size, workers=run.args.workers)
        test_report = classification_report(test_logits.argmax(1), test_targets, run.classes)
    card_update = dict(epochs=str(run.args.epochs))
    if test_report is not None:
        card_update.update(test_acc=f'{test_report.accuracy:.6f}', test_images=str(test_report.num_images))
    update_model_card(run.path('best'), card_update)
    layout = run.splits.layout
    summary = dict(
        model=run.args.model, weights=run.source, classes=run.classes, device=str(run.device),
        world_size=run.dist.world_size, data_layout=layout.description if layout else None,
        train_images=len(run.splits.train), val_images=len(val_samples), test_images=len(run.splits.test),
        skipped_images=len(run.splits.skipped), skipped=[dict(path=p, reason=r) for p, r in run.splits.skipped],
        epochs=run.args.epochs, best_epoch=run.progress.best_epoch, best_val_acc=run.progress.best_acc,
        final_val_acc=run.progress.history[-1]['val_acc'], best_report=report.to_dict(),
        test_report=test_report.to_dict() if test_report is not None else None,
        wall_seconds=wall_seconds, args=plain_args(run.args),
        outputs={name: str(run.path(name)) for name in RUN_FILES})
    with atomic_file(run.path('summary')) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    print('\n== validation (best epoch)\n' + format_report(report), flush=True)
    if test_report is not None:
        print(f'\n== test ({layout.test}, best epoch)\n' + format_report(test_report), flush=True)
    return summary


def on_rank_zero(dist: argparse.Namespace, action: Callable[[], None]) -> None:
    """Do `action` (a check or a write of the run folder) on rank 0 only; every rank raises its refusal."""
    error, message = None, None
    if is_primary(dist):
        try:
            action()
        except Exception as e:
            error, message = e, str(e) if isinstance(e, ResNetV2ZooError) else f'rank 0 failed: {e!r}'
    if dist.distributed:
        box = [message]
        torch_dist.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message is not None:
        raise ResNetV2ZooError(message)


def run_finetune(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Train as `args` says, or continue the run `args.resume`; returns the summary on rank 0 (None elsewhere).

    A new run's folder is checked first and created only once data and model are ready, so a refused run
    leaves nothing behind; the run then holds the folder (one writer) until it ends.
    """
    start = time.perf_counter()
    dist, device = init_distributed(args.device)
    with contextlib.ExitStack() as stack:
        if args.resume:
            run_dir = Path(args.resume)
            resume.resume_checkpoint(run_dir)  # refuses a folder without one before anything is written
            on_rank_zero(dist, lambda: stack.enter_context(resume.hold_run_folder(run_dir, fresh=False)))
            state = resume.read_resume_state(run_dir)
            args = argparse.Namespace(**dict(resume.resumed_options(state['args'], args, run_dir), out=str(run_dir)))
        else:
            run_dir, state = Path(args.out), None
            on_rank_zero(dist, lambda: resume.check_out(run_dir, (args.data, args.val_data)))
        torch.backends.cudnn.benchmark = device.type == 'cuda'
        run = setup_run(args, dist, device, run_dir, state)
        if state is None:
            on_rank_zero(dist, lambda: stack.enter_context(resume.hold_run_folder(run_dir, fresh=True)))
            resume.save_checkpoint(run)  # resumable from the first step on
        announce(run, resumed=state is not None)
        while run.progress.epoch < args.epochs:
            run_epoch(run)
        summary = write_report(run, time.perf_counter() - start) if is_primary(dist) else None
    if dist.distributed:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    return summary


def announce(run: Run, resumed: bool) -> None:
    if not is_primary(run.dist):
        return
    splits = run.splits
    if splits.layout is not None:
        _logger.info('data: %s', splits.layout.description)
    _logger.info('%d training and %d validation images%s in %d classes (%s); %d unreadable file(s) skipped. Model %s '
                 '(%s) on %s%s.', len(splits.train), len(splits.val),
                 f' (and {len(splits.test)} test images)' if splits.test else '', len(run.classes),
                 ', '.join(run.classes), len(splits.skipped), run.args.model, run.source, run.device,
                 f' x {run.dist.world_size} processes' if run.dist.distributed else '')
    if resumed:
        _logger.info('resuming at epoch %d, step %d', run.progress.epoch + 1, run.progress.step)
    else:
        save_samples(run)


def save_samples(run: Run) -> None:
    """samples.png: training photos beside the augmented, resized inputs the model trains on.

    The augmentation draws from a seeded RNG and every RNG state is put back afterwards, so the figure is
    the same for the same seed and the training run is exactly what it would be without it.
    """
    from .plots import save_training_inputs_grid

    by_class: Dict[int, List[Tuple[str, int]]] = {}
    for sample in run.splits.train:
        by_class.setdefault(sample[1], []).append(sample)
    # every class in turn (as many as fit), each spread over its images
    cells = GRID_IMAGES // 2
    per_class = -(-cells // len(by_class))
    picks = [members[k * len(members) // per_class] for k in range(per_class) for members in by_class.values()]
    shown = sorted(list(dict.fromkeys(picks))[:cells], key=lambda sample: sample[1])
    config = data_config_for(run.model, run.args.img_size)
    state = resume.rng_state()
    try:
        random_seed(run.args.seed)
        save_training_inputs_grid(shown, run.train_set.transform, run.classes, config['mean'], config['std'],
                                  run.path('samples'), augmented=bool(run.args.augment))
    finally:
        resume.set_rng_state(state)


# --- command line ----------------------------------------------------------------------------------------
def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group('data')
    data.add_argument('--data', help='training images: a folder of class folders, or a dataset root of train/ '
                                     '[val/ (or valid/, validation/)] [test/] folders of them; val/ then validates '
                                     'and test/ gets the final report')
    data.add_argument('--val-data', help="validation images (same class folders); default: the root's val/, else "
                                         'split off the training images')
    data.add_argument('--val-split', type=fraction,
                      help='validation fraction split off --data when it has no validation folder (default 0.2)')
    data.add_argument('--split', choices=SPLITS,
                      help='how --val-split splits: stratified (each class in proportion, seeded by --seed) or keras '
                           '(exactly the files image_dataset_from_directory(DIR, validation_split=F, subset=..., '
                           'seed=N) takes, its .bmp .gif .jpeg .jpg .png only; --seed N is its seed) '
                           '(default stratified)')
    data.add_argument('--pipeline', choices=PIPELINES,
                      help=f'{PIPELINE_HELP}, for validation, test and the report; training images get the keras '
                           "pipeline too with --no-augment (as Keras's training dataset feeds them), timm's "
                           'augmentation otherwise (default timm)')
    data.add_argument('--img-size', type=image_size, help="training resolution (default: the model's)")
    data.add_argument('--workers', type=non_negative_int,
                      help=f'DataLoader worker processes per rank (default {DEFAULTS["workers"]})')
    model = parser.add_argument_group('model')
    model.add_argument('--model', help=f'timm model name (default {DEFAULTS["model"]}; with --init, its architecture)')
    model.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=None,
                       help='start from ImageNet weights; default: if available, else from scratch with a notice')
    model.add_argument('--init', help='start from this checkpoint: a model directory, .safetensors file or timm '
                                      'train.py .pth.tar (read with weights_only=True)')
    recipe = parser.add_argument_group('recipe (each option overrides the --recipe setting)')
    recipe.add_argument('--recipe', choices=sorted(RECIPES), help='(default: default)')
    recipe.add_argument('--epochs', type=positive_int,
                        help=f'(default {DEFAULTS["epochs"]}); with --resume, a larger value extends the run')
    recipe.add_argument('--batch-size', type=positive_int)
    recipe.add_argument('--opt', help='timm optimizer name (adamw, adam, sgd, lamb, ...)')
    recipe.add_argument('--lr', type=positive_float)
    recipe.add_argument('--weight-decay', type=non_negative_float)
    recipe.add_argument('--sched', help='timm scheduler name (cosine, step, ...)')
    recipe.add_argument('--warmup-epochs', type=non_negative_int)
    recipe.add_argument('--decay-epochs', type=positive_float, help='step scheduler: epochs between decays')
    recipe.add_argument('--decay-rate', type=positive_float, help='step scheduler: lr factor per decay')
    recipe.add_argument('--label-smoothing', type=float_in(0, 1, high_open=True))
    recipe.add_argument('--augment', action=argparse.BooleanOptionalAction, default=None,
                        help='random resized crops, flips and colour jitter on training images')
    recipe.add_argument('--clip-grad', type=non_negative_float, help='gradient norm limit (0: none)')
    recipe.add_argument('--freeze-epochs', type=non_negative_int,
                        help=f'epochs training only the new head first (default {DEFAULTS["freeze_epochs"]})')
    recipe.add_argument('--bn-momentum', type=float_in(0, 1),
                        help="BatchNorm running-statistics momentum (PyTorch convention, default 0.1); Keras's 0.01 "
                             'suits long ImageNet training but lags far behind the weights over a short fine-tune')
    recipe.add_argument('--ema-decay', type=float_in(0, 1, high_open=True),
                        help='keep and evaluate an EMA of the weights (default 0: none)')
    run = parser.add_argument_group('run')
    run.add_argument('--out', help='run folder for checkpoints, metrics and figures: new, empty, or a run folder '
                                   'without a resume checkpoint')
    run.add_argument('--resume', metavar='RUN_DIR', help='continue the run in RUN_DIR where it stopped')
    run.add_argument('--checkpoint-every', type=non_negative_int,
                     help='also save the resume checkpoint every N steps (default: at the end of each epoch)')
    run.add_argument('--seed', type=non_negative_int, help='(default 0)')
    run.add_argument('--device', help='default: cuda when available, else cpu')
    run.add_argument('--compile', action='store_true', default=None, help='torch.compile the model')
    # The recipe options stay None (so that --resume knows what was typed); --help still shows each default.
    for action in recipe._group_actions:
        if action.dest in RECIPES['default'] and 'default' not in (action.help or ''):
            values = '; '.join(f'{name} recipe: {settings[action.dest]}' for name, settings in RECIPES.items())
            action.help = f'{action.help} ({values})' if action.help else f'({values})'


def resolve_options(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in a new run's unset options from DEFAULTS and the chosen recipe (a resume keeps only what was typed)."""
    if args.resume:
        return args
    if args.model is not None:
        check_model_name(args.model)  # one line with the closest names, before anything is created
    if args.init:
        architecture = init_architecture(args.init)  # also refuses a missing or damaged file, before any work
        if args.model is not None and args.model != architecture:
            raise ResNetV2ZooError(f'--init {args.init} holds a {architecture}, not the --model {args.model}; drop '
                                   f'--model or pass --model {architecture}')
        args.model = architecture
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_pipeline(args.pipeline)  # e.g. --pipeline keras without simplejpeg: refused before any work
    for name in ('data', 'val_data', 'init'):  # absolute, so that a resume from another directory finds them
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    cfg = timm.models.get_pretrained_cfg(args.model)
    minimum = max(MIN_IMAGE_SIZE, cfg.min_input_size[-1] if cfg is not None and cfg.min_input_size else 0)
    if args.img_size is not None and args.img_size < minimum:
        raise ResNetV2ZooError(f'--img-size {args.img_size} is below the minimum input size of {args.model}, {minimum}')
    return args


def finetune_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse `finetune` options as the CLI does (for callers such as the demo and the benchmark)."""
    parser = argparse.ArgumentParser(prog='resnetv2-zoo finetune')
    add_finetune_arguments(parser)
    return resolve_options(parser.parse_args(argv))


@dataclass
class FinetuneResult:
    """What `finetune` made: the run folder, its best validation accuracy, the test report, every output."""

    run_dir: Path
    best_val_acc: float  # a fraction (0.9 = 90%), of the best epoch
    best_epoch: int
    val_report: Report  # the best checkpoint on the validation images
    test_report: Optional[Report]  # the best checkpoint on the dataset root's test/ folder, if it has one
    outputs: Dict[str, Path]  # RUN_FILES names (best, metrics, curves, ...) -> paths
    summary: Dict[str, Any]  # summary.json


def _report(data: Optional[Dict[str, Any]]) -> Optional[Report]:
    if data is None:
        return None
    return Report(**{**data, 'classes': [ClassReport(**c) for c in data['classes']],
                     'skipped': [tuple(s) for s in data.get('skipped', [])]})


def finetune_from_args(args: argparse.Namespace) -> Optional[FinetuneResult]:
    """Run `finetune` as the parsed options say; the result on rank 0 (None on the other DDP ranks)."""
    if not args.resume and not (args.data and args.out):
        raise ResNetV2ZooError('finetune needs --data DIR and --out RUN_DIR (or --resume RUN_DIR)')
    summary = run_finetune(resolve_options(args))
    if summary is None:
        return None
    run_dir = Path(args.resume or args.out)
    return FinetuneResult(run_dir, summary['best_val_acc'], summary['best_epoch'], _report(summary['best_report']),
                          _report(summary['test_report']), {name: run_dir / RUN_FILES[name] for name in RUN_FILES},
                          summary)


def finetune(data: Optional[PathLike] = None, out: Optional[PathLike] = None, epochs: Optional[int] = None,
             **options: Any) -> Optional[FinetuneResult]:
    """Fine-tune a (pretrained) model on an image folder, as `resnetv2-zoo finetune` does.

    Args:
        data: a folder of class folders, or a dataset root with train/ and val/ (or valid/, validation/)
            and test/ folders of them (timm train.py's layout): val/ then validates and test/ gets the final
            report. A folder named like a split is never taken as a class.
        out: the run folder (new, empty, or a run folder without a resume checkpoint).
        epochs: epochs to train (default 10); with `resume`, a larger value extends the run.
        **options: any other `finetune` option by its Python name: `model`, `pretrained`, `init`, `val_data`,
            `val_split`, `img_size`, `batch_size`, `lr`, `recipe`, `device`, `workers`, `seed`, `resume`, ...
            (`resnetv2-zoo finetune --help` lists them); each is checked as the command line checks it.

    Returns the run's `FinetuneResult` (None on the other ranks of a torchrun launch). Raises
    `ResNetV2ZooError` on bad input, before anything is created, and KeyboardInterrupt when interrupted:
    the run then continues with `finetune(resume=out)`.
    """
    parser = argparse.ArgumentParser(prog='resnetv2_zoo.finetune')
    add_finetune_arguments(parser)
    args = parser.parse_args([])
    actions = {a.dest: a for a in parser._actions if a.dest != 'help'}
    given = dict(options, data=data, out=out, epochs=epochs)
    for name, value in given.items():
        if name not in actions:
            raise TypeError(f'finetune() got an unknown option {name!r}; options: {", ".join(sorted(actions))}')
        if value is None:
            continue
        action = actions[name]
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ResNetV2ZooError(f'{name}={value!r}: expected True or False')
        elif action.type is not None:
            try:
                value = action.type(str(value))
            except argparse.ArgumentTypeError as e:
                raise ResNetV2ZooError(f'{name}={value!r}: {e}') from None
        if action.choices is not None and value not in action.choices:
            raise ResNetV2ZooError(f'{name}={value!r}: expected one of {", ".join(map(str, action.choices))}')
        setattr(args, name, value)
    return finetune_from_args(args)


def output_lines(run_dir: PathLike) -> List[str]:
    """Where every output of the run in `run_dir` is, one line each (what `finetune` and `demo` end with)."""
    run_dir = Path(run_dir)
    lines = [f'  {name:12s} {run_dir / RUN_FILES[name]}' for name in RUN_FILES]
    lines.append(f'  {"model card":12s} {run_dir / RUN_FILES["best"] / README_NAME}')
    return lines


def run_finetune_command(args: argparse.Namespace) -> None:
    run_dir = args.resume or args.out
    try:
        result = finetune_from_args(args)
    except KeyboardInterrupt:
        # The CLI prints the message as one line and exits 130; the last resume checkpoint is intact (written
        # atomically). Under DDP only rank 0 says it.
        if timm.utils.world_info_from_env()[1] != 0:
            raise SystemExit(INTERRUPTED_EXIT) from None
        if (Path(run_dir) / RUN_FILES['resume']).is_file():
            raise KeyboardInterrupt(f'interrupted; resume with: resnetv2-zoo finetune --resume {run_dir}') from None
        raise KeyboardInterrupt('interrupted before the run started; nothing was written') from None
    if result is not None:
        test = f', test {100 * result.test_report.accuracy:.1f}%' if result.test_report is not None else ''
        print(f'\nbest validation accuracy {100 * result.best_val_acc:.1f}% (epoch {result.best_epoch}){test}. '
              f'Outputs:', flush=True)
        print('\n'.join(output_lines(result.run_dir)), flush=True)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser('finetune', help='fine-tune a model on an image folder',
                            description='Fine-tune a ResNetV2 on a folder of class folders and write checkpoints, '
                                        'metrics and figures to a run directory.')
    add_finetune_arguments(parser)
    parser.set_defaults(func=run_finetune_command)
