"""The model one decoder layer at a time ("sequential onloading"): each part is built from its own tensors, read
lazily from the source (loading.LayeredSource), runs every sequence through it, and is freed before the next.

The float forward is transformers' own: each layer is the architecture's decoder-layer class (taken from the model
built on the meta device), called with the arguments its model's forward gives it (the causal mask, the rotary
position embeddings, the position ids, a KV cache), computed here as that forward computes them. So a sequence
streamed through the layers gets bitwise the hidden states of the whole model's forward: the same ops in the same
order on the same tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..devices import Placement
from ..loading import LayeredSource
from .sites import ATTENTION_IMPLEMENTATION, register_attention_implementation


@dataclass
class Sequence:
    """One token sequence on its way through the layers.

    hidden: its hidden states [1, L, d] before the next layer; prefix: the sequence whose keys and values it
    attends to first (as a window after the KV prefix: today's PrefixCache); use_cache: whether the model's forward
    gives its layers a cache (model(ids) does when config.use_cache; _scan without a prefix does not).
    The mask, positions and rotary embeddings are computed once (they are the same for every layer).
    """

    ids: torch.Tensor
    hidden: torch.Tensor
    use_cache: bool
    prefix: Sequence | None = None
    is_prefix: bool = False
    layer_inputs: dict = field(default_factory=dict)
    layer_cache: object = None
    """a prefix's cache after the current layer: its keys and values there, which the windows after it copy"""


class LayerStream:
    """Builds the model's parts on the placement from the source's tensors: embedding, decoder layers, final norm,
    lm_head; and runs sequences through a decoder layer."""

    def __init__(self, source: LayeredSource, placement: Placement, part_memory: int | None = None):
        from transformers import AutoModelForCausalLM

        self.source, self.placement, self.config = source, placement, source.config
        self.part_memory = part_memory
        """bytes of one part (a decoder layer, the embedding, lm_head) the device may hold; None: no limit.
        A larger part is built and converted in CPU memory, then dispatched (dispatched)."""
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, attn_implementation="eager")
        # the layers call the attention function (and the mask function) the config names: the sites' one, whose
        # q/k/v/probs sites are off or recording (identity), as install_sites sets it on a whole model
        register_attention_implementation()  # before the first mask is made: an unregistered name gets no mask
        self.config._attn_implementation = ATTENTION_IMPLEMENTATION
        self.layers = self.config.num_hidden_layers
        self.rotary = self._place(type(self.skeleton.model.rotary_emb)(config=self.config))

    def _place(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module on the placement, as load_model places a whole model (parameters and float buffers cast); a
        part larger than part_memory is cast but stays in CPU memory until it is dispatched."""
        device = self.placement.device if self.fits(module) else "cpu"
        return module.to(device=device, dtype=self.placement.torch_dtype).eval()

    def fits(self, module: torch.nn.Module) -> bool:
        """Whether the module's parameters and buffers, in the placement's dtype, fit part_memory."""
        if self.part_memory is None:
            return True
        size = self.placement.torch_dtype.itemsize
        return sum(tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
                   for tensor in (*module.parameters(), *module.buffers())) <= self.part_memory

    def dispatched(self, module: torch.nn.Module) -> torch.nn.Module:
        """The part ready to run on the placement: itself when it fits part_memory. A larger one goes through
        accelerate's big-model machinery: infer_auto_device_map puts the submodules that fit on the device and the
        rest off it (in CPU memory when the device is CUDA; in a folder on disk when it is the CPU, freed with the
        module), and dispatch_model's hooks bring each one's weights in for its forward and out after it. The
        forward is the same operations on the same device: the same bits."""
        if self.fits(module):
            return module
        import logging
        import shutil
        import tempfile
        import weakref

        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_max_memory

        cuda = self.placement.device == "cuda"
        main = torch.cuda.current_device() if cuda else "cpu"
        max_memory = {main: self.part_memory}
        if cuda:  # what does not fit the GPU waits in CPU memory (as much as is free now), then on disk
            max_memory["cpu"] = get_max_memory()["cpu"]
        # dispatched inside a holder: accelerate maps submodules by name, and a part with weights of its own (an
        # embedding, lm_head, a norm) has no name of its own at the top
        holder = torch.nn.ModuleDict({"part": module})
        device_map = infer_auto_device_map(holder, max_memory=max_memory)
        if "" in device_map:  # the whole part in one place: named, as dispatch_model finds weights by name
            device_map = {"part": device_map[""]}
        folder = tempfile.mkdtemp(prefix="spikecompile-offload-")
        weakref.finalize(module, shutil.rmtree, folder, ignore_errors=True)
        big_modeling = logging.getLogger("accelerate.big_modeling")
        level = big_modeling.level
        big_modeling.setLevel(logging.ERROR)  # its warning that weights are offloaded: what was asked for, each part
        try:
            dispatch_model(holder, device_map, main_device=main, offload_dir=folder)
        finally:
            big_modeling.setLevel(level)
        return module  # hooked in place

    def _built(self, meta_module: torch.nn.Module, prefix: str, aliases: dict | None = None) -> torch.nn.Module:
        """A fresh copy of a meta module, filled with the source tensors under `prefix` (read now)."""
        module = copy.deepcopy(meta_module)
        names = [prefix + name for name in module.state_dict()]
        tensors = self.source.weights.read(names, self.placement.torch_dtype, aliases or {})
        module.load_state_dict({name[len(prefix):]: tensor for name, tensor in tensors.items()}, assign=True)
        module.requires_grad_(False)
        return self._place(module)

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index`, built from its tensors (model.layers.<index>.*)."""
        return self._built(self.skeleton.model.layers[index], f"model.layers.{index}.")

    def embedding(self) -> torch.nn.Embedding:
        return self._built(self.skeleton.model.embed_tokens, "model.embed_tokens.",
                           {"model.embed_tokens.weight": "lm_head.weight"})

    def norm(self) -> torch.nn.Module:
        return self._built(self.skeleton.model.norm, "model.norm.")

    def lm_head(self, embedding: torch.nn.Embedding | None = None) -> torch.nn.Linear:
        """lm_head: its own weight, or a copy of the (unrotated) embedding's when the config ties them."""
        if self.tied:
            head = copy.deepcopy(self.skeleton.lm_head)
            head.weight = torch.nn.Parameter((embedding or self.embedding()).weight.detach().clone(), requires_grad=False)
            return self._place(head)
        return self._built(self.skeleton.lm_head, "lm_head.")

    @property
    def tied(self) -> bool:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return bool(getattr(text, "tie_word_embeddings", False))

    def tensor_names(self) -> list[str]:
        """Every tensor the stream will read (the skeleton's state dict; lm_head's only when untied)."""
        names = list(self.skeleton.state_dict())
        return [name for name in names if not (self.tied and name == "lm_head.weight")]

    @torch.inference_mode()
    def start(self, ids: torch.Tensor, hidden: torch.Tensor, prefix: Sequence | None = None,
              use_cache: bool = True, is_prefix: bool = False) -> Sequence:
        """A sequence of [1, L] ids whose hidden states [1, L, d] enter the next layer (the embedding's output
        before layer 0), after `prefix`'s tokens if given; is_prefix: later sequences attend to its keys and
        values."""
        return self.begin(ids, hidden, prefix, use_cache, is_prefix)

    def begin(self, ids: torch.Tensor, hidden: torch.Tensor, prefix: Sequence | None = None,
              use_cache: bool = True, is_prefix: bool = False) -> Sequence:
        """start, outside inference mode: the sequence's mask and rotary embeddings are ordinary tensors, which a
        forward with gradients (forward) may save for its backward."""
        sequence = Sequence(ids, hidden.to(self.placement.device), use_cache, prefix, is_prefix)
        self._prepare(sequence)
        return sequence

    def _prepare(self, sequence: Sequence) -> None:
        """The layer arguments of LlamaModel.forward (and Qwen2's, Mistral's, with full attention)."""
        from transformers import DynamicCache
        from transformers.masking_utils import create_causal_mask

        hidden = sequence.hidden
        past = len(sequence.prefix.ids[0]) if sequence.prefix is not None else 0
        cache = DynamicCache(config=self.config) if sequence.use_cache else None
        if past:  # the windows' mask and positions see a cache holding the prefix (only its length matters)
            shape = (1, self.config.num_key_value_heads, past, self._head_dim)
            cache.update(torch.zeros(shape, dtype=hidden.dtype, device=hidden.device),
                         torch.zeros(shape, dtype=hidden.dtype, device=hidden.device), 0)
        position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache,
                                  position_ids=position_ids)
        sequence.layer_inputs = {"attention_mask": mask, "position_ids": position_ids,
                                 "position_embeddings": self.rotary(hidden, position_ids=position_ids)}

    @property
    def _head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @torch.inference_mode()
    def run(self, layer: torch.nn.Module, sequence: Sequence) -> None:
        """sequence.hidden ← layer(sequence.hidden), with the cache the whole model's forward gives that layer:
        a fresh one for a prefix (kept in layer_cache for the windows after it), a copy of the prefix's for a
        window after one (the layer appends the window's keys and values to it)."""
        sequence.hidden, cache = self._call(layer, sequence, sequence.hidden)
        sequence.layer_cache = cache if sequence.is_prefix else None

    def forward(self, layer: torch.nn.Module, sequence: Sequence, hidden: torch.Tensor) -> torch.Tensor:
        """layer(hidden) as `run` calls it for `sequence` (a window, made by begin), in the current grad mode, and
        without moving the sequence on: the per-layer backward of conversion.budget.site_fisher_part."""
        return self._call(layer, sequence, hidden)[0]

    def _call(self, layer: torch.nn.Module, sequence: Sequence, hidden: torch.Tensor):
        """(layer output, the cache it was given)."""
        from transformers import DynamicCache

        if sequence.prefix is not None:
            cache = copy.deepcopy(sequence.prefix.layer_cache)
        else:
            cache = DynamicCache(config=self.config) if sequence.use_cache else None
        return layer(hidden, cache=cache, use_cache=sequence.use_cache, **sequence.layer_inputs), cache

