"""Child Python processes for the fault tests (kill -9, Ctrl-C, a full disk, the umask, a lock held by another
process), started with torch, timm and this package already imported.

A fresh `python -c` spends about 4 CPU-seconds importing torch, timm and resnetv2_zoo before its first line, and
the suite starts dozens of them. `python_child(code, *args)` instead forks each child from a multiprocessing
forkserver (one per pytest worker) that imported them once. The child is still a real, separate process from
its first line: its own pid, signals (SIGINT raises KeyboardInterrupt, SIGKILL kills it mid-write), umask,
rlimits, capabilities and file locks. It runs `code` as `python -c code *args` would: as `__main__`, with
`sys.argv`, the environment and working directory given (or the caller's), `atexit` handlers at the end, its
exit status from `sys.exit` (a string: printed, status 1), an uncaught exception (traceback, status 1) or
the signal that ended it (negative, like `subprocess`). Its stdout and stderr go to files that `communicate`
reads, so a test can also poll them while the child runs (`read_stdout`). SIGINT raises KeyboardInterrupt in
it, as in a command started from a terminal, also where pytest itself ignores SIGINT (a background job of a
non-interactive shell, such as `make test &`), which `python -c` would inherit.

The environment is the child's own from its first line, and huggingface_hub's settings, which it reads on import,
are read again. What cannot come from the forkserver keeps `subprocess`: a check of what a fresh interpreter
imports, other settings read at import time, the command-line launchers themselves, and other programs
(torchrun). timm's own scripts run in children through `resnetv2_zoo.cli.main(['timm', script, ...])`.
"""
import atexit
import builtins
import contextlib
import ctypes
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

# What the forkserver imports once before it forks: everything a child's `import resnetv2_zoo...` would load, and
# never TensorFlow. The entries are imported in order; this module is last, as the forked children run `_main`.
PRELOAD = ['torch', 'timm', 'h5py', 'safetensors.torch', 'PIL.Image', 'resnetv2_zoo', 'resnetv2_zoo.cli',
           'resnetv2_zoo.weights.convert', 'resnetv2_zoo.weights.pretrained', 'resnetv2_zoo.weights.checkpoint',
           'resnetv2_zoo.train.finetune', 'resnetv2_zoo.train.evaluate', 'resnetv2_zoo.train.predict', 'children']

_context: Optional[multiprocessing.context.BaseContext] = None
_outputs: Optional[tempfile.TemporaryDirectory] = None  # the children's stdout/stderr files, removed at exit


def _forkserver() -> multiprocessing.context.BaseContext:
    global _context
    if _context is None:
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(PRELOAD)
        atexit.register(_stop_forkserver)
        _context = context
    return _context


def _stop_forkserver() -> None:
    """At exit: kill the children a failed test left running (multiprocessing would wait for them), then stop and
    reap the forkserver, so that the CPU time of the children it reaped counts in ours (`time`)."""
    from multiprocessing import forkserver

    for process in multiprocessing.active_children():
        if process.exitcode is None:
            process.kill()
            process.join(10)
    with contextlib.suppress(AttributeError, OSError):  # private to multiprocessing; else the server stops unreaped
        forkserver._forkserver._stop()


# --- in the child ---

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [('version', ctypes.c_uint32), ('pid', ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [('effective', ctypes.c_uint32), ('permitted', ctypes.c_uint32), ('inheritable', ctypes.c_uint32)]


def drop_root_file_access() -> None:
    """Drop the capabilities that let root ignore file permissions (effective, permitted and bounding sets), so
    that a test running as root meets a real EACCES."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), 'capget')
    mask = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), 'capset')
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')


def _main(code: str, argv: Sequence[str], env: Dict[str, str], cwd: str, umask: Optional[int],
          no_root_file_access: bool, stdout: str, stderr: str) -> None:
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    if 'huggingface_hub.constants' in sys.modules:  # it reads its settings (HF_HUB_OFFLINE, HF_HOME...) on import
        importlib.reload(sys.modules['huggingface_hub.constants'])
    os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if umask is not None:
        os.umask(umask)
    if no_root_file_access and os.geteuid() == 0:
        drop_root_file_access()
    sys.argv = ['-c', *argv]
    sys.path.insert(0, '')  # as `python -c` has it
    try:
        exec(compile(code, '<string>', 'exec'), {'__name__': '__main__', '__builtins__': builtins})
    finally:
        atexit._run_exitfuncs()  # what interpreter exit does; multiprocessing ends the child with os._exit


# --- in the test ---

# `python -m resnetv2_zoo.cli ARGS` (`python_child(CLI, *args)`)
CLI = 'import sys\nfrom resnetv2_zoo.cli import main\nsys.exit(main())\n'


class Child:
    """A started child, with the part of `subprocess.Popen`'s interface the tests use (text mode)."""

    def __init__(self, process: multiprocessing.process.BaseProcess, folder: Path):
        self._process, self._folder = process, folder
        self.pid: int = process.pid

    @property
    def returncode(self) -> Optional[int]:
        return self._process.exitcode

    def poll(self) -> Optional[int]:
        return self._process.exitcode

    def wait(self, timeout: Optional[float] = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f'python_child {self.pid}', timeout)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def read_stdout(self) -> str:
        return (self._folder / 'stdout').read_text(errors='replace')

    def read_stderr(self) -> str:
        return (self._folder / 'stderr').read_text(errors='replace')

    def wait_for_stdout(self, fragment: str, timeout: float) -> str:
        """Everything the child printed, once it printed `fragment` (fails if it ends or `timeout` passes first)."""
        return self._wait_for(self.read_stdout, fragment, timeout)

    def wait_for_stderr(self, fragment: str, timeout: float) -> str:
        """`wait_for_stdout` for stderr (where logging writes)."""
        return self._wait_for(self.read_stderr, fragment, timeout)

    def _wait_for(self, read, fragment: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while fragment not in (text := read()):
            assert self.poll() is None, f'the child ended ({self.returncode}) before printing {fragment!r}: ' \
                                        f'{self.read_stderr()[-2000:]}'
            assert time.monotonic() < deadline, f'the child printed no {fragment!r} within {timeout} s'
            time.sleep(0.002)
        return text

    def communicate(self, timeout: Optional[float] = None) -> Tuple[str, str]:
        self.wait(timeout)
        return self.read_stdout(), self.read_stderr()


def python_child(code: str, *argv: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 umask: Optional[int] = None, no_root_file_access: bool = False) -> Child:
    """Start `python -c code *argv` from the pre-imported forkserver (see the module docstring)."""
    global _outputs
    if _outputs is None:
        _outputs = tempfile.TemporaryDirectory(prefix='resnetv2_zoo_children-')
    folder = Path(tempfile.mkdtemp(dir=_outputs.name))
    for name in ('stdout', 'stderr'):
        (folder / name).touch()
    process = _forkserver().Process(
        target=_main, args=(code, [str(a) for a in argv], dict(os.environ if env is None else env),
                            str(cwd or os.getcwd()), umask, no_root_file_access,
                            str(folder / 'stdout'), str(folder / 'stderr')))
    process.start()
    return Child(process, folder)


def run_python(code: str, *argv: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, '-c', code, *argv], capture_output=True, text=True)`, pre-imported."""
    child = python_child(code, *argv, **kwargs)
    try:
        out, err = child.communicate(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(60)
        raise
    return subprocess.CompletedProcess(['python', '-c', code, *argv], child.returncode, out, err)
