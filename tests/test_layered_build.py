"""The build reads the source one part at a time (conversion.layered): bit for bit the whole model's build for
every conversion variant; with no memory to spare, one part at a time, each read once per stage, and every written
tensor in a scratch folder that goes with the store."""

import pytest
import torch
from conftest import assert_layered_build_is_whole_model_build, convert_tiny

from spikecompile.build import BuildOptions, build, check_model, source_placement
from spikecompile.conversion.convert import recorded_source
from spikecompile.conversion.layered import open_converted

VARIANTS = {
    "rotated, KV prefix": (),
    "no rotation (tied head)": ("--rotate", "none"),
    "RTN 4-bit weights (rotations applied)": ("--weight-bits", "4"),
    "bf16": ("--dtype", "bfloat16"),
    "signed digits": ("--coding", "phase-sd"),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    return {name: convert_tiny(root, f"model{index}", *options) for index, (name, options) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_layered_build_is_the_whole_model_build(converted, variant):
    built = build(converted[variant], BuildOptions())
    assert_layered_build_is_whole_model_build(converted[variant], built)
    assert dict(built.store.parts_built) == {0: 1, 1: 1, "embedding": 1, "head": 1}  # a small model's parts stay


def _opened(path, memory_bytes):
    record = check_model(path, BuildOptions())
    return open_converted(path, record, recorded_source(record, path), source_placement(record), memory_bytes)


def test_written_tensors_spill_to_the_scratch_folder_which_close_removes(converted):
    path = converted["rotated, KV prefix"]
    spiking, store = _opened(path, memory_bytes=0)
    scratch = store.scratch
    weight = store["model.layers.1.mlp.down_proj.weight"]
    store["folded.down"] = weight * 2
    del store["model.layers.1.mlp.down_proj.weight"]
    assert len(list(scratch.iterdir())) == 1  # on disk, not in memory
    assert torch.equal(store["folded.down"], weight * 2)
    assert "model.layers.1.mlp.down_proj.weight" not in store and "folded.down" in store
    with pytest.raises(KeyError):
        store["model.layers.1.mlp.down_proj.weight"]
    store["folded.down"] = weight  # replaced: the earlier file goes
    assert len(list(scratch.iterdir())) == 1 and torch.equal(store["folded.down"], weight)
    assert set(store) == set(spiking.model.state_dict()) - {"model.layers.1.mlp.down_proj.weight"} | {"folded.down"}
    store.close()
    assert not scratch.exists()


def test_a_build_with_no_memory_to_spare_holds_one_part_and_spills_every_weight(converted, monkeypatch):
    import spikecompile.conversion.layered as layered

    path = converted["rotated, KV prefix"]
    monkeypatch.setattr(layered, "MEMORY_BYTES", 0)
    built = build(path, BuildOptions())
    # the prefix pass and the passes each read every part once
    assert dict(built.store.parts_built) == {0: 2, 1: 2, "embedding": 2, "head": 2}
    assert len(built.store._parts) == 1
    assert_layered_build_is_whole_model_build(path, built)
    written = [key for key in built.store if key.startswith(("folded.", "prefix."))]  # weights, prefix caches
    assert written and len(list(built.store.scratch.iterdir())) == len(written)


def test_the_simulator_builds_each_part_once_for_all_windows(converted, monkeypatch):
    """build --target sim of a model that does not fit the store's memory (here: none to spare) goes through the
    windows layer by layer: a part the simulator reads from the source is built once for all of them, not once
    per window. The counts and perplexity are those of simulating each window alone."""
    import spikecompile.conversion.layered as layered
    from spikecompile.backends.sim import simulate
    from spikecompile.backends.sim.measure import mean_run, measure
    from spikecompile.evaluation import perplexity_of, window_nll

    monkeypatch.setattr(layered, "MEMORY_BYTES", 0)
    built = build(converted["rotated, KV prefix"], BuildOptions())
    windows = [torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    built.store.parts_built.clear()
    run, ppl = measure(built.graph, built.store, windows, "decoded", progress=False)
    assert dict(built.store.parts_built) == {0: 1, 1: 1, "head": 1}  # the embedding's table: a written tensor
    alone = [simulate(built.graph, built.store, ids, "decoded") for ids in windows]
    assert built.store.parts_built[0] == 1 + len(windows)  # window by window: each part again for each window
    assert ppl == perplexity_of([window_nll(result.logits, ids) for result, ids in zip(alone, windows)], windows)
    assert run == mean_run(alone)
