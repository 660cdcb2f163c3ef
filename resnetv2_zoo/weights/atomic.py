"""Write files and directories so that readers only ever see the old version or the complete new one.

A file is written under a dot-name beside its destination, fsynced and renamed onto it; POSIX rename
is atomic, so concurrent writers each succeed and the last one wins.

A directory is built under a dot-name beside its destination and swapped with it in one step by
Linux's `renameat2(RENAME_EXCHANGE)`, so the destination is never missing, even while several
processes replace it at once; what the swap displaced is then deleted. Where the exchange is not
available (another OS, a filesystem without it) the previous directory is moved aside and the new
one renamed in, retried when a concurrent writer gets in between; only there can a reader find the
destination missing, for the instant between the two renames.

Outputs get the permissions the umask gives any other tool's output (0644 files and 0755 directories
under umask 022), not the 0600 / 0700 that `mkstemp` / `mkdtemp` use for their private temporaries.
A Ctrl-C while a temporary is being installed or removed takes effect just after, so it never leaves
half a temporary behind.
"""
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

from ..errors import ResNetV2ZooError

__all__ = ['atomic_file', 'atomic_dir', 'current_umask']

PathLike = Union[str, os.PathLike]
# Called with an existing destination just before it is replaced; raises to refuse (nothing is touched then).
Replaceable = Callable[[Path], None]

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_MAX_INSTALL_ATTEMPTS = 100  # each retry means another writer replaced the destination in between
# A reader that looked the destination up just before a swap is inside the previous version, so that one is
# deleted only after this long: deleting it at once let a polling reader list it half-emptied.
DISPLACED_GRACE_S = 0.1


def _umask_from_proc() -> Optional[int]:
    """Linux (4.7+) shows the umask in /proc/self/status: reading it there changes nothing, so it is thread-safe."""
    try:
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_by_setting() -> int:
    """Elsewhere the umask can only be read by setting it and setting it back. Done once, at import: a thread that
    created a file in that instant would get 0o077 (private), never a more permissive mode than intended."""
    previous = os.umask(0o077)
    os.umask(previous)
    return previous


_IMPORT_UMASK = None if _umask_from_proc() is not None else _umask_by_setting()


def current_umask() -> int:
    """The process umask: read live on Linux, as it was when this module was imported elsewhere."""
    live = _umask_from_proc()
    return live if live is not None else _IMPORT_UMASK


def _file_mode() -> int:
    return 0o666 & ~current_umask()


def _dir_mode() -> int:
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it as usual.

    Blocking the signal with `pthread_sigmask` is not enough: Python's handler may run in any thread
    (torch starts several) and still interrupt the main thread, so the handler itself is swapped for
    one that records the signal. Only the main thread can set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)


@contextlib.contextmanager
def _write_errors_named(path: Path) -> Iterator[None]:
    """A failed write (disk full, file size limit, permissions) as one clear error naming the output."""
    try:
        yield
    except OSError as e:
        raise ResNetV2ZooError(f'cannot write {path}: {e.strerror or e}; any previous {path.name} is intact') from e


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort, as not every filesystem lets a directory be opened for fsync."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def atomic_file(path: PathLike, replaceable: Optional[Replaceable] = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    The temporary keeps `path`'s suffix (`.x.safetensors.abc.tmp.safetensors`), so a check inside the
    block can load it by extension before it replaces anything. `replaceable`, if given, is called
    with an existing `path` just before the rename and may refuse by raising. On any error (or a kill)
    the temporary file is removed or left under a dot-name that no reader looks for, and the previous
    `path`, if any, is untouched.
    """
    path = Path(path)
    tmp: Optional[Path] = None
    with _write_errors_named(path):
        try:
            with _interrupts_deferred():  # a Ctrl-C right after mkstemp must still find `tmp` set
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp' + path.suffix)
                tmp = Path(name)
                try:
                    os.fchmod(fd, _file_mode())
                finally:
                    os.close(fd)
            yield tmp
            os.chmod(tmp, _file_mode())  # again: some writers (safetensors >= 0.8) replace the file with a 0600 one
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            with _interrupts_deferred():
                if replaceable is not None and os.path.lexists(path):
                    replaceable(path)
                os.replace(tmp, path)
                _fsync_dir(path.parent)
        finally:
            if tmp is not None:
                with _interrupts_deferred(), contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: PathLike, replaceable: Optional[Replaceable] = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole.

    `replaceable`, if given, is called with an existing `path` just before the swap and may refuse by
    raising. A crash leaves either the old directory or the new one at `path`, plus dot-named
    temporaries beside it; concurrent writers all succeed, the last one wins.
    """
    path = Path(path)
    leftovers: List[Path] = []
    installed_at = None
    with _write_errors_named(path):
        try:
            with _interrupts_deferred():  # a Ctrl-C right after mkdtemp must still find it listed
                tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'))
                leftovers = [tmp]
                os.chmod(tmp, _dir_mode())
            yield tmp
            with _interrupts_deferred():
                if replaceable is not None and os.path.lexists(path):
                    replaceable(path)
                leftovers = _install_dir(tmp, path)
                installed_at = time.monotonic()
                _fsync_dir(path.parent)
        finally:
            with _interrupts_deferred():
                if leftovers and installed_at is not None:  # previous versions: let readers inside them finish
                    time.sleep(max(0.0, installed_at + DISPLACED_GRACE_S - time.monotonic()))
                for leftover in leftovers:
                    _remove(leftover)


def _load_renameat2() -> Optional[Callable[[Path, Path, int], None]]:
    if not sys.platform.startswith('linux'):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.3
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int

    def renameat2(src: Path, dst: Path, flags: int) -> None:
        if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(dst))  # OSError picks the subclass (FileExistsError...)
    return renameat2


_renameat2 = _load_renameat2()
_NO_EXCHANGE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)  # kernel or filesystem lacks it


def _install_dir(tmp: Path, path: Path) -> List[Path]:
    """Put the complete directory `tmp` at `path`; returns what is left to delete (what it displaced)."""
    global _renameat2
    leftovers: List[Path] = []
    for _ in range(_MAX_INSTALL_ATTEMPTS):
        if _renameat2 is not None:
            try:
                try:
                    _renameat2(tmp, path, _RENAME_NOREPLACE)
                    return leftovers
                except FileExistsError:
                    pass
                try:
                    _renameat2(tmp, path, _RENAME_EXCHANGE)
                    return leftovers + [tmp]  # tmp now holds the previous version
                except FileNotFoundError:
                    continue  # removed in between: create it again
            except OSError as e:
                if e.errno not in _NO_EXCHANGE:
                    raise
                _renameat2 = None  # fall back from now on
        try:
            os.rename(tmp, path)  # succeeds when `path` is absent or an empty directory
            return leftovers
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise
        aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old'))
        leftovers.append(aside)
        with contextlib.suppress(FileNotFoundError):  # another writer moved it first: try again
            os.rename(path, aside / path.name)
    raise OSError(errno.EBUSY, f'replaced by other writers {_MAX_INSTALL_ATTEMPTS} times while installing it')
