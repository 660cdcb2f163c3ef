"""Install the project into the virtual environment whose Python runs this script, with uv, as pip would.

Why: the environment is torch's CUDA build and TensorFlow, 7.8 GB unpacked. pip unpacks and hashes it on one core
and compiles its bytecode one file after another (about 75 s on 2 cores); uv unpacks on every core and compiles in
parallel (35-45 s): half a minute of the 6-minute fresh-clone budget of `make test`.

"As pip would": uv reads no pip configuration, so the package indexes, find-links folders, constraint files and
certificate bundle that pip is configured with (`pip config list`: its files and PIP_* variables) are passed on to
uv, and uv picks the best version across all indexes as pip does (`--index-strategy unsafe-best-match`). uv's cache
is a temporary folder inside the environment, removed at the end (`--no-cache`, TMPDIR), so nothing is left outside
the environment. Where uv cannot be installed (no wheel for the platform) or fails, pip installs, as before.

Usage: `.venv/bin/python tools/install_venv.py -e '.[keras,train,export,dev]'` (the arguments are pip's).
"""
import ast
import compileall
import os
import subprocess
import sys
import sysconfig
import tempfile
from typing import Dict, List, Sequence

UV = 'uv>=0.9,<1'
_PIP_INSTALL = [sys.executable, '-m', 'pip', 'install', '--quiet']

# pip setting -> uv option; each setting may hold several values (whitespace-separated)
_OPTIONS = {'index-url': '--index-url', 'extra-index-url': '--extra-index-url', 'find-links': '--find-links',
            'constraint': '--constraint'}
# pip setting -> uv environment variable
_VARIABLES = {'cert': 'SSL_CERT_FILE', 'timeout': 'UV_HTTP_TIMEOUT', 'default-timeout': 'UV_HTTP_TIMEOUT'}


def pip_settings() -> Dict[str, str]:
    """pip's effective settings for `pip install`: files, then the `install` section, then PIP_* variables."""
    listed = subprocess.run([sys.executable, '-m', 'pip', 'config', 'list'], capture_output=True, text=True,
                            check=True).stdout
    ranked = {'global': 0, 'install': 1, ':env:': 2}
    found: Dict[str, tuple] = {}
    for line in listed.splitlines():
        name, _, value = line.partition('=')
        section, _, key = name.rpartition('.')
        if section not in ranked or not value:
            continue
        if key not in found or ranked[section] >= found[key][0]:
            found[key] = (ranked[section], ast.literal_eval(value))
    return {key: value for key, (_, value) in found.items()}


def uv_arguments(settings: Dict[str, str]) -> List[str]:
    """uv options equivalent to pip's settings."""
    arguments = []
    for key, option in _OPTIONS.items():
        for value in settings.get(key, '').split():
            arguments += [option, value]
    if settings.get('no-index', '').lower() in ('1', 'true', 'yes', 'on'):
        arguments.append('--no-index')
    if settings.get('extra-index-url') or settings.get('find-links'):
        arguments += ['--index-strategy', 'unsafe-best-match']
    return arguments


def uv_environment(settings: Dict[str, str]) -> Dict[str, str]:
    """uv's environment variables for pip's certificate bundle and network timeout."""
    return {variable: settings[key] for key, variable in _VARIABLES.items() if settings.get(key)}


def install_with_pip(requirements: Sequence[str]) -> int:
    """pip's install, with the bytecode compiled on every core afterwards instead of file by file."""
    if subprocess.run([*_PIP_INSTALL, '--no-compile', *requirements]).returncode != 0:
        return 1
    compileall.compile_dir(sysconfig.get_paths()['purelib'], quiet=2, workers=0)
    return 0


def main(requirements: Sequence[str]) -> int:
    if subprocess.run([*_PIP_INSTALL, UV]).returncode != 0:
        print('install_venv: uv could not be installed; installing with pip instead', file=sys.stderr)
        return install_with_pip(requirements)
    settings = pip_settings()
    uv = os.path.join(os.path.dirname(sys.executable), 'uv')
    command = [uv, 'pip', 'install', '--python', sys.executable, '--no-cache', '--compile-bytecode',
               *uv_arguments(settings), *requirements]
    # uv's temporary files (its unpacked wheels, a build lock) inside the environment, removed at the end
    with tempfile.TemporaryDirectory(prefix='.install-', dir=sys.prefix) as tmp:
        code = subprocess.run(command, env={**os.environ, **uv_environment(settings), 'TMPDIR': tmp}).returncode
    if code != 0:
        print('install_venv: uv failed (above); installing with pip instead', file=sys.stderr)
        return install_with_pip(requirements)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
