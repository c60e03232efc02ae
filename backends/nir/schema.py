"""The schema of manifest.json (export.py documents its fields), checked with pydantic when an export is opened.

Strict JSON types (no "1" for 1), no unknown keys, every field required; file paths relative and inside the
export folder, sha256s as 64 hex digits, ops.safetensors and every segment listed under "files". An IR node
record's "fields" are checked by the node type itself (records.rebuild), not here.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, ValidationError,
    model_validator,
)

from ...errors import SpikecompileError
from .export import FORMAT, FORMAT_VERSION, OPS_FILE
from .lower import VARIANTS


def _inside(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or ".." in parts or "\\" in path:
        raise ValueError(f"must be a path inside the export folder, got {path!r}")
    return path


RelativePath = Annotated[str, AfterValidator(_inside)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1)]
Wiring = list[tuple[Name, str | None]]
"""A node's input edges: [producer, port] (port null: the node's only input)."""


class _Record(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TensorRecord(_Record):
    dtype: str
    shape: list[Annotated[int, Field(ge=0, lt=2**31)]]
    values: list[bool | int | float]


class SegmentStep(_Record):
    segment: RelativePath
    nodes: Annotated[dict[Name, Wiring], Field(min_length=1)]
    inputs: list[Name]
    outputs: list[Name]


class RecordStep(_Record):
    name: Name
    type: Name
    fields: dict
    tensors: dict[Name, TensorRecord]
    inputs: Wiring


class Spec(_Record):
    type: str
    spec: str


def _step_kind(step) -> str:
    return "segment" if isinstance(step, dict) and "segment" in step else "record"


Step = Annotated[Annotated[SegmentStep, Tag("segment")] | Annotated[RecordStep, Tag("record")],
                 Discriminator(_step_kind)]


class Manifest(_Record):
    format: Literal[FORMAT]
    format_version: Literal[FORMAT_VERSION]
    variant: Literal[tuple(VARIANTS)]
    nir: str
    files: dict[RelativePath, Sha256]
    steps: list[Step]
    specs: list[Spec]

    @model_validator(mode="after")
    def _files_listed(self):
        unlisted = [path for path in [OPS_FILE, *(step.segment for step in self.steps
                                                    if isinstance(step, SegmentStep))] if path not in self.files]
        if unlisted:
            raise ValueError(f"files lacks {', '.join(unlisted)}")
        return self


def check_manifest(text: str | bytes, path) -> None:
    """SpikecompileError naming `path` and the first field at fault if the JSON `text` is not a valid manifest."""
    try:
        Manifest.model_validate_json(text)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "the manifest"
        raise SpikecompileError(f"{path}: {where}: {first['msg']} (got {first['input']!r:.80}); export again"
                                ) from None
