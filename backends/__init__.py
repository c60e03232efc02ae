"""Backends (imported as spikecompile.backends): one subpackage per target, each only lowering IR nodes.

The interface every backend package exposes (README.md):

    OPTIONS                            its options (options.Option), also in options.BY_TARGET
    check(options) -> dict             the options parsed and whatever must load before the model (a text, an
                                       energy target): every bad option fails here, before the model is loaded
    check_record(record, options)      optional: the options checked against model.pt's record (e.g. --layers
                                       against its decoder layers), before the source model is loaded
    build(result, folder, **options)   the target written into folder from a BuildResult; returns its report
    report_lines(report, folder)       the lines `spikecompile build` prints about that report

Looked up lazily by name (load), so `import spikecompile` imports no backend and no optional package; this module
and options.py import neither torch nor any backend, so the CLI reads every option list without loading one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING

from spikecompile.errors import SpikecompileError

from .options import BY_TARGET, Option, parse_options

if TYPE_CHECKING:
    from torch import Tensor

    from spikecompile.ir import Graph

TARGETS = tuple(BY_TARGET)
"""The backends `load` knows, by the name `spikecompile build --target` takes."""


@dataclass
class BuildResult:
    """What a backend builds from: the graph after the passes, its weights, each pass's report, the seconds spent
    loading, tracing and running passes, the model.pt record and tokenizer, and where the build came from (the
    model.pt path and the build options as build.json records them)."""

    graph: Graph
    store: dict[str, Tensor]
    passes: list[dict]
    seconds: dict[str, float]
    record: dict
    tokenizer: object = None
    model_path: str = ""
    options: dict = field(default_factory=dict)


def widened_result(result: BuildResult) -> BuildResult:
    """`result` with bf16/fp16 weights widened to float32 (ir.widened): every backend but the IR folder, which keeps
    the source dtype, computes in float32 (or float64)."""
    from spikecompile.ir import widened

    graph, store = widened(result.graph, result.store)
    return result if graph is result.graph else replace(result, graph=graph, store=store)


def load(name: str) -> ModuleType:
    """The backend package of target `name`, imported now; SpikecompileError naming an unknown target, or the
    extra to install when the backend's optional package is missing."""
    if name not in TARGETS:
        raise SpikecompileError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return import_module(f"{__name__}.{name}")


__all__ = ["BY_TARGET", "BuildResult", "Option", "TARGETS", "load", "parse_options", "widened_result"]
