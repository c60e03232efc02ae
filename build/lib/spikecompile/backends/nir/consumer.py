"""An independent NIR consumer for run(): nirtorch 2.6 (nirtorch.nir_to_torch, which executes a graph in dependency
order and sums the edges into a node) with explicit node maps written from NIR's own equations — nothing of
spikecompile's neuron code — and no default maps, so an unmapped node type is an error, never an identity.

nirtorch runs a graph with one Input and one Output (with two Outputs it loops forever), so each Output of a
segment runs on the segment cut down to that Output's ancestors; an Output that depends on two Inputs (a residual
add in a whole-model export) cannot run in it; decoder blocks (ir.decoder_block) have one Input per segment.
norse.from_nir is no alternative: its executor (nirtorch.load) runs nodes in depth-first order, which is not a
dependency order for these graphs. nirtorch is not part of the nir extra: scripts/install.sh installs it
(pip install --no-deps 'nirtorch>=2.6,<3').
"""

from __future__ import annotations

import collections

import nir
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
            part = _cut(graph, output)
            module = nirtorch.nir_to_torch(part, self.node_map, default_map={})
            for name, node in part.nodes.items():
                if isinstance(node, nir.Threshold | nir.IF):
                    module.get_submodule(name.replace(".", "_")).register_forward_hook(self._recorder(name))
            sources = [name for name, node in part.nodes.items() if isinstance(node, nir.Input)]
            if len(sources) != 1:
                raise ValueError(f"{output} depends on {len(sources)} Input nodes; nirtorch runs graphs with one")
            results[output], _ = module(inputs[sources[0]])
        return results

    def signed_spikes(self, neuron: str, steps: int) -> Tensor:
        """σ·s_t of a lowered phase neuron, [T, ...]: its pos channel's spikes minus its neg channel's."""
        return torch.stack([self.spikes[f"{neuron}.pos.spike{t}"] - self.spikes[f"{neuron}.neg.spike{t}"]
                            for t in range(steps)])

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
