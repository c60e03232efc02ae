"""An independent NIR consumer for run(): nirtorch 2.6 (nirtorch.nir_to_torch, which executes a graph in dependency
order and sums the edges into a node) with explicit node maps written from NIR's own equations — nothing of
spikecompile's neuron code — and no default maps, so an unmapped node type is an error, never an identity.

nirtorch runs a graph with one Input and one Output, so a segment is fitted to that before nirtorch builds it:
- two Outputs loop forever in its builder: each Output runs on the segment cut down to that Output's ancestors;
- a second Input redefines the torch.fx node it names `is_none` ("Node redefined name is_none!", as every residual
  add of a whole-model export reads two values): the Inputs become one Input holding their values side by side
  (concatenated along the last dim), and each former Input a stock NIR Linear whose 0/1 weights select its slice.
  Each selected element is one product x·1 plus exact zeros, so the selection is exact in float32 (finite x).
All of it, the selection included, is a stock NIR graph that nirtorch builds and executes.
norse.from_nir is no alternative: its executor (nirtorch.load) runs nodes in depth-first order, which is not a
dependency order for these graphs. nirtorch is not part of the nir extra: scripts/install.sh installs it
(pip install --no-deps 'nirtorch>=2.6,<3').
"""

from __future__ import annotations

import collections
import keyword

import nir
import numpy as np
import torch
from torch import Tensor, nn


class Threshold(nn.Module):
    """NIR Threshold: z = [x > θ]."""

    def __init__(self, node: nir.Threshold):
        super().__init__()
        self.register_buffer("threshold", torch.from_numpy(node.threshold))

    def forward(self, x: Tensor) -> Tensor:
        return (x > self.threshold).to(x.dtype)


class Scale(nn.Module):
    """NIR Scale: y = x ⊙ s."""

    def __init__(self, node: nir.Scale):
        super().__init__()
        self.register_buffer("scale", torch.from_numpy(node.scale))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def synapse(node: nir.Affine | nir.Linear) -> nn.Linear:
    """NIR Affine y = W·x + b, or Linear y = W·x (nirtorch's own Affine map drops b)."""
    module = nn.Linear(node.weight.shape[1], node.weight.shape[0], bias=isinstance(node, nir.Affine))
    module.weight.data = torch.from_numpy(node.weight)
    if isinstance(node, nir.Affine):
        module.bias.data = torch.from_numpy(node.bias)
    return module


NODE_MAP = {nir.Input: lambda node: nn.Identity(), nir.Output: lambda node: nn.Identity(), nir.Threshold: Threshold,
            nir.Scale: Scale, nir.Affine: synapse, nir.Linear: synapse}


class NirtorchRunner:
    """A run() segment runner; records the output of every Threshold and IF node (its spikes) by NIR name."""

    def __init__(self, node_map: dict | None = None):
        self.node_map = NODE_MAP if node_map is None else node_map
        self.spikes: dict[str, Tensor] = {}

    def __call__(self, graph: nir.NIRGraph, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        import nirtorch

        unsupported = {type(node).__name__ for node in graph.nodes.values()} - {cls.__name__ for cls in self.node_map}
        if unsupported:
            raise ValueError(f"this consumer has no map for {', '.join(sorted(unsupported))}")
        results = {}
        for output in [name for name, node in graph.nodes.items() if isinstance(node, nir.Output)]:
            part, sources = _one_input(_cut(graph, output))
            _check_torch_names(part)
            module = nirtorch.nir_to_torch(part, self.node_map, default_map={})
            for name, node in part.nodes.items():
                if isinstance(node, nir.Threshold | nir.IF):
                    module.get_submodule(_torch_name(name)).register_forward_hook(self._recorder(name))
            results[output], _ = module(torch.cat([inputs[source] for source in sources], dim=-1))
        return results

    def signed_spikes(self, neuron: str, steps: int) -> Tensor:
        """σ·s_t of a lowered phase neuron, [T, ...]: its pos channel's spikes minus its neg channel's."""
        return torch.stack([self.spikes[f"{neuron}.pos.spike{t}"] - self.spikes[f"{neuron}.neg.spike{t}"]
                            for t in range(steps)])

    def spike_planes(self, neuron: str, steps: int) -> Tensor:
        """s_t of a lowered phase neuron as the simulator keeps them, bool [T, ...]: a spike on either channel (at
        x = 0 both fire alike, so σ·s_t is 0 there while s_t is not)."""
        return torch.stack([torch.maximum(self.spikes[f"{neuron}.pos.spike{t}"], self.spikes[f"{neuron}.neg.spike{t}"])
                            for t in range(steps)]).bool()

    def _recorder(self, name: str):
        def hook(module, args, output):
            self.spikes[name] = output[0] if isinstance(output, tuple) else output  # a stateful neuron: (z, state)
        return hook


def _cut(graph: nir.NIRGraph, output: str) -> nir.NIRGraph:
    """`graph` reduced to `output` and its ancestors."""
    sources = collections.defaultdict(list)
    for source, target in graph.edges:
        sources[target].append(source)
    keep, todo = {output}, [output]
    while todo:
        for source in sources[todo.pop()]:
            if source not in keep:
                keep.add(source)
                todo.append(source)
    return nir.NIRGraph(nodes={name: node for name, node in graph.nodes.items() if name in keep},
                        edges=[edge for edge in graph.edges if edge[1] in keep])


MERGED_INPUT = "inputs"
"""The name of the one Input of a segment that reads several (_one_input)."""


def _one_input(graph: nir.NIRGraph) -> tuple[nir.NIRGraph, list[str]]:
    """`graph` with one Input, and the former Inputs whose values it takes concatenated, in that order.

    A graph with one Input is given back as it is. Otherwise the Input MERGED_INPUT takes the Inputs' vectors side by
    side, and each former Input becomes a NIR Linear with 0/1 weights that picks its slice back out, keeping its name
    and edges."""
    sources = [name for name, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(sources) == 1:
        return graph, sources
    if MERGED_INPUT in graph.nodes:
        raise ValueError(f"the segment has a node named {MERGED_INPUT!r}, this consumer's name for its merged Input")
    widths = [int(np.prod(graph.nodes[name].input_type["input"])) for name in sources]
    total, starts = sum(widths), np.cumsum([0, *widths])
    nodes = {MERGED_INPUT: nir.Input(input_type=np.array([total]))}
    for name, start, width in zip(sources, starts, widths):
        selection = np.zeros((width, total), dtype=np.float32)
        selection[np.arange(width), start + np.arange(width)] = 1.0
        nodes[name] = nir.Linear(weight=selection)
    nodes |= {name: node for name, node in graph.nodes.items() if name not in nodes}
    edges = [(MERGED_INPUT, name) for name in sources] + list(graph.edges)
    return nir.NIRGraph(nodes=nodes, edges=edges), sources


def _torch_name(name: str) -> str:
    """The name nirtorch gives a NIR node's module (nirtorch.nir_interpreter._sanitize_name)."""
    name = name.replace(".", "_")
    return f"nir_node_{name}" if keyword.iskeyword(name) else name


def _check_torch_names(graph: nir.NIRGraph) -> None:
    """Two NIR names that nirtorch would give one module name would silently share a module: an error instead."""
    seen: dict[str, str] = {}
    for name in graph.nodes:
        other = seen.setdefault(_torch_name(name), name)
        if other != name:
            raise ValueError(f"NIR nodes {other} and {name} are both {_torch_name(name)} in nirtorch")
