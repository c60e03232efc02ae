"""`eval`'s perplexities of a converted model, one decoder layer at a time (as convert runs: conversion.stream).

Each layer is built from its source tensors, rotated and RTN-quantized as model.pt records, its spike sites
installed with model.pt's neurons; every window's hidden states go through it three ways, then it is freed:
- the ANN: sites off, no prefix (SpikingModel.ann_logits);
- the float model after the KV prefix: sites off (SpikingModel.prefixed_float_logits);
- the SNN after the KV prefix: sites decoded (SpikingModel.logits).
The prefix itself runs with every site off, as PrefixCache computes it. The final norm (with its final_norm site)
and lm_head give the logits at the end. The layers are transformers' own, called as the whole model's forward
calls them, so each perplexity is bit for bit load_spiking_model's (tests/test_streamed_eval.py). Memory: one
layer, the embedding or lm_head while they run, and the hidden states of the windows (three copies with a prefix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..data import token_windows
from ..devices import Placement
from ..errors import SpikecompileError
from ..evaluation import perplexity_of, window_nll
from ..heap import release_freed_memory
from ..loading import open_layered
from ..modelschema import check_prefix_vocabulary
from ..progress import shown
from .convert import (EMBEDDING_ALIAS, _embedding, _final_norm_site, check_rebuilt, converted_layer, fill_sites,
                      recorded_source)
from .rotation import ResidualRotation
from .sites import LAYER_SITE_KINDS, site_name
from .stream import LayerStream
from .weights import rtn_record


@dataclass
class Perplexities:
    """eval's three perplexities over `windows` token windows (prefixed_float is ann without a prefix), and the
    seconds of each stage: start (opening and checking the source, the windows' embeddings), layers (the decoder
    layers' loop: the part that grows with depth), head (the final norm and lm_head's logits of the three passes);
    layer_s: each decoder layer's seconds."""

    ann: float
    prefixed_float: float
    snn: float
    windows: int
    timings_s: dict = field(default_factory=dict)
    layer_s: list = field(default_factory=list)


def streamed_perplexities(path, record: dict, text, seqlen: int, max_windows: int | None,
                          source_path: str | None = None, placement: Placement = Placement(),
                          progress: bool = False, part_memory: int | None = None) -> Perplexities:
    """The ANN, float-after-prefix and SNN perplexities of model.pt (`path`, its checked `record`) on the token
    windows of `text` (data.load_text), computed layer by layer; every check of model.pt against its source
    (sha256, tensor names, site table, prefix vocabulary) comes before any weight is read. part_memory: bytes of
    one part the device may hold (LayerStream.dispatched)."""
    start = time.perf_counter()
    source = recorded_source(record, path, source_path)
    with open_layered(source, progress) as layered:
        stream = LayerStream(layered, placement, part_memory)
        layered.weights.check_names(stream.tensor_names(), EMBEDDING_ALIAS, source.path)
        _check_sites(record, stream, path)
        check_prefix_vocabulary(record, stream.skeleton.get_input_embeddings().num_embeddings, str(path),
                                source.path)
        windows = token_windows(layered.tokenizer, text, seqlen, max_windows, "evaluation")
        windows = [ids.to(placement.device) for ids in windows]
        return _run(stream, record, path, windows, progress, start)


def _check_sites(record: dict, stream: LayerStream, path) -> None:
    """model.pt's site table must be the one install_sites gives this source's layers."""
    names = [site_name(index, kind) for index in range(stream.layers) for kind in LAYER_SITE_KINDS]
    if [*names, site_name(None, "final_norm")] != list(record["sites"]):
        raise SpikecompileError(f"{path}: its spike-site table does not match the model's layers; re-convert")


class _Passes:
    """Every window's sequence in the three passes (ann; prefixed_float, None without a prefix: then it is the
    ANN; snn), entering the next layer, and the prefix's (None without one), from the (rotated) embedding."""

    def __init__(self, stream: LayerStream, windows: list[torch.Tensor], prefix_ids: list[int] | None, rotation):
        embedding = _embedding(stream, rotation)
        device = stream.placement.device
        use_cache = bool(getattr(stream.config, "use_cache", True))  # what model(ids) gives its layers
        with torch.inference_mode():
            self.ann = [stream.start(ids, embedding(ids), use_cache=use_cache) for ids in windows]
            self.prefix = None
            if prefix_ids:
                prefix = torch.tensor([prefix_ids], device=device)
                self.prefix = stream.start(prefix, embedding(prefix), is_prefix=True)
            after = {"prefix": self.prefix, "use_cache": True} if self.prefix else {"use_cache": use_cache}
            self.prefixed_float = [stream.start(ids, embedding(ids), **after) for ids in windows] \
                if self.prefix else None
            self.snn = [stream.start(ids, embedding(ids), **after) for ids in windows]

    def float_runs(self) -> list:
        """The sequences run with every site off, in order: the ANN's, the prefix, the float-after-prefix ones."""
        return [*self.ann, *([self.prefix] if self.prefix else []), *(self.prefixed_float or [])]


def _run(stream: LayerStream, record: dict, path, windows: list[torch.Tensor], progress: bool,
         start: float) -> Perplexities:
    rotation = None
    if record["rotation"] is not None:
        head_dim = stream.skeleton.model.layers[0].self_attn.head_dim
        rotation = ResidualRotation(stream.config.hidden_size, head_dim, record["rotation"]["seed"],
                                    untied=stream.tied)
    passes = _Passes(stream, windows, (record["prefix"] or {}).get("token_ids"), rotation)
    timings = {"start": time.perf_counter() - start}
    start, layer_s = time.perf_counter(), []
    for index in tqdm(range(stream.layers), desc="eval (ANN, SNN)", unit="layer", disable=not shown(progress)):
        began = time.perf_counter()
        layer, sites = converted_layer(stream, index, rotation, (record.get("weights") or {}).get("bits"))
        fill_sites(sites, record, path, stream.placement.device)
        for sequence in passes.float_runs():
            stream.run(layer, sequence)
        sites.set_mode("decoded")
        for sequence in passes.snn:
            stream.run(layer, sequence)
        del layer, sites
        release_freed_memory()
        layer_s.append(time.perf_counter() - began)
    timings["layers"] = time.perf_counter() - start
    start = time.perf_counter()
    head = stream.lm_head()  # a tied one: a copy of the embedding before its rotation, as the whole model's
    norm, final = _final_norm_site(stream, rotation, head)
    weights = record.get("weights")
    check_rebuilt(record, rotation.record if rotation is not None else None,
                  rtn_record(weights["bits"], stream.layers) if weights else None, path)
    fill_sites(final, record, path, stream.placement.device)

    def perplexity(sequences) -> float:
        with torch.inference_mode():
            return perplexity_of([window_nll(head(norm(sequence.hidden)), sequence.ids) for sequence in sequences],
                                 windows)

    ann = perplexity(passes.ann)
    prefixed = perplexity(passes.prefixed_float) if passes.prefixed_float else ann
    final.set_mode("decoded")
    snn = perplexity(passes.snn)
    timings["head"] = time.perf_counter() - start
    return Perplexities(ann, prefixed, snn, len(windows), timings, layer_s)
