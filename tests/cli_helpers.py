"""The command line run in the test process: its exit code and what it printed on stderr."""
from typing import NamedTuple

import pytest

from resnetv2_zoo import cli


class CliResult(NamedTuple):
    returncode: int
    stderr: str


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    """`resnetv2-zoo ARGS` in this process (the console script is `sys.exit(main())`; test_finetune and
    test_reliability run it as a process)."""
    capsys.readouterr()
    code = cli.main(list(args))
    return CliResult(code, capsys.readouterr().err)
