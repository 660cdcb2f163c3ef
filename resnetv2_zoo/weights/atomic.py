"""Write files and directories so that readers only ever see the old version or the complete new one."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from ..errors import ResNetV2ZooError

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def _write_errors_named(path: Path) -> Iterator[None]:
    """A failed write (disk full, file size limit, permissions) as one clear error naming the output."""
    try:
        yield
    except OSError as e:
        raise ResNetV2ZooError(f'cannot write {path}: {e.strerror or e}; any previous {path.name} is intact') from e


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    On any error (or a kill) the temporary file is removed or left under a dot-name that no reader
    looks for, and the previous `path`, if any, is untouched.
    """
    path = Path(path)
    with _write_errors_named(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on success it replaces `path` whole.

    A previous `path` is moved aside first and deleted only after the new one is in place, so a
    crash leaves either the old directory, the new one, or the old one under a dot-name.
    """
    path = Path(path)
    with _write_errors_named(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'))
        old = None
        try:
            yield tmp
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.old'))
                os.replace(path, old / path.name)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
