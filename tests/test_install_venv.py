"""tools/install_venv.py hands pip's configuration to uv, so `make setup` installs what pip would."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools'))
import install_venv  # noqa: E402


def test_settings_come_from_pip_itself_and_its_variables_win(tmp_path, monkeypatch):
    """The real `pip config list`: a configuration file, then PIP_* variables over it, as pip reads them."""
    config = tmp_path / 'pip.conf'
    config.write_text('[global]\nindex-url = https://mirror.example/simple\nfind-links = /from/file\n'
                      '[install]\nconstraint = /from/install/section.txt\n')
    monkeypatch.setenv('PIP_CONFIG_FILE', str(config))
    monkeypatch.setenv('PIP_FIND_LINKS', '/from/variable')
    monkeypatch.setenv('PIP_EXTRA_INDEX_URL', 'file:///a/simple file:///b/simple')
    settings = install_venv.pip_settings()
    assert settings['index-url'] == 'https://mirror.example/simple'
    assert settings['find-links'] == '/from/variable'
    assert settings['constraint'] == '/from/install/section.txt'
    assert install_venv.uv_arguments(settings)[:6] == [
        '--index-url', 'https://mirror.example/simple',
        '--extra-index-url', 'file:///a/simple', '--extra-index-url', 'file:///b/simple']


def test_uv_options_and_variables():
    settings = {'extra-index-url': 'file:///a/simple\nfile:///b/simple', 'constraint': '/c.txt', 'no-index': 'true',
                'cert': '/ca.pem', 'default-timeout': '180', 'disable-pip-version-check': '1'}
    assert install_venv.uv_arguments(settings) == [
        '--extra-index-url', 'file:///a/simple', '--extra-index-url', 'file:///b/simple', '--constraint', '/c.txt',
        '--no-index', '--index-strategy', 'unsafe-best-match']
    assert install_venv.uv_environment(settings) == {'SSL_CERT_FILE': '/ca.pem', 'UV_HTTP_TIMEOUT': '180'}
    # control: one index only, as on a machine without pip configuration, keeps uv's own strategy
    assert install_venv.uv_arguments({'index-url': 'https://pypi.org/simple'}) == [
        '--index-url', 'https://pypi.org/simple']
    assert install_venv.uv_arguments({}) == [] and install_venv.uv_environment({}) == {}


@pytest.mark.parametrize('failing', ['uv_install', 'uv_run'])
def test_pip_installs_when_uv_cannot(monkeypatch, failing):
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if failing == 'uv_install' and command[-1] == install_venv.UV:
            return subprocess.CompletedProcess(command, 1)
        if failing == 'uv_run' and command[1:3] == ['pip', 'install'] and command[0].endswith('uv'):
            return subprocess.CompletedProcess(command, 2)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(install_venv.subprocess, 'run', run)
    monkeypatch.setattr(install_venv, 'pip_settings', lambda: {})
    compiled = []
    monkeypatch.setattr(install_venv.compileall, 'compile_dir', lambda *a, **k: compiled.append(a))
    assert install_venv.main(['-e', '.[dev]']) == 0
    assert calls[-1] == [*install_venv._PIP_INSTALL, '--no-compile', '-e', '.[dev]'] and compiled
