"""`eval` layer by layer (conversion.streamed_eval): its ANN, float-after-prefix and SNN perplexities are bit for bit
those of the whole rebuilt model (load_spiking_model, the eval before the streamed one), on tiny models of each
family saved as sharded safetensors; the CLI reports them with its peak memory; a model.pt that does not match its
source is one line before any weight is read."""

import json

import pytest
import torch
from click.testing import CliRunner
from stream_cases import CASES, convert_arguments, save_case

from spikecompile import modelfile
from spikecompile.cli import cli
from spikecompile.conversion.convert import load_spiking_model
from spikecompile.conversion.streamed_eval import streamed_perplexities
from spikecompile.data import load_text, token_windows
from spikecompile.devices import resolve_placement
from spikecompile.evaluation import perplexity

SEQLEN, WINDOWS = 40, 3

EXTRA = {  # more conversions than stream_cases': the sdllm codings, one with per-token scales
    "llama_sdllm_per_token": ("llama_tied", ("--coding", "sdllm", "-T", "8", "--sdllm-scales", "per-token")),
    "llama_untied_prefix": ("llama_untied_rtn", ("--prefix", "auto", "--weight-bits", "6")),
}


def _convert(case: str, tmp_path) -> tuple:
    """(model.pt, its calibration text, the dtype it was converted in) of a stream case or an EXTRA one."""
    base, more = EXTRA.get(case, (case, ()))
    folder, text = save_case(base, tmp_path)
    output = tmp_path / f"{case}.pt"
    result = CliRunner().invoke(cli, [*convert_arguments(base, folder, text, output), *more])
    assert result.exit_code == 0, result.output
    arguments = [*CASES[base][1], *more]
    dtype = arguments[arguments.index("--dtype") + 1] if "--dtype" in arguments else "float32"
    return output, text, dtype


def _whole_model_perplexities(model_pt, text, placement) -> tuple[float, float, float]:
    """What `eval` computed before it streamed: the whole spiking model rebuilt, three perplexities."""
    spiking = load_spiking_model(str(model_pt), placement=placement)
    windows = token_windows(spiking.tokenizer, text, SEQLEN, WINDOWS, "evaluation")
    ann = perplexity(spiking.ann_logits, windows, progress=False)
    prefixed = perplexity(spiking.prefixed_float_logits, windows, progress=False) if spiking.prefix else ann
    return ann, prefixed, perplexity(spiking.logits, windows, progress=False)


@pytest.mark.parametrize("case", [*CASES, *EXTRA])
def test_streamed_eval_equals_the_whole_model_bit_for_bit(case, tmp_path, one_thread):
    model_pt, text_path, dtype = _convert(case, tmp_path)
    placement = resolve_placement("cpu", dtype)
    text = load_text(str(text_path), split="eval")
    whole = _whole_model_perplexities(model_pt, text, placement)
    streamed = streamed_perplexities(model_pt, modelfile.load(model_pt), text, SEQLEN, WINDOWS,
                                     placement=placement)
    assert (streamed.ann, streamed.prefixed_float, streamed.snn) == whole
    assert streamed.windows == WINDOWS
    assert streamed.snn != streamed.ann  # the sites did run decoded


def test_eval_cli_reports_the_streamed_perplexities_and_its_peak_memory(tmp_path):
    model_pt, text_path, _ = _convert("llama_tied", tmp_path)
    result = CliRunner().invoke(cli, ["eval", str(model_pt), "--ppl", str(text_path), "--seqlen", str(SEQLEN),
                                      "--max-windows", str(WINDOWS), "--no-progress", "--json",
                                      str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    whole = _whole_model_perplexities(model_pt, load_text(str(text_path), split="eval"), resolve_placement())
    assert (figures["ann_ppl"], figures["prefixed_float_ppl"], figures["snn_ppl"]) == whole
    assert figures["windows"] == WINDOWS and figures["peak_rss_mb"] > 0
    assert set(figures["timings_s"]) == {"start", "layers", "head"}  # the bench's depth line needs "layers"
    assert all(seconds > 0 for seconds in [*figures["timings_s"].values(), *figures["layer_s"]])
    assert len(figures["layer_s"]) == 3 and sum(figures["layer_s"]) <= figures["timings_s"]["layers"]
    assert f"ANN {whole[0]:.4f}   SNN {whole[2]:.4f}" in result.output


def test_a_site_table_of_other_layers_is_one_line_before_any_weight_is_read(tmp_path):
    model_pt, text_path, _ = _convert("llama_untied_rtn", tmp_path)  # 2 layers
    record = torch.load(model_pt, weights_only=True)
    record["sites"] = {name.replace("layers.1.", "layers.7."): entry for name, entry in record["sites"].items()}
    damaged = tmp_path / "damaged.pt"
    torch.save(record, damaged)
    result = CliRunner().invoke(cli, ["eval", str(damaged), "--ppl", str(text_path), "--seqlen", str(SEQLEN),
                                      "--no-progress"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(damaged) in lines[0] and "re-convert" in lines[0], result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_eval_on_cuda_equals_the_whole_model_on_cuda(tmp_path, dtype):
    model_pt, text_path, _ = _convert("llama_tied", tmp_path)
    placement = resolve_placement("cuda", dtype)
    text = load_text(str(text_path), split="eval")
    whole = _whole_model_perplexities(model_pt, text, placement)
    streamed = streamed_perplexities(model_pt, modelfile.load(model_pt), text, SEQLEN, WINDOWS,
                                     placement=placement)
    # the same kernels on the same shapes; a tolerance only in case cuBLAS picks another algorithm per call
    assert (streamed.ann, streamed.prefixed_float, streamed.snn) == pytest.approx(whole, rel=1e-5)
