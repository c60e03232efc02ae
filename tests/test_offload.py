"""--part-memory (issue 15): a part larger than the device may hold runs through accelerate's big-model machinery
(infer_auto_device_map, dispatch_model). On this CPU the overflow tier is disk; on CUDA it is CPU memory, then
disk: the same code with another max_memory. The forward is the same operations on the same device, so
conversion and evaluation give the same bits as without the limit."""

import gc
import json
import tempfile
from pathlib import Path

import accelerate
import pytest
import torch
from click.testing import CliRunner
from conftest import FAST_CONVERT, convert_tiny, save_tiny_llama, synthetic_text

from spikecompile.cli import cli
from spikecompile.conversion.convert import converted_layer
from spikecompile.conversion.stream import LayerStream
from spikecompile.devices import Placement, part_memory_bytes
from spikecompile.errors import SpikecompileError
from spikecompile.loading import open_layered, resolve_source


@pytest.fixture
def dispatches(monkeypatch):
    """The part sizes accelerate's dispatch_model was given, in order (the real function runs)."""
    given = []
    real = accelerate.dispatch_model

    def dispatch_and_note(module, device_map, **kwargs):
        given.append(sorted(set(device_map.values())))
        return real(module, device_map, **kwargs)

    monkeypatch.setattr(accelerate, "dispatch_model", dispatch_and_note)
    return given


def test_a_layer_over_the_limit_runs_from_disk_with_the_same_bits(tmp_path, dispatches):
    save_tiny_llama(tmp_path / "tiny")
    with open_layered(resolve_source(str(tmp_path / "tiny")), progress=False) as layered:
        whole = LayerStream(layered, Placement())
        layer, _ = converted_layer(whole, 1, None, None)  # no limit: as built, on the device
        assert dispatches == [] and all(weight.device.type == "cpu" for weight in layer.parameters())
        size = sum(tensor.nbytes for tensor in layer.state_dict().values())
        limited = LayerStream(layered, Placement(), part_memory=size // 3)
        offloaded, _ = converted_layer(limited, 1, None, None)
        assert dispatches == [["cpu", "disk"]]  # some submodules fit in CPU memory, the rest wait on disk
        on_disk = [name for name, weight in offloaded.named_parameters() if weight.device.type == "meta"]
        assert on_disk and len(on_disk) < len(list(offloaded.parameters()))
        hidden = torch.randn(1, 12, whole.config.hidden_size, generator=torch.Generator().manual_seed(0))
        ids = torch.zeros(1, 12, dtype=torch.int64)
        expected, got = whole.start(ids, hidden), limited.start(ids, hidden)
        whole.run(layer, expected)
        limited.run(offloaded, got)
        assert torch.equal(got.hidden, expected.hidden)
        # brought in for the forward, out again after it
        assert all(weight.device.type == "meta" for name, weight in offloaded.named_parameters() if name in on_disk)


def test_convert_and_eval_with_a_part_limit_give_the_same_model_and_perplexities(tmp_path, dispatches, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # model.pt records when it was made
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the offloaded weights go
    plain = convert_tiny(tmp_path, "plain")
    limited = convert_tiny(tmp_path, "limited", "--part-memory", "4KB")
    assert plain.read_bytes() == limited.read_bytes()
    assert dispatches and ["disk"] in dispatches  # every part was over 4 kB: the embedding and layers on disk
    figures = {}
    for name, extra in (("plain", ()), ("limited", ("--part-memory", "4KB"))):
        result = CliRunner().invoke(cli, ["eval", str(plain), "--ppl", str(tmp_path / "calib.txt"), "--seqlen", "64",
                                          "--max-windows", "2", "--no-progress", "--json", str(tmp_path / f"{name}.json"),
                                          *extra])
        assert result.exit_code == 0, result.output
        figures[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("ann_ppl", "prefixed_float_ppl", "snn_ppl"):
        assert figures["limited"][key] == figures["plain"][key]
    gc.collect()
    assert not list(scratch.glob("spikecompile-offload-*"))  # each part's folder goes with it


@pytest.mark.parametrize("size", ["lots", "0", "-4GiB", ""])
def test_a_bad_part_memory_is_one_line_naming_the_option(size):
    with pytest.raises(SpikecompileError, match="^--part-memory .*4GiB"):
        part_memory_bytes(size)


def test_part_memory_sizes():
    assert part_memory_bytes(None) is None
    assert part_memory_bytes("4GiB") == 4 * 2**30 and part_memory_bytes("500MB") == 500 * 10**6
    assert part_memory_bytes("2048") == 2048


def test_part_memory_with_a_budget_is_refused_before_any_weight_is_read(tmp_path):
    save_tiny_llama(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(synthetic_text())
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "tiny"), "-o", str(tmp_path / "m.pt"), "--calib",
                                      str(tmp_path / "calib.txt"), "--spikes-per-mac", "2", "--part-memory", "1GiB",
                                      *FAST_CONVERT])
    assert result.exit_code != 0 and "--part-memory with --spikes-per-mac" in result.output
    assert not Path(tmp_path / "m.pt").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_on_cuda_a_layer_over_the_limit_waits_in_cpu_memory_with_the_same_bits(tmp_path, dispatches):
    save_tiny_llama(tmp_path / "tiny")
    with open_layered(resolve_source(str(tmp_path / "tiny")), progress=False) as layered:
        placement = Placement("cuda", "float32")
        whole = LayerStream(layered, placement)
        layer, _ = converted_layer(whole, 1, None, None)
        size = sum(tensor.nbytes for tensor in layer.state_dict().values())
        limited = LayerStream(layered, placement, part_memory=size // 3)
        offloaded, _ = converted_layer(limited, 1, None, None)
        assert dispatches and "cpu" in dispatches[0]  # what does not fit the GPU waits in CPU memory
        hidden = torch.randn(1, 12, whole.config.hidden_size, generator=torch.Generator().manual_seed(0))
        ids = torch.zeros(1, 12, dtype=torch.int64, device="cuda")
        expected, got = whole.start(ids, hidden), limited.start(ids, hidden)
        whole.run(layer, expected)
        limited.run(offloaded, got)
        assert got.hidden.device.type == "cuda" and torch.equal(got.hidden, expected.hidden)
