"""Tiny random models of each family, saved as sharded safetensors (an index and several shards), and the convert
options each is converted with: the cases whose model.pt the streamed conversion must reproduce bit for bit.

tests/data/stream_reference/<host>/<case>.pt were written by the in-memory conversion this streamed one replaced
(spikecompile before the layer-sequential pipeline, c4db4dd^; `python tests/stream_cases.py` wrote them then).

The bits depend on the host's float kernels: torch's own follow its CPU capability, and MKL's GEMMs follow the CPU
(on an AMD EPYC they round otherwise than on the host that wrote the first set, though both run torch 2.13.0). So
each set lies in a folder named for the host kind that wrote it (reference_folder): `avx512`, the first set (its
host ran torch's AVX512 kernels, as CI's capability runs show, which skipped avx512 as the native one; the vendor was
not recorded; there a weight's alignment did not change the bits), and `AuthenticAMD-avx2`, an AVX2-only AMD EPYC,
written with the weights 64-byte aligned as the streamed conversion holds them (the __main__ below). To write a
set for another kind of host, run this file with the in-memory code on it:

    git worktree add /tmp/inmem c4db4dd^
    PYTHONPATH=/tmp/inmem python -P tests/stream_cases.py   # writes into reference_folder(host_kinds()[0])
"""

from pathlib import Path

import torch
from conftest import FAST_CONVERT, build_tiny_llama, build_tiny_tokenizer, random_norms_and_biases, synthetic_text

REFERENCES = Path(__file__).parent / "data" / "stream_reference"


def host_kinds() -> list[str]:
    """This host's kind as a reference folder may name it, the most specific first: "<CPU vendor>-<torch's CPU
    capability>", then the capability alone."""
    from spikecompile.devices import cpu_info

    capability = torch.backends.cpu.get_cpu_capability().lower()
    return [f"{cpu_info('vendor_id') or 'unknown'}-{capability}", capability]


def reference_folder(kinds: list[str] | None = None) -> Path | None:
    """The folder of references written on a host of this kind (None when there is none)."""
    return next((REFERENCES / kind for kind in kinds or host_kinds() if (REFERENCES / kind).is_dir()), None)
SHARD_SIZE = "40KB"
"""Small enough that a tiny model's layers spread over several shards (and a layer over two)."""


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return random_norms_and_biases(Qwen2ForCausalLM(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return random_norms_and_biases(MistralForCausalLM(MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        sliding_window=None)))


CASES = {
    # name: (model builder, convert options after FAST_CONVERT and -T 6 -n 2)
    "llama_tied": (lambda: build_tiny_llama(num_hidden_layers=3), ()),
    "llama_untied_rtn": (lambda: build_tiny_llama(num_key_value_heads=4, tie_word_embeddings=False),
                         ("--weight-bits", "4", "--prefix", "none")),
    "llama_norotate_las": (lambda: build_tiny_llama(seed=3), ("--rotate", "none", "--coding", "las")),
    "qwen2_bf16": (_qwen2, ("--dtype", "bfloat16")),
    "mistral": (_mistral, ("--seed", "5")),
}


def save_case(name: str, root: Path) -> tuple[Path, Path]:
    """The case's model folder (sharded safetensors + tokenizer) and calibration text under root."""
    folder, text = root / name, root / "calib.txt"
    if not (folder / "config.json").exists():
        CASES[name][0]().save_pretrained(folder, max_shard_size=SHARD_SIZE)
        build_tiny_tokenizer().save_pretrained(folder)
    if not text.exists():
        text.write_text(synthetic_text())
    return folder, text


def convert_stopped_after_layer_0(folder: Path, text: Path, output: Path) -> None:
    """A case's conversion with convert_arguments' options, interrupted (as by SIGTERM) once layer 0 is
    checkpointed: OUTPUT.checkpoint is left for --resume."""
    import signal

    from spikecompile.conversion.convert import ConvertOptions, convert
    from spikecompile.errors import Interrupted

    def stop(index):
        if index == 0:
            raise Interrupted(signal.SIGTERM)

    options = ConvertOptions(timesteps=6, grains=2, calib=str(text), calib_windows=2, calib_seqlen=64,
                             samples_per_site=512)
    try:
        convert(str(folder), str(output), options, progress=False, on_layer=stop)
    except Interrupted:
        return
    raise AssertionError("the conversion ran to its end: it was to stop after layer 0")


def convert_arguments(name: str, folder: Path, text: Path, output: Path) -> list[str]:
    return ["convert", str(folder), "-o", str(output), "-T", "6", "-n", "2", "--calib", str(text), *FAST_CONVERT,
            *CASES[name][1]]


if __name__ == "__main__":  # write the references (with the conversion of the time)
    import os
    import sys
    import tempfile

    from click.testing import CliRunner

    from spikecompile.cli import cli

    from transformers import AutoModelForCausalLM

    # The streamed conversion aligns every weight it reads (loading.aligned); from_pretrained leaves them in the
    # file's buffer, wherever the safetensors header ends. Where a kernel rounds by alignment (AMD EPYC's one-token
    # linears) that alone changes the bits, so the references are written with aligned weights too.
    from_pretrained = AutoModelForCausalLM.from_pretrained

    def aligned_from_pretrained(cls, *args, **kwargs):
        model = from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.data_ptr() % 64:
                    parameter.data = parameter.data.clone()
        return model

    AutoModelForCausalLM.from_pretrained = classmethod(aligned_from_pretrained)
    os.environ["SOURCE_DATE_EPOCH"] = "0"
    folder = REFERENCES / host_kinds()[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        for case in CASES:
            model, text = save_case(case, Path(scratch))
            shards = sorted(path.name for path in model.glob("*.safetensors"))
            result = CliRunner().invoke(cli, convert_arguments(case, model, text, folder / f"{case}.pt"))
            print(case, result.exit_code, len(shards), "shards", result.output.strip()[-200:], file=sys.stderr)
