"""Trace a LLaMA-style model known only by its config: every weight on PyTorch's meta device (no memory, no
data), the same IR as a converted model with base-2 neurons at T, the online Hadamard before down_proj when
rotated, no KV prefix. For counting (backends.sim.analytic) and resource mapping (passes.loihi_mapping) of models
too large to load.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import SpikecompileError
from ..ir import Graph

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

    from ..conversion.convert import SpikingModel
    from ..neuron import base2_params
    from ..conversion.rotation import OnlineHadamard
    from ..conversion.sites import install_sites
    from .trace import trace
    from ..passes import PassManager

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
                               "theta": neuron.theta, "v0": neuron.v0, "max_spikes": 0} for name in sites}}
    graph, _ = trace(SpikingModel(model, None, sites, record))
    graph, _ = PassManager(["assign_timesteps"]).run(graph)
    return graph
