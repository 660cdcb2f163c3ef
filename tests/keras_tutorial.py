"""The README's "Coming from Keras" tutorial code, as the migration test (test_migration.py) runs it.

The tutorial builds ResNet50V2 by hand: keras.applications' structure and layer names, but Keras's default
`BatchNormalization()` (epsilon 1e-3, not the applications' 1.001e-5), raw 0-255 pixels (no preprocessing), and
a `ModelCheckpoint(save_weights_only=True)` file that carries no architecture. `tutorial_code()` returns the
Python block of README.md between the markers below (the test runs the README's own text, the only copy);
`with_sizes` sets the variables at its top for a small run. `tutorial_commands()` does the same for the README's
```bash block of `resnetv2-zoo` commands.
"""
import re
import shlex
from pathlib import Path
from typing import Dict, List, Union

README = Path(__file__).resolve().parents[1] / 'README.md'
START, END = '<!-- coming-from-keras:start -->', '<!-- coming-from-keras:end -->'

def readme_block(language: str, readme: Path = README) -> str:
    """The ```language block between the coming-from-keras markers of README.md."""
    text = readme.read_text(encoding='utf-8')
    assert START in text and END in text, f'{readme} has no "Coming from Keras" markers {START} ... {END}'
    between = text.split(START, 1)[1].split(END, 1)[0]
    blocks = re.findall(rf'^```{language}\n(.*?)^```', between, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f'{readme}: expected one ```{language} block between the markers, found {len(blocks)}'
    return blocks[0]


def tutorial_code() -> str:
    """The tutorial's Python code: README.md's block."""
    return readme_block('python')


def tutorial_commands(sizes: Dict[str, str]) -> Dict[str, List[str]]:
    """The tutorial's `resnetv2-zoo` commands (README.md's bash block) as argument lists by
    sub-command, each `--option value` in `sizes` (e.g. {'--img-size': '64'}) set to that value."""
    text = readme_block('bash').replace('\\\n', ' ')
    commands = {}
    for line in text.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[0] == 'resnetv2-zoo', f'the tutorial runs {argv[0]!r}, expected resnetv2-zoo commands only'
        for option, value in sizes.items():
            if option in argv:
                argv[argv.index(option) + 1] = value
        commands[argv[1]] = argv[1:]
    return commands


def with_sizes(code: str, sizes: Dict[str, Union[int, str]]) -> str:
    """`code` with each `NAME = value` line at its top (one per name, each required) set to `sizes[NAME]`."""
    for name, value in sizes.items():
        code, found = re.subn(rf'^{name} = \S+', f'{name} = {value!r}', code, count=1, flags=re.MULTILINE)
        assert found == 1, f'the tutorial code has no `{name} = ...` line to set'
    return code
