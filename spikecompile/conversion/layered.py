"""A converted model opened for the build one part at a time: a weightless skeleton to trace, and a LayeredStore
whose tensors are read from the source only when a pass or a backend asks for them.

load_spiking_model rebuilds the whole model in memory (a 7B model's 13.5 GB in bf16, and more while it is
rotated). The build needs the module structure only to trace, and each weight only while a pass or a writer uses
it. So `open_converted` gives:

- a SpikingModel whose transformers model is the source config's model on PyTorch's meta device (no memory),
  with model.pt's sites, the same norm folding and online Hadamard hooks as load_spiking_model's (rotate_llama
  with apply=False, whose record is checked against model.pt's), and the real rotary embedding;
- a LayeredStore: a MutableMapping from the model's state_dict keys to tensors. Reading a key builds its part
  (the embedding; a decoder layer; the final norm with lm_head) from the source's tensors exactly as
  load_spiking_model has it (conversion.stream's parts, the same rotation and weight rounding). The parts used
  most recently are kept while they fit in `memory_bytes` (a small model's all stay; a 7B model keeps one or two
  decoder layers), so a reader in model order (the prefix pass, fold_hadamard, the writers, the simulator) builds
  each part about once per pass over the model.

Tensors written to the store (fold_hadamard's rotated weights, the prefix caches) stay in memory up to another
`memory_bytes`; beyond that each goes to a scratch folder (under TMPDIR), one safetensors file each: the folded
copy of a 7B model is on disk, not in memory.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import weakref
from collections import Counter, OrderedDict
from pathlib import Path

import torch
from torch import Tensor

from ..devices import Placement
from ..errors import SpikecompileError
from ..heap import release_freed_memory
from ..ir import StoreView
from ..loading import open_layered
from ..modelschema import check_prefix_vocabulary
from ..progress import bar
from .convert import SpikingModel, _embedding, _final_norm, check_rebuilt, converted_layer, fill_sites
from .rotation import ResidualRotation, rotate_llama
from .sites import install_sites
from .stream import LayerStream
from .weights import rtn_record

MEMORY_BYTES = 1 << 30
"""What a LayeredStore keeps in memory, twice: the parts it built most recently, and the tensors written to it
(beyond this, each written tensor goes to its scratch folder)."""


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(tensor.nbytes for tensor in tensors.values())


def part_of(key: str) -> int | str:
    """The part holding state_dict key `key`: a decoder layer's index, "embedding" or "head" (final norm, lm_head)."""
    if key.startswith("model.layers."):
        return int(key.split(".")[2])
    return "embedding" if key.startswith("model.embed_tokens.") else "head"


class LayeredStore(StoreView):
    """The build's tensor store (module docstring). keys: the skeleton's state_dict keys; rotations: "applied" (the
    offline rotations in the weights, as model.pt's RTN weights need) or "explicit" (norms folded only)."""

    def __init__(self, stream: LayerStream, record: dict, rotations: str, keys, scratch: Path,
                 memory_bytes: int | None = None):
        self.stream = stream
        self.rotation = None
        if record["rotation"] is not None:
            head_dim = stream.skeleton.model.layers[0].self_attn.head_dim
            self.rotation = ResidualRotation(stream.config.hidden_size, head_dim, record["rotation"]["seed"],
                                             untied=stream.tied, apply=rotations == "applied")
        self.weight_bits = (record.get("weights") or {}).get("bits")
        super().__init__(dict.fromkeys(keys))  # the source's keys: their tensors are built by _read
        self.scratch, self.memory_bytes = scratch, MEMORY_BYTES if memory_bytes is None else memory_bytes
        self._written_bytes = self._files = 0
        self._parts: OrderedDict[int | str, dict[str, Tensor]] = OrderedDict()  # least recently used first
        self._part_bytes = 0
        self._closer = None
        self._bar = None
        self.parts_built: Counter = Counter()
        """how many times each part was built from the source (a reader out of model order builds parts again)"""

    def close(self) -> None:
        """Close the source and remove the scratch folder now (else when the store is collected, or at exit)."""
        if self._closer is not None:
            self._closer()

    @contextlib.contextmanager
    def reading(self, desc: str, progress: bool):
        """Within: a bar `desc` with a step per part built from the source (a stage reading in model order builds
        each part once: layers + 2 steps)."""
        with bar(total=self.stream.layers + 2, desc=desc, unit="part", progress=progress) as self._bar:
            try:
                yield
            finally:
                self._bar = None

    # ---- the parts, as load_spiking_model has them -----------------------------------------------------------------

    def _build(self, part: int | str) -> tuple[torch.nn.Module, dict[str, Tensor]]:
        """The part's module (a decoder layer, the embedding, or the final norm) and its tensors under their
        state_dict keys, as load_spiking_model has them; counted, and a step of the current bar."""
        self.parts_built[part] += 1
        if self._bar is not None:
            self._bar.update()
        if isinstance(part, int):
            layer = converted_layer(self.stream, part, self.rotation, self.weight_bits)[0]
            return layer, {f"model.layers.{part}.{key}": tensor for key, tensor in layer.state_dict().items()}
        if part == "embedding":
            embedding = _embedding(self.stream, self.rotation)
            return embedding, {f"model.embed_tokens.{key}": tensor for key, tensor in embedding.state_dict().items()}
        head = self.stream.lm_head()  # a tied head: a copy of the unrotated embedding
        norm = _final_norm(self.stream, self.rotation, head)
        return norm, {**{f"model.norm.{key}": tensor for key, tensor in norm.state_dict().items()},
                      **{f"lm_head.{key}": tensor for key, tensor in head.state_dict().items()}}

    def _module(self, part: int | str) -> torch.nn.Module:
        """The part's module, built now; its tensors are kept as the mapping keeps a part it built."""
        module, tensors = self._build(part)
        if part not in self._parts:
            self._keep(part, tensors)
        return module

    def _keep(self, part: int | str, tensors: dict[str, Tensor]) -> None:
        # the least recently used parts are freed first, so that the new one fits beside those kept
        while self._parts and sum(map(_nbytes, self._parts.values())) + self._part_bytes > self.memory_bytes:
            self._parts.popitem(last=False)
        release_freed_memory()  # a no-op unless the heap holds more than its threshold free
        self._parts[part] = tensors
        self._part_bytes = max(self._part_bytes, _nbytes(tensors))

    @torch.inference_mode()
    def prefix_caches(self, token_ids: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Each layer's float keys and values on the prefix tokens, sites off: the whole model's PrefixCache, one
        layer at a time (conversion.stream: bitwise the whole model's forward)."""
        ids = torch.tensor([token_ids], device=self.stream.placement.device)
        sequence = self.stream.start(ids, self._module("embedding")(ids), is_prefix=True)
        caches = []
        for index in range(self.stream.layers):
            self.stream.run(self._module(index), sequence)
            cached = sequence.layer_cache.layers[index]
            caches.append((cached.keys[0], cached.values[0]))
        return caches

    # ---- the view: source tensors read by part, written ones stashed ------------------------------------------------

    def _read(self, key: str) -> Tensor:
        part = part_of(key)
        if part not in self._parts:
            self._keep(part, self._build(part)[1])
        self._parts.move_to_end(part)
        return self._parts[part][key]

    def _stash(self, key: str, tensor: Tensor) -> Tensor | Path:
        """The tensor itself while the written ones fit in memory_bytes, else the scratch file it is saved to."""
        if self._written_bytes + tensor.nbytes <= self.memory_bytes:
            self._written_bytes += tensor.nbytes
            return tensor
        from safetensors.torch import save_file

        self._files += 1
        path = self.scratch / f"{self._files}.safetensors"
        save_file({"tensor": tensor.detach().cpu().contiguous()}, path)
        return path

    def _unstash(self, kept: Tensor | Path) -> Tensor:
        if isinstance(kept, Path):
            from safetensors.torch import load_file

            return load_file(kept)["tensor"]
        return kept

    def _release(self, kept: Tensor | Path) -> None:
        if isinstance(kept, Path):
            kept.unlink(missing_ok=True)
        else:
            self._written_bytes -= kept.nbytes


def open_converted(path, record: dict, source, placement: Placement,
                   memory_bytes: int | None = None) -> tuple[SpikingModel, LayeredStore]:
    """(SpikingModel on the meta device with model.pt's sites, its LayeredStore) for model.pt at `path` (its record
    read and checked by the caller; `source` its verified ModelSource). One-line SpikecompileError naming `path`
    when model.pt does not match the source (its prefix vocabulary, site table, rotation or weight record). The
    store holds the source open (and any temporary copy of a GGUF) and its scratch folder until store.close(),
    or until it is garbage-collected or the interpreter exits (weakref.finalize)."""
    resources = contextlib.ExitStack()
    try:
        stream = LayerStream(resources.enter_context(open_layered(source)), placement)
        spiking = _skeleton(path, record, stream, placement, source.path)
        scratch = Path(tempfile.mkdtemp(prefix="spikecompile-build-"))
        resources.callback(shutil.rmtree, scratch, ignore_errors=True)
    except BaseException:
        resources.close()
        raise
    store = LayeredStore(stream, record, spiking.rotations, spiking.model.state_dict(), scratch, memory_bytes)
    store._closer = weakref.finalize(store, resources.close)
    spiking.store = store
    return spiking, store


def _skeleton(path, record: dict, stream: LayerStream, placement: Placement, source_path: str) -> SpikingModel:
    """The source's model on the meta device as load_spiking_model rebuilds it, checked against model.pt."""
    skeleton = copy.deepcopy(stream.skeleton)  # the stream builds its parts from its own, untouched skeleton
    skeleton.model.rotary_emb = stream.rotary
    skeleton.to(placement.torch_dtype)
    check_prefix_vocabulary(record, skeleton.get_input_embeddings().num_embeddings, str(path), source_path)
    rotation, weights = record["rotation"], record.get("weights")
    check_rebuilt(record, rotate_llama(skeleton, seed=rotation["seed"], apply=False) if rotation is not None else None,
                  rtn_record(weights["bits"], stream.layers) if weights else None, path)
    sites = install_sites(skeleton)
    if list(sites) != list(record["sites"]):
        raise SpikecompileError(f"{path}: its spike-site table does not match the model's layers; re-convert")
    fill_sites(sites, record, path, placement.device)
    sites.set_mode("decoded")
    rotations = "explicit" if rotation is not None and not weights else "applied"
    return SpikingModel(skeleton, stream.source.tokenizer, sites, record, None, rotations)
