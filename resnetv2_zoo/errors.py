"""Errors the package raises on bad input; the CLI turns each into a one-line message and exit code 2."""


class ResNetV2ZooError(Exception):
    """Base class: everything the package refuses on purpose derives from this."""


class KerasFileError(ResNetV2ZooError, ValueError):
    """A Keras file (or live model) that is not a ResNetV2 checkpoint we can map exactly."""


class WeightsUnavailableError(ResNetV2ZooError, RuntimeError):
    """Pretrained weights were asked for but no source (cache, Keras cache, download) could supply them."""
