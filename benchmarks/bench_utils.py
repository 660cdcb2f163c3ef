"""What the benchmark scripts share: one worker process per measured thing, and the results files.

Each model (or conversion) runs in its own process so that its peak RSS is its own, and so that
TensorFlow and torch never share a process (they skew each other's thread pools). The parent drives
the workers over a pipe, one JSON object per line, which lets it interleave their timed rounds.
"""
import contextlib
import csv
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from resnetv2_zoo.weights.atomic import atomic_file

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
Handler = Callable[..., Dict[str, Any]]


class WorkerError(RuntimeError):
    """A worker process failed; the message carries the end of its stderr."""


class Worker:
    """A child process running `script --worker SPEC`, answering one JSON line per request."""

    def __init__(self, script: str, spec: Mapping[str, Any], env: Optional[Mapping[str, str]] = None):
        self.spec = dict(spec)
        # stderr goes to a file, not a pipe: a chatty worker must not block on a full pipe buffer
        self._stderr = tempfile.TemporaryFile(mode='w+')  # noqa: SIM115  (closed in close())
        self._proc = subprocess.Popen(
            [sys.executable, script, '--worker', json.dumps(self.spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
            env={**os.environ, **(env or {})})

    def request(self, cmd: str, **kwargs: Any) -> Dict[str, Any]:
        """Send one command and wait for its answer (the first request may also wait for start-up)."""
        try:
            self._proc.stdin.write(json.dumps(dict(cmd=cmd, **kwargs)) + '\n')
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # the process died; reading its answer below reports why
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            self._stderr.seek(0)
            stderr = self._stderr.read()[-3000:]
            raise WorkerError(f'worker {self.spec} exited with code {self._proc.returncode} on {cmd!r}:\n{stderr}')
        reply = json.loads(line)
        if 'error' in reply:
            raise WorkerError(f'worker {self.spec} failed on {cmd!r}: {reply["error"]}')
        return reply

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)
        self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> 'Worker':
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc.poll() is None and exc[0] is not None:
            self._proc.kill()
        self.close()


class LocalWorker:
    """`Worker`'s interface, answered in this process by `make_handlers(spec)`: a benchmark's `--in-process` mode,
    for smoke tests, which then start one process instead of one per model. Nothing is isolated: the models share
    the process (and its memory, so the peak RSS is reset when each one starts), and TensorFlow shares it with
    torch; the figures are for checking that every code path runs, not for comparing."""

    def __init__(self, make_handlers: Callable[[Dict[str, Any]], Mapping[str, Handler]], spec: Mapping[str, Any]):
        self.spec = dict(spec)
        self._handlers = make_handlers(self.spec)

    def request(self, cmd: str, **kwargs: Any) -> Dict[str, Any]:
        try:
            return self._handlers[cmd](**kwargs)
        except Exception as e:  # as `Worker` reports a worker's failure
            raise WorkerError(f'worker {self.spec} failed on {cmd!r}: {type(e).__name__}: {e}') from e

    def close(self) -> None:
        pass

    def __enter__(self) -> 'LocalWorker':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve(handlers: Mapping[str, Handler]) -> None:
    """Worker side of `Worker`: answer each request line with `handlers[cmd](**args)` until stdin closes.

    The protocol owns the real stdout; anything else printed (library banners, C-level logs) goes to stderr.
    """
    reply_stream = os.fdopen(os.dup(sys.stdout.fileno()), 'w')
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = handlers[request.pop('cmd')](**request)
        except Exception as e:  # reported to the parent, which raises it there with context
            reply = dict(error=f'{type(e).__name__}: {e}')
        reply_stream.write(json.dumps(reply) + '\n')
        reply_stream.flush()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, or since `reset_peak_rss`: VmHWM from /proc/self/status
    on Linux, elsewhere ru_maxrss (which Linux would report in KiB, and which cannot be reset)."""
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Lower the peak RSS to the current RSS (Linux: /proc/self/clear_refs), so that `peak_rss_mb` covers what
    follows; a no-op where that file is absent."""
    with contextlib.suppress(OSError):
        Path('/proc/self/clear_refs').write_text('5')


def cpu_name() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_tag(device: str) -> str:
    """File-name tag naming the hardware a result was measured on, e.g. `cpu-amd-epyc-2t` or `nvidia-h200`."""
    if device.startswith('cuda'):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f'cpu-{cpu_name()}-{os.cpu_count()}t'
    return re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str]) -> str:
    """A GitHub markdown table of `rows`, one column per `columns` key (header: its value)."""
    lines = ['| ' + ' | '.join(columns.values()) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(str(row.get(key, '')) for key in columns) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_results(stem: Path, rows: List[Dict[str, Any]], meta: Dict[str, Any], table: str) -> List[Path]:
    """Write `stem`.csv, `stem`.json ({"meta", "results"}) and `stem`.md, each atomically, and print the table."""
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    contents = {
        '.csv': text.getvalue(),
        '.json': json.dumps(dict(meta=meta, results=rows), indent=2, default=str) + '\n',
        '.md': table,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, content in contents.items():
        path = stem.with_suffix(suffix)
        with atomic_file(path) as tmp:
            tmp.write_text(content)
        paths.append(path)
    print(table)
    print('wrote ' + ', '.join(map(str, paths)))
    return paths


def run_script(main: Callable[[], Any], worker_main: Callable[[Dict[str, Any]], None]) -> None:
    """A benchmark script's entry point: the parent runs `main()`, a worker (`--worker SPEC`) serves requests."""
    if len(sys.argv) == 3 and sys.argv[1] == '--worker':
        worker_main(json.loads(sys.argv[2]))
    else:
        main()
