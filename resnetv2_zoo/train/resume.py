"""A fine-tuning run folder and how a run continues in it.

- What a run folder is (`RUN_FILES`), and which `--out` a new run may use (`check_out`): a new or empty
  folder, or a run folder without a resume checkpoint; never a file, a path under a file, a folder inside
  the training images, or a folder holding anything else.
- One writer (`hold_run_folder`): the running process holds `run.lock`, an OS lock the kernel releases
  when the process dies (even by SIGKILL), and names itself in `run.lock.json`, so a second run is refused
  at once, naming the holder, while a killed run never blocks `--resume`.
- The resume checkpoint `last.pt`: model, optimizer, schedule, the position inside the epoch (`Progress`,
  `ResumableSampler`) and every RNG state, so a resumed run reaches the result an uninterrupted run reaches.
- What `--resume` may change (`resumed_options`): how and where the run executes, and `--epochs` upwards;
  anything that changes what is computed is refused, naming the flag and both values.
"""
import argparse
import contextlib
import datetime
import itertools
import json
import logging
import os
import random
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as torch_dist
from filelock import FileLock, Timeout
from torch.utils.data import DistributedSampler

from ..errors import ResNetV2ZooError
from ..weights.atomic import atomic_file
from .runtime import BEST_DIR

__all__ = [
    'RUN_FILES', 'LOCK_FILE', 'HOLDER_FILE', 'RESUME_FORMAT', 'Progress', 'ResumableSampler', 'rng_state',
    'set_rng_state', 'gather_rng_states', 'is_run_folder', 'check_out', 'hold_run_folder', 'save_resume_state',
    'resume_checkpoint', 'read_resume_state', 'resumed_options', 'plain_args', 'save_checkpoint', 'restore_checkpoint',
]

_logger = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]

RUN_FILES = dict(metrics='metrics.csv', samples='samples.png', curves='curves.png', confusion='confusion.png',
                 predictions='predictions.png', summary='summary.json', best=BEST_DIR, resume='last.pt')
# Present only while a process holds the folder (or after one was killed holding it).
LOCK_FILE = 'run.lock'
HOLDER_FILE = 'run.lock.json'
RESUME_FORMAT = 1
# Options a resumed run may change: how and where it executes, not what it computes. `--epochs` may grow.
RESUME_MAY_CHANGE = ('workers', 'device', 'checkpoint_every', 'compile')
# Options that are not run settings at all.
NOT_RUN_OPTIONS = ('func', 'command', 'resume', 'out')
PATH_OPTIONS = ('data', 'val_data', 'init')


# --- the position inside a run ---------------------------------------------------------------------------
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


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, a shard per rank) that can start part-way into an epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_replicas: int, rank: int, seed: int, epoch: int,
                 start: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
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


def gather_rng_states(world_size: int) -> List[Dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective call under DDP)."""
    if world_size == 1:
        return [rng_state()]
    gathered = [None] * world_size
    torch_dist.all_gather_object(gathered, rng_state())
    return gathered


# --- the run folder --------------------------------------------------------------------------------------
def is_run_folder(path: PathLike) -> bool:
    """A folder a finetune run made: it holds one of the run's files (or its lock)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (*RUN_FILES.values(), LOCK_FILE))


def _holder(run_dir: Path) -> str:
    try:
        info = json.loads((run_dir / HOLDER_FILE).read_text())
        return f'pid {info["pid"]} on {info["host"]}, started {info["started"]}'
    except (OSError, ValueError, TypeError, KeyError):
        return 'holder not recorded yet'


def _in_use(run_dir: Path) -> ResNetV2ZooError:
    return ResNetV2ZooError(f'{run_dir} is in use by a running finetune ({_holder(run_dir)}); wait for it to end, '
                            f'or choose another --out')


def _holds_a_run(run_dir: PathLike) -> ResNetV2ZooError:
    return ResNetV2ZooError(f'{run_dir} already holds a run; continue it with --resume {run_dir} or choose another '
                            f'--out')


def check_out(out: PathLike, inputs: Sequence[Optional[PathLike]]) -> None:
    """Refuse an `--out` a new run may not write, before anything is loaded or created.

    Allowed: a path that does not exist yet (its parents are created), an empty folder, or a run folder
    without a resume checkpoint (whose files the run then replaces).
    """
    path = Path(os.path.abspath(out))
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    if not existing.is_dir():
        where = 'is a file' if existing == path else f'is under {existing}, which is a file'
        raise ResNetV2ZooError(f'--out {out} {where}; choose a folder for the run')
    for data in filter(None, inputs):
        data = Path(data).resolve()
        if path.resolve() == data or data in path.resolve().parents:
            raise ResNetV2ZooError(f'--out {out} is inside the image folder {data}, where its files would be read '
                                   f'as images; choose a folder outside it')
    if path.is_dir() and any(path.iterdir()):
        if not is_run_folder(path):
            raise ResNetV2ZooError(f'--out {out} is a folder with other files in it; choose a new or empty folder')
        if (path / LOCK_FILE).exists():
            probe = FileLock(str(path / LOCK_FILE), timeout=0)
            try:
                probe.acquire()
            except Timeout:
                raise _in_use(Path(out)) from None
            probe.release()
        if (path / RUN_FILES['resume']).exists():
            raise _holds_a_run(out)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ResNetV2ZooError(f'cannot write --out {out}: {existing} is not writable')


def _make_dirs(path: Path) -> List[Path]:
    """Create `path` and its missing parents; the folders this call created, outermost first."""
    missing = []
    for p in (path, *path.parents):
        if os.path.lexists(p):
            break
        missing.append(p)
    made = []
    for p in reversed(missing):
        try:
            p.mkdir()
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        except OSError as e:
            raise ResNetV2ZooError(f'cannot create {p}: {e.strerror or e}') from e
        made.append(p)
    return made


@contextlib.contextmanager
def hold_run_folder(run_dir: PathLike, fresh: bool) -> Iterator[None]:
    """Be the one process writing `run_dir` (creating it if `fresh`) for the duration of the block.

    Refused at once if a live process holds it (naming that process), or, for a `fresh` run, if the
    folder already holds a run. On leaving, the lock files go; so do the folders this call created if
    they are still empty (a run refused or failed before its first checkpoint leaves nothing behind).
    """
    run_dir = Path(run_dir)
    made = _make_dirs(Path(os.path.abspath(run_dir))) if fresh else []
    try:
        lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise _in_use(run_dir) from None
        except OSError as e:
            raise ResNetV2ZooError(f'cannot lock {run_dir}: {e.strerror or e}') from e
        try:
            if fresh and (run_dir / RUN_FILES['resume']).exists():  # made since check_out looked
                raise _holds_a_run(run_dir)
            holder = dict(pid=os.getpid(), host=socket.gethostname(),
                          started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
            with atomic_file(run_dir / HOLDER_FILE) as tmp:
                tmp.write_text(json.dumps(holder))
            yield
        finally:
            (run_dir / HOLDER_FILE).unlink(missing_ok=True)
            (run_dir / LOCK_FILE).unlink(missing_ok=True)  # still ours: removed before the lock is let go
            lock.release()
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()  # only if empty: what the run wrote stays
            except OSError:
                break


# --- the resume checkpoint -------------------------------------------------------------------------------
def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's options without the CLI's callback: what the resume checkpoint and summary.json record."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}


def save_checkpoint(run: Any) -> None:
    """Write the resume checkpoint of `run` (a `finetune.Run`) on rank 0, atomically.

    A collective call under DDP, since it gathers every rank's RNG states.
    """
    rng_states = gather_rng_states(run.dist.world_size)
    if run.dist.rank != 0:
        return
    save_resume_state(run.path('resume'), dict(
        format=RESUME_FORMAT, args=plain_args(run.args), classes=run.classes, source=run.source,
        progress=asdict(run.progress), model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(), scaler=run.scaler.state_dict(),
        ema=run.ema.state_dict() if run.ema is not None else None, rng=rng_states))


def restore_checkpoint(run: Any, state: Dict[str, Any]) -> None:
    """Put `run` (a freshly set-up `finetune.Run`) where the checkpoint `state` left it.

    A run extended with a larger `--epochs` gets its schedule rebuilt for the new length (by the caller),
    picked up at the current step, instead of the saved one.
    """
    run.model.load_state_dict(state['model'])
    run.optimizer.load_state_dict(state['optimizer'])
    run.scaler.load_state_dict(state['scaler'])
    if run.ema is not None:
        run.ema.load_state_dict(state['ema'])
    run.progress = Progress(**state['progress'])
    run.source = state['source']
    old_epochs = state['args']['epochs']
    if run.args.epochs == old_epochs:
        run.scheduler.load_state_dict(state['scheduler'])
    else:
        if run.scheduler.t_in_epochs:
            run.scheduler.step(run.progress.epoch)
        else:
            run.scheduler.step_update(run.progress.num_updates)
        _logger.info('extending the run from %d to %d epochs: the %s schedule is rebuilt for %d epochs and continues '
                     'from epoch %d (lr now %.2e)', old_epochs, run.args.epochs, run.args.sched, run.args.epochs,
                     run.progress.epoch + 1, run.optimizer.param_groups[0]['lr'])
    if len(state['rng']) == run.dist.world_size:
        set_rng_state(state['rng'][run.dist.rank])
    else:
        _logger.warning('resuming on %d processes a run saved from %d: the data order is kept, augmentation '
                        'randomness is reseeded', run.dist.world_size, len(state['rng']))


def save_resume_state(path: PathLike, state: Dict[str, Any]) -> None:
    """Write the resume checkpoint atomically: a kill at any point leaves the previous one intact."""
    with atomic_file(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # how torch reports a failed write (disk full): not an OSError
            raise OSError(str(e)) from e


def resume_checkpoint(run_dir: PathLike) -> Path:
    """The resume checkpoint of `run_dir`, which must exist."""
    path = Path(run_dir) / RUN_FILES['resume']
    if not path.is_file():
        raise ResNetV2ZooError(f'nothing to resume: {path} does not exist')
    return path


def read_resume_state(run_dir: PathLike) -> Dict[str, Any]:
    path = resume_checkpoint(run_dir)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a foreign or damaged file: torch raises pickle/zip errors of many kinds
        first_line = (str(e).strip().splitlines() or [''])[0]  # torch's unpickling errors run to many lines
        raise ResNetV2ZooError(f'{path} is not a resume checkpoint ({type(e).__name__}: {first_line})') from e
    if not isinstance(state, dict) or state.get('format') != RESUME_FORMAT:
        found = state.get('format') if isinstance(state, dict) else type(state).__name__
        raise ResNetV2ZooError(f'{path} has resume format {found}, expected {RESUME_FORMAT}')
    return state


def _flag(name: str) -> str:
    return '--' + name.replace('_', '-')


def _shown(value: Any) -> str:
    return 'unset' if value is None else str(value)


def _same(name: str, given: Any, saved: Any) -> bool:
    if saved is None:
        return False
    if name in PATH_OPTIONS:
        return Path(given).resolve() == Path(saved).resolve()
    return given == saved


def resumed_options(saved: Dict[str, Any], given: argparse.Namespace, run_dir: PathLike) -> Dict[str, Any]:
    """The options a resumed run uses: the saved ones, with what `--resume` may change taken from `given`.

    `given` holds the command line as typed (None where an option was not given). A flag that would change
    what the run computes is refused, naming it and both values; `--epochs` may only grow (extending the run).
    """
    options = dict(saved)
    for name, value in vars(given).items():
        if value is None or name in NOT_RUN_OPTIONS:
            continue
        if name in RESUME_MAY_CHANGE:
            options[name] = value
        elif name == 'epochs':
            if value < saved['epochs']:
                raise ResNetV2ZooError(f'--epochs {value} would shorten the run in {run_dir}, set to '
                                       f'{saved["epochs"]} epochs; --resume can only extend it')
            options[name] = value
        elif not _same(name, value, saved.get(name)):
            raise ResNetV2ZooError(f'{_flag(name)} {_shown(value)} would change the run in {run_dir}, which has '
                                   f'{_flag(name)} {_shown(saved.get(name))}; resume without it, or start a new run '
                                   f'with --out')
    out = getattr(given, 'out', None)
    if out is not None and Path(out).resolve() != Path(run_dir).resolve():
        raise ResNetV2ZooError(f'--out {out} and --resume {run_dir} name different folders; a resumed run stays in '
                               f'its folder')
    return options
