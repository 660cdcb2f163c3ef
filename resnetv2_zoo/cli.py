"""`resnetv2-zoo` command line. Each sub-command lives in its own module, which defines
`register(subparsers)` adding a parser whose `func(args)` does the job."""
import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator, List, Optional

from .errors import ResNetV2ZooError

# resnetv2_zoo.<module> for each sub-command, in the order `--help` lists them.
SUBCOMMAND_MODULES = ('train.demo', 'train.finetune', 'train.evaluate', 'train.predict', 'weights.convert',
                      'train.export', 'timm_scripts')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='resnetv2-zoo', description='Keras ResNetV2 models as exact timm models.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f'{__package__}.{name}').register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (tests and notebooks swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging() -> None:
    """The package's log lines (notices, progress) as plain messages on stderr; once per process.

    INFO on rank 0 (or without a launcher), errors only on the other ranks of a distributed launch.
    """
    logger = logging.getLogger(__package__)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    rank = next((int(os.environ[v]) for v in ('RANK', 'PMI_RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK')
                 if os.environ.get(v, '').isdigit()), 0)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)


@contextlib.contextmanager
def _noting_interrupts() -> Iterator[List[bool]]:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also noted, so that an error it caused inside a library
    (torch's C++ code can turn it into a ValueError, which our loaders report as a bad file) still exits 130, not 2.
    Only Python's default handler is replaced, in the main thread, and it is put back."""
    noted = [False]
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield noted
        return

    def handler(signum: int, frame: object) -> None:
        noted[0] = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    with _noting_interrupts() as interrupted:
        try:
            args.func(args)
        except ResNetV2ZooError as e:
            if interrupted[0]:  # the error is how some library reported the Ctrl-C
                print(f'resnetv2-zoo {args.command}: interrupted', file=sys.stderr)
                return 130
            print(f'resnetv2-zoo {args.command}: error: {e}', file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            # Ctrl-C: outputs are written by temp + rename, so nothing half-written is left. A command may say how
            # to go on by raising KeyboardInterrupt('interrupted; resume with: ...'); 130 is the shell's code for it.
            print(f'resnetv2-zoo {args.command}: {str(e) or "interrupted"}', file=sys.stderr)
            return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
