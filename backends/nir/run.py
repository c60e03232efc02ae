"""Run an export: its segments by any NIR consumer, every other step by our decoded interpreter.

This is how a consumer that runs NIR is checked against spikecompile: it executes the segments, the manifest's ops
(norms, SiLU, products, rotations, ...) are computed by ir.interpret's rules, and the result must match the
IR graph interpreted whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nir
import torch
from torch import Tensor

from ...errors import SpikecompileError
from ...ir import Input
from ...ir.interpret import RUNNERS
from .reader import open_export
from .records import rebuild

SegmentRunner = Callable[[nir.NIRGraph, dict[str, Tensor]], dict[str, Tensor]]
"""A NIR consumer: a segment's NIR graph and a value per Input node ("input.<V>") → a value per Output node
("output.<V>"). Values are IR tensors [..., width]: NIR vectors along the last dim."""


@torch.no_grad()
def run(folder: str | Path, inputs: dict[str, Tensor], run_segment: SegmentRunner) -> dict[str, Tensor]:
    """Every IR value of the export in `folder` on these graph inputs (by Input name), by IR name."""
    export = open_export(folder)
    values: dict[str, Tensor] = {}
    for step in export.manifest["steps"]:
        if "segment" in step:
            given = {f"input.{value}": values[value] for value in step["inputs"]}
            results = run_segment(export.segment(step["segment"]), given)
            values.update({value: results[f"output.{value}"] for value in step["outputs"]})
            continue
        name, node = step["name"], rebuild(step)
        if isinstance(node, Input):
            if name not in inputs:
                raise SpikecompileError(f"the export's input {name} was not given (given: {', '.join(inputs)})")
            values[name] = inputs[name]
            continue
        runner = RUNNERS.get(type(node))
        if runner is None:
            raise SpikecompileError(f"node {name}: the interpreter has no rule for {type(node).__name__}")
        ports = {node.inputs[0] if port is None else port: values[source] for source, port in step["inputs"]}
        values[name] = runner(node, ports, export.weights)
    return values
