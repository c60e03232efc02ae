"""model.pt: versioned plain-data format, safe loading, atomic writes."""

import pytest
import torch

from spikecompile import modelfile
from spikecompile.errors import SpikecompileError


def _record():
    """The smallest record the model.pt schema accepts: one site (final_norm), T=8, 2 grains."""
    site = {"layer": None, "kind": "final_norm", "timesteps": 8,
            "genotype": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), "tau": torch.tensor(1.5),
            "d": torch.full((2,), 2.0), "h": torch.full((2,), 2.0), "theta": torch.full((2,), 2.0),
            "v0": torch.tensor(1.5 * 2.0 ** -9), "max_spikes": 0,
            "calibration": {"mse": 1e-6, "base2_tau": 1.5, "base2_mse": 1e-6, "lloyd_max_mse": 1e-7,
                            "lloyd_max_levels": 511, "max_abs": 1.5}}
    return {"source": {"kind": "hf_folder", "path": "/x", "sha256": "0" * 64}, "rotation": None, "prefix": None,
            "coding": {"name": "phase", "timesteps": 8, "grains": 2}, "sites": {"final_norm": site},
            "calibration": {"source": "builtin", "sha256": "0" * 64, "windows": 1, "seqlen": 64,
                            "samples_per_site": 64},
            "conversion": {"spikecompile": "0", "torch": "0", "transformers": "0", "seed": 0, "fit": {},
                           "options": {}, "created_utc": "1970-01-01T00:00:00Z"}}


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


def test_a_record_outside_the_schema_is_refused_on_load(tmp_path):
    record = {**_record(), "format": modelfile.FORMAT, "format_version": 2}
    record["sites"]["final_norm"]["tau"] = "1.5"
    torch.save(record, tmp_path / "m.pt")
    with pytest.raises(SpikecompileError, match=r"m\.pt: sites\.final_norm\.tau: must be a finite float32 scalar .*"
                                                r"got the str '1\.5'; re-convert the model$"):
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
    torch.save({**_record(), "format": modelfile.FORMAT, "format_version": 2, "evil": _Payload(str(marker))},
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
