"""model.pt: versioned plain-data format, safe loading, atomic writes."""

import pytest
import torch

from spikecompile import modelfile
from spikecompile.errors import SpikecompileError


def _record():
    return {"source": {"kind": "hf_folder", "path": "/x", "sha256": "0" * 64}, "rotation": None, "prefix": None,
            "coding": {"name": "phase", "timesteps": 8, "grains": 2},
            "sites": {"final_norm": {"tau": torch.tensor(1.5), "genotype": torch.zeros(8, dtype=torch.long)}},
            "calibration": {}, "conversion": {"seed": 0}}


def test_round_trip(tmp_path):
    modelfile.save(_record(), tmp_path / "m.pt")
    loaded = modelfile.load(tmp_path / "m.pt")
    assert loaded["format_version"] == modelfile.FORMAT_VERSION
    assert torch.equal(loaded["sites"]["final_norm"]["tau"], torch.tensor(1.5))
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def test_truncated_file(tmp_path):
    modelfile.save(_record(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SpikecompileError, match="truncated, corrupt"):
        modelfile.load(tmp_path / "m.pt")


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"", b"PK\x03\x04 not a zip"])
def test_foreign_bytes(tmp_path, content):
    (tmp_path / "m.pt").write_bytes(content)
    with pytest.raises(SpikecompileError, match="not a readable model.pt"):
        modelfile.load(tmp_path / "m.pt")


def test_other_format_version(tmp_path):
    torch.save({**_record(), "format": modelfile.FORMAT, "format_version": 99}, tmp_path / "m.pt")
    with pytest.raises(SpikecompileError, match="format version 99, this spikecompile reads version 2"):
        modelfile.load(tmp_path / "m.pt")


def test_not_a_model_file(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "m.pt")
    with pytest.raises(SpikecompileError, match="not a spikecompile model file"):
        modelfile.load(tmp_path / "m.pt")


class _Payload:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({**_record(), "format": modelfile.FORMAT, "format_version": 1, "evil": _Payload(str(marker))},
               tmp_path / "m.pt")
    with pytest.raises(SpikecompileError, match="contains pickled code"):
        modelfile.load(tmp_path / "m.pt")
    assert not marker.exists()


def test_unwritable_destination(tmp_path):
    with pytest.raises(SpikecompileError, match="does not exist"):
        modelfile.save(_record(), tmp_path / "no" / "m.pt")
    # /proc refuses new files even for root; permission bits alone would not stop root.
    with pytest.raises(SpikecompileError, match="/proc/m.pt: (cannot write there|the directory /proc is not writable)"):
        modelfile.save(_record(), "/proc/m.pt")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, stream):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(modelfile.torch, "save", broken_save)
    with pytest.raises(SpikecompileError, match="writing failed .*nothing was written"):
        modelfile.save(_record(), tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_objects_that_would_not_load_back(tmp_path):
    record = _record()
    record["conversion"]["torch"] = torch.__version__  # a str subclass: weights_only loading refuses it
    with pytest.raises(ValueError, match="record.conversion.torch: TorchVersion is not plain data"):
        modelfile.save(record, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
