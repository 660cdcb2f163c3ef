"""Deployment exports of a model: ONNX (run by onnxruntime) and `.pt2` (a `torch.export` ExportedProgram).

An export is only written once it computes what the eager model computes: the temporary file is
loaded back (ONNX through an onnxruntime CPU session, `.pt2` through `torch.export.load`) and run on a
seeded random batch, and the largest difference must be within `EXPORT_TOLERANCE * max(1, max|eager|)`.
ONNX and onnxruntime reorder float32 arithmetic (they fuse BatchNorm into the convolutions, for
example), hence 1e-4 rather than the converter's 1e-5. The file then appears by atomic rename, and
an existing file is replaced only when this package wrote it: each export carries a marker (ONNX
`metadata_props`, a `.pt2` extra file) that is read without running or unpickling anything.

Needs the `export` extra (`pip install 'resnetv2-zoo[export]'`: onnx, onnxscript, onnxruntime) for ONNX.
"""
import contextlib
import importlib.util
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..errors import ResNetV2ZooError
from .atomic import atomic_file
from .checkpoint import check_writable_parent

__all__ = ['EXPORT_FORMATS', 'EXPORT_TOLERANCE', 'MIN_ONNX_OPSET', 'ExportResult', 'export_model', 'is_own_export']

EXPORT_FORMATS = ('.onnx', '.pt2')
EXPORT_TOLERANCE = 1e-4  # relative to max(1, max|eager|); see the module docstring
MIN_ONNX_OPSET = 17
DEFAULT_ONNX_OPSET = 18  # torch's dynamo exporter's own opset
MARKER_KEY = 'resnetv2_zoo'  # ONNX metadata_props key / `.pt2` extra file `resnetv2_zoo.json`
PT2_MARKER = MARKER_KEY + '.json'
EXPORT_EXTRA = "pip install 'resnetv2-zoo[export]'"
PathLike = Union[str, os.PathLike]


@dataclass
class ExportResult:
    """What `export_model` wrote and how closely it matches the eager model."""

    path: Path
    format: str  # 'onnx' or 'pt2'
    input_size: Tuple[int, int, int]
    dynamic_batch: bool
    max_abs_diff: float  # largest |export - eager| on the check batch
    tolerance: float  # EXPORT_TOLERANCE * max(1, max|eager|)
    opset: Optional[int] = None  # ONNX only


def _marker(model: torch.nn.Module, input_size: Tuple[int, int, int], dynamic_batch: bool) -> Dict[str, Any]:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return {'producer': 'resnetv2-zoo', 'architecture': cfg.get('architecture'),
            'num_classes': getattr(model, 'num_classes', None), 'input_size': list(input_size),
            'dynamic_batch': dynamic_batch}


def is_own_export(path: PathLike) -> bool:
    """Whether `path` is an export this package wrote (its marker is read; nothing is run or unpickled)."""
    path = Path(path)
    try:
        if path.suffix == '.pt2':
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith('/extra/' + PT2_MARKER)]
                return len(names) == 1 and json.loads(archive.read(names[0])).get('producer') == 'resnetv2-zoo'
        if path.suffix == '.onnx':
            import onnx

            proto = onnx.load(str(path), load_external_data=False)
            return any(p.key == MARKER_KEY and json.loads(p.value).get('producer') == 'resnetv2-zoo'
                       for p in proto.metadata_props)
    except Exception:  # not a zip / not ONNX / unreadable: not ours
        return False
    return False


def _check_replaceable(path: Path) -> None:
    if path.is_symlink() or (os.path.lexists(path) and not path.is_file()):
        raise ResNetV2ZooError(f'refusing to replace {path}: it is not a regular file; choose another output')
    if path.is_file() and not is_own_export(path):
        raise ResNetV2ZooError(f'refusing to replace {path}: it is not an export resnetv2-zoo wrote; choose another '
                               'output or remove it yourself')


def _require_onnx() -> None:
    missing = [m for m in ('onnx', 'onnxscript', 'onnxruntime') if importlib.util.find_spec(m) is None]
    if missing:
        raise ResNetV2ZooError(f'ONNX export needs {", ".join(missing)}: {EXPORT_EXTRA}')


def export_model(model: torch.nn.Module, out: PathLike, input_size: Tuple[int, int, int] = (3, 224, 224),
                 dynamic_batch: bool = False, opset: int = DEFAULT_ONNX_OPSET, check_batch: int = 2,
                 seed: int = 0) -> ExportResult:
    """Export `model` (put in eval mode) to `out` (`.onnx` or `.pt2`), checked against eager, atomically.

    Args:
        model: the model to export, on the CPU.
        out: the file to write; its suffix picks the format. An existing file is replaced only if this
            package wrote it.
        input_size: (channels, height, width) the export is traced at; with `dynamic_batch` the batch
            size is free, else the export takes batches of `check_batch` images only.
        dynamic_batch: a free batch dimension (checked with a second batch size).
        opset: ONNX opset, at least MIN_ONNX_OPSET.
        check_batch: the batch size the export is traced and checked at.
        seed: seed of the random check batch.
    """
    out = Path(out)
    fmt = out.suffix.lower()
    if fmt not in EXPORT_FORMATS:
        raise ResNetV2ZooError(f'{out}: unknown export format {out.suffix!r}; name the output *.onnx or *.pt2')
    if fmt == '.onnx':
        _require_onnx()
        if opset < MIN_ONNX_OPSET:
            raise ResNetV2ZooError(f'--opset {opset}: the export needs ONNX opset {MIN_ONNX_OPSET} or newer')
    check_writable_parent(out)
    if os.path.lexists(out):
        _check_replaceable(out)
    model = model.eval().cpu()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(check_batch, *input_size, generator=generator)
    batches = [example]
    if dynamic_batch:
        batches.append(torch.randn(check_batch + 1, *input_size, generator=generator))
    with torch.no_grad():
        expected = [model(x) for x in batches]
    marker = _marker(model, input_size, dynamic_batch)
    dynamic_shapes = ({0: torch.export.Dim('batch', min=1, max=4096)},) if dynamic_batch else None
    with atomic_file(out, _check_replaceable) as tmp:
        if fmt == '.onnx':
            _write_onnx(model, example, dynamic_shapes, opset, marker, tmp)
            run = _onnx_runner(tmp)
        else:
            with torch.no_grad():
                program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
            torch.export.save(program, str(tmp), extra_files={PT2_MARKER: json.dumps(marker)})
            run = _pt2_runner(tmp)
        diff, tolerance = 0.0, 0.0
        for x, want in zip(batches, expected):
            got = run(x)
            if got.shape != want.shape:
                raise ResNetV2ZooError(f'{out}: the export returns shape {tuple(got.shape)} for input '
                                       f'{tuple(x.shape)}, eager {tuple(want.shape)}; nothing written')
            diff = max(diff, float((got - want).abs().max()))
            tolerance = max(tolerance, EXPORT_TOLERANCE * max(1.0, float(want.abs().max())))
        if not diff <= tolerance:  # also refuses NaN
            raise ResNetV2ZooError(f'{out}: the export differs from the eager model by {diff:.3g} (tolerance '
                                   f'{tolerance:.3g}); nothing written')
    return ExportResult(out, fmt[1:], tuple(input_size), dynamic_batch, diff, tolerance,
                        opset if fmt == '.onnx' else None)


def _write_onnx(model: torch.nn.Module, example: torch.Tensor, dynamic_shapes: Optional[tuple], opset: int,
                marker: Dict[str, Any], path: Path) -> None:
    import onnx

    # torch's exporter prints its progress on stdout, which is the command's result channel: kept out of it
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                    input_names=['images'], output_names=['logits'], verbose=False)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = MARKER_KEY, json.dumps(marker)
    onnx.save_model(proto, str(path), save_as_external_data=False)  # one file: the 2 GiB protobuf limit is far


def _onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _pt2_runner(path: Path):
    # only ever the temporary `export_model` has just written: torch.export.load may unpickle (it has no
    # weights_only switch), so a `.pt2` it is handed is never loaded (`is_own_export` reads its marker only)
    module = torch.export.load(str(path)).module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x)
    return run
