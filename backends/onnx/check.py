"""Teacher forcing: check an exported model node by node against another executor (the simulator) without the
chaos of free running — in float32 a 1-ulp difference (a summation order, an exp) can flip one spike, and the flip
grows layer by layer (on SmolLM2 to ~10 % of the largest logit), so whole-model logits of two executors only agree
where no spike sits within rounding of a threshold.

The model cut open at every phase neuron takes, besides the graph inputs, every neuron's output as an input named
after the neuron (fed the other executor's value: decoded [...] or event [T, ...]); it outputs every neuron's input
(the value named after its producer) and, as "<neuron>/own", what the neuron makes of the input the model computed
itself. So every segment between neurons is checked on the same inputs (float tolerance), and every neuron on
nearly the same input: bit for bit wherever its input is bit for bit the same.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from ...ir import Graph, Output, PhaseNeuron, validate
from .builder import element_type
from .run import run, session

OWN_SUFFIX = "/own"


def teacher_forced(model: onnx.ModelProto, graph: Graph) -> onnx.ModelProto:
    """A copy of `model` (exported from `graph`) cut open at every PhaseNeuron of `graph`."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    types = validate(graph)
    producers = {output: node for node in cut.graph.node for output in node.output}
    for name in _neurons(graph):
        node, of = producers[name], element_type(types[name].dtype)
        node.output[list(node.output).index(name)] = name + OWN_SUFFIX
        cut.graph.input.append(helper.make_tensor_value_info(name, of, None))
        for value in (graph.inputs(name)["x"], name + OWN_SUFFIX):
            cut.graph.output.append(helper.make_tensor_value_info(value, of, None))
    return cut


def agreement(model: onnx.ModelProto, graph: Graph, inputs: dict, reference: dict[str, torch.Tensor]) -> dict:
    """Run `model` cut open at the neurons on `inputs`, fed the `reference` values (every IR node's value by name,
    as another executor computed them, e.g. backends.sim.simulate.run(...).values) and compare:

    input_difference   the largest |x − x_ref| / max |x_ref| over every neuron's input x
    output_difference  the same for the graph's Output (the logits)
    flipped            neuron output elements (per step in event form) that differ from the reference
    flipped_on_equal   … of them where the neuron's input equals the reference bit for bit (0: the neurons agree)
    elements           neuron output elements compared

    A neuron with per-token scales outputs τ_row·(a level), τ_row from its whole input row: an input 1 ulp off
    anywhere in the row moves every output of the row by ulps. For it an element is flipped when it is off by more
    than PER_TOKEN_ROUNDING of its row's largest reference output (a level is at least τ_row apart, far more), and
    its input counts as equal when the whole row is.
    """
    neurons = _neurons(graph)
    event = {prop.key: prop.value for prop in model.metadata_props}["spikecompile.form"] == "event"
    (output,) = [name for name in graph if isinstance(graph[name], Output)]
    feeds = {**inputs, **{name: reference[name] for name in neurons}}
    outputs = run(session(teacher_forced(model, graph).SerializeToString()), feeds)
    values = {name: torch.from_numpy(np.asarray(value)) for name, value in outputs.items()}
    figures = {"input_difference": 0.0, "flipped": 0, "flipped_on_equal": 0, "elements": 0,
               "output_difference": _relative(values[output], reference[output])}
    for name in neurons:
        source = graph.inputs(name)["x"]
        figures["input_difference"] = max(figures["input_difference"], _relative(values[source], reference[source]))
        own, expected = values[name + OWN_SUFFIX], reference[name]
        equal_input = values[source] == reference[source]
        equal_input = equal_input.all(0) if event else equal_input
        if graph[name].token_levels:
            differ = (own - expected).abs() > PER_TOKEN_ROUNDING * expected.abs().amax(-1, keepdim=True)
            equal_input = equal_input.all(-1, keepdim=True)
        else:
            differ = own != expected
        figures["flipped"] += int(differ.sum())
        figures["flipped_on_equal"] += int((differ & equal_input).sum())
        figures["elements"] += differ.numel()
    return figures


PER_TOKEN_ROUNDING = 1e-5
"""A per-token neuron's output counts as flipped beyond this share of its row's largest output (module docstring of
agreement): float32 rounding moves an output by about 1e-7 of it, one level is 1/K of it."""


def _neurons(graph: Graph) -> list[str]:
    return [name for name in graph.topological_order() if isinstance(graph[name], PhaseNeuron)]


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max().clamp(min=1e-30))
