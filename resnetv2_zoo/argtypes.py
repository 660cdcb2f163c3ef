"""argparse `type=` functions shared by every sub-command.

A bad value then fails in the parser, before anything is loaded or created: argparse prints the usage
and one `error:` line naming the option, and exits 2 without a traceback.
"""
import argparse
from typing import Callable, Optional

__all__ = ['MIN_IMAGE_SIZE', 'MAX_IMAGE_SIZE', 'positive_int', 'non_negative_int', 'image_size', 'optional_path',
           'DefaultsHelpFormatter']

# Keras builds these networks only for inputs of at least 32 pixels (`obtain_input_shape(min_size=32)`): the
# total stride is 32, so a smaller image has no spatial extent left before the global pool.
MIN_IMAGE_SIZE = 32
# Far above any resolution these ImageNet models are trained or evaluated at; a larger value is a typo that
# would otherwise ask for gigabytes per image.
MAX_IMAGE_SIZE = 2048


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None


def positive_int(text: str) -> int:
    """A count or size: 1 or more."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {value}')
    return value


def non_negative_int(text: str) -> int:
    """A count that may be zero (e.g. DataLoader workers: 0 loads in the main process)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'expected 0 or more, got {value}')
    return value


def image_size(text: str) -> int:
    """An input resolution the networks support: MIN_IMAGE_SIZE to MAX_IMAGE_SIZE pixels."""
    value = _int(text)
    if not MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f'expected an image size from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {value}')
    return value


def float_in(low: float, high: float = float('inf'), low_open: bool = False, high_open: bool = False
              ) -> Callable[[str], float]:
    """An argparse type: a float in [low, high] (an open end excludes its bound)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
        if not (value > low if low_open else value >= low) or not (value < high if high_open else value <= high):
            raise argparse.ArgumentTypeError(f'expected a number in {"(" if low_open else "["}{low}, {high}'
                                             f'{")" if high_open else "]"}, got {value}')
        return value
    return parse


positive_float = float_in(0, low_open=True)
non_negative_float = float_in(0)
fraction = float_in(0, 1, low_open=True, high_open=True)


def optional_path(text: str) -> Optional[str]:
    """A path, or None for an empty string (so `--plot ''` means no plot, as an unset option does)."""
    return text or None


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each option's default, also for options without a help text.

    Left out where it says nothing: flags (store_true/false), options whose default is None (their help
    says what unset means), and help texts that already name their default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS) or action.nargs == 0
                or 'default' in text):
            return text
        return f'{text} (default: %(default)s)' if text else 'default: %(default)s'
