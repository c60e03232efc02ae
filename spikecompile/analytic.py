"""The config-only (analytic) mode: a LLaMA-family model (LLaMA, Mistral, Qwen2: loading.SUPPORTED_MODEL_TYPES)
known only by its config.json, for counting
(backends.sim.analytic) and Loihi 2 placement (passes.loihi_mapping) of models too large to load.

    load_config   a packaged config (targets/models/<name>.json, MODEL_CONFIGS) or a file, its fields checked
    config_graph  the IR traced from the config alone: every weight on PyTorch's meta device (no memory, no
                  data), the same IR as a converted model with base-2 neurons at T, the online Hadamard before
                  down_proj when rotated, no KV prefix
    map_config    map_loihi2 on that graph
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import torch

from .errors import SpikecompileError
from .ir import Graph

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
MODEL_CONFIGS = ("llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-0.5b", "qwen2.5-7b", "smollm2-135m")
"""The configs shipped in spikecompile.targets/models, by name."""


def load_config(name_or_path: str | Path) -> dict:
    """A Hugging Face config.json-style dict: a packaged one by name (MODEL_CONFIGS; a file of that name wins) or
    the file at the path; SpikecompileError naming the file and a missing field."""
    path = Path(name_or_path)
    try:
        if not path.exists() and str(name_or_path) in MODEL_CONFIGS:
            models = resources.files("spikecompile.targets") / "models"
            config = json.loads((models / f"{name_or_path}.json").read_text(encoding="utf-8"))
        else:
            config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SpikecompileError(f"{path}: cannot read a model config ({error}); packaged: "
                                f"{', '.join(MODEL_CONFIGS)}") from None
    if not isinstance(config, dict):
        raise SpikecompileError(f"{path}: a model config must be a JSON object, got a {type(config).__name__}")
    missing = [name for name in CONFIG_FIELDS if not isinstance(config.get(name), int)]
    if missing:
        raise SpikecompileError(f"{path}: config field {missing[0]} missing or not an integer "
                                f"(needs {', '.join(CONFIG_FIELDS)})")
    return {**config, "_file": str(path)}  # where config_graph's errors point


def config_graph(config: Mapping, timesteps: int, grains: int = 2, rotated: bool = True) -> Graph:
    """The IR of the LLaMA-family model of this config (its model_type; "llama" when it names none), weights on
    the meta device, timesteps assigned; SpikecompileError for an architecture or sliding window that
    loading refuses."""
    from .conversion.convert import SpikingModel
    from .conversion.rotation import OnlineHadamard
    from .conversion.sites import install_sites
    from .frontend import trace
    from .neuron import base2_params
    from .passes import PassManager

    model = _meta_model(config)
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


def _meta_model(config: Mapping):
    """The transformers causal LM of the config with every weight on the meta device, except its rotary
    embedding's inv_freq (data the RoPE nodes hold: transformers' own, scaled as rope_scaling says)."""
    from transformers import AutoModelForCausalLM

    from .loading import check_attention_window, check_model_type, full_attention_config, transformers_config

    where = config.get("_file", "the model config")
    fields = {key: value for key, value in config.items() if not key.startswith("_") and key != "source"}
    check_model_type(fields.setdefault("model_type", "llama"), fields.get("architectures"), where)
    model_config = transformers_config(fields, where)
    check_attention_window(model_config, where)
    full_attention_config(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, attn_implementation="eager")
    model.model.rotary_emb = type(model.model.rotary_emb)(model_config)
    return model


def map_config(config: Mapping, timesteps: int = 8, **options) -> dict:
    """Map the IR traced from a config alone (config_graph: weights on the meta device, base-2 neurons at
    `timesteps`) on Loihi 2; options as for passes.loihi_mapping.map_loihi2 (no store, no samples)."""
    from .passes.loihi_mapping import map_loihi2

    start = time.perf_counter()
    graph = config_graph(dict(config), timesteps)
    traced = time.perf_counter() - start
    report = map_loihi2(graph, **options)
    report["seconds_trace"] = traced
    return report
