"""Analytic mode: the counts of a model known only by its config, at a chosen sequence length and firing rates.

The graph is traced from the config with every weight on PyTorch's meta device (no memory, no weights): the
same IR as a converted model (base-2 neurons at T, the online Hadamard before down_proj when rotated, no KV
prefix). Each spike site's events are its expected spikes — the firing rate of its site kind at every element
and step — and go through the same counting code as a measured run, so a measured and an analytic ledger of
one model differ only where the spikes are not spread uniformly (e.g. over query rows under a causal mask).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from spikecompile.errors import SpikecompileError
from spikecompile.ir import Graph, PhaseNeuron, validate

from .counting import check_attention, count
from .run import SimRun

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_config(path: str | Path) -> dict:
    """A Hugging Face config.json-style dict; SpikecompileError naming the file and a missing field."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SpikecompileError(f"{path}: cannot read a model config ({error})") from None
    missing = [name for name in CONFIG_FIELDS if not isinstance(config.get(name), int)]
    if missing:
        raise SpikecompileError(f"{path}: config field {missing[0]} missing or not an integer "
                                f"(needs {', '.join(CONFIG_FIELDS)})")
    return config


def config_graph(config: Mapping, timesteps: int, grains: int = 2, rotated: bool = True) -> Graph:
    """The IR of a LLaMA-style model with this config, weights on the meta device, timesteps assigned."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from spikecompile.conversion.convert import SpikingModel
    from spikecompile.conversion.neuron import base2_params
    from spikecompile.conversion.rotation import OnlineHadamard
    from spikecompile.conversion.sites import install_sites
    from spikecompile.frontend import trace
    from spikecompile.passes import PassManager

    fields = {key: value for key, value in config.items() if not key.startswith("_") and key != "source"}
    llama_config = LlamaConfig(**fields)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config)
    model.model.rotary_emb = LlamaRotaryEmbedding(llama_config)  # its inv_freq is data the RoPE nodes hold
    if rotated:
        for layer in model.model.layers:
            layer.mlp.down_proj.register_forward_pre_hook(OnlineHadamard(layer.mlp.down_proj.in_features))
    sites = install_sites(model)
    neuron = base2_params(torch.tensor(1.0), timesteps, grains)
    record = {"coding": {"timesteps": timesteps}, "rotation": None, "prefix": None,
              "sites": {name: {"tau": neuron.tau, "genotype": neuron.genotype, "d": neuron.d, "h": neuron.h,
                               "theta": neuron.theta} for name in sites}}
    graph, _ = trace(SpikingModel(model, None, sites, record))
    graph, _ = PassManager(["assign_timesteps"]).run(graph)
    return graph


def analytic_run(graph: Graph, seq_len: int, rates: Mapping[str, float], attention: str = "causal") -> SimRun:
    """Counts for one sequence of `seq_len` tokens with the firing rate rates[kind] at every site of that kind."""
    from spikecompile.inspect import bind

    from . import node_layer

    check_attention(attention)
    if not (isinstance(seq_len, int) and seq_len >= 1):
        raise SpikecompileError(f"sequence length {seq_len!r}: must be an int ≥ 1")
    types = validate(graph)
    shapes = {name: tuple(bind(dim, {"batch": 1, "seq": seq_len}) for dim in types[name].shape) for name in graph}
    events, sites = {}, {}
    for name in graph:
        node = graph[name]
        if not isinstance(node, PhaseNeuron):
            continue
        rate = _rate(rates, node.kind)
        events[name] = torch.tensor(rate).expand(node.timesteps, *shapes[name])
        elements = int(torch.Size(shapes[name]).numel())
        sites[node.site] = {"node": name, "layer": node_layer(name), "kind": node.kind,
                            "timesteps": node.timesteps, "elements": elements,
                            "spikes_per_step": [rate * elements] * node.timesteps, "firing_rate": rate}
    snn, ann = count(graph, shapes, events, attention)
    return SimRun(tokens=seq_len, snn=snn, ann=ann, layers={name: node_layer(name) for name in graph}, sites=sites)


def rates_by_kind(run: SimRun) -> dict[str, float]:
    """Each site kind's firing rate over a run: its spikes over its neuron steps, all layers together."""
    spikes, steps = {}, {}
    for site in run.sites.values():
        spikes[site["kind"]] = spikes.get(site["kind"], 0.0) + sum(site["spikes_per_step"])
        steps[site["kind"]] = steps.get(site["kind"], 0) + site["elements"] * site["timesteps"]
    return {kind: spikes[kind] / steps[kind] for kind in spikes}


def _rate(rates: Mapping[str, float], kind: str) -> float:
    if kind not in rates:
        raise SpikecompileError(f"firing rates: no rate for site kind {kind} (given: {', '.join(sorted(rates))})")
    rate = rates[kind]
    if not (isinstance(rate, int | float) and 0 <= rate <= 1):
        raise SpikecompileError(f"firing rates: {kind} = {rate!r} is not a rate in [0, 1]")
    return float(rate)
