"""files.write_safetensors: the streamed writer gives safetensors' own bytes, and refuses a tensor unlike its header."""

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikecompile.files import file_sha256, write_safetensors

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]
NAMES = st.text(alphabet="abcdefghij.0123456789_é", min_size=1, max_size=12)
SHAPES = st.lists(st.integers(0, 4), max_size=3).map(tuple)


def _tensor(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * 50).to(dtype)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(NAMES, st.tuples(SHAPES, st.sampled_from(DTYPES), st.integers(0, 99)), min_size=1, max_size=8))
def test_streamed_file_is_save_files_bytes(tmp_path_factory, entries):
    folder = tmp_path_factory.mktemp("st")
    tensors = {name: _tensor(shape, dtype, seed) for name, (shape, dtype, seed) in entries.items()}
    safetensors.torch.save_file(tensors, folder / "library.safetensors")
    read = []
    digest = write_safetensors(folder / "streamed.safetensors",
                               {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()},
                               lambda name: read.append(name) or tensors[name])
    assert (folder / "streamed.safetensors").read_bytes() == (folder / "library.safetensors").read_bytes()
    assert digest == file_sha256(folder / "library.safetensors")
    assert sorted(read) == sorted(tensors)  # each tensor asked for once


def test_a_tensor_unlike_its_header_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tensor w: torch.float32 \\[2\\] where the header has torch.bfloat16"):
        write_safetensors(tmp_path / "w.safetensors", {"w": ((2,), torch.bfloat16)}, lambda name: torch.zeros(2))
