"""The lm-eval model and `spikecompile zeroshot` on a device and dtype (devices.py): lm-eval's own `device`
argument and the `dtype` model argument place the rebuilt model; its scores are those of the model placed so;
a device or dtype that cannot run is one line before the model loads. `cuda` tests skip without CUDA."""

import importlib.util
import json

import pytest
import torch
from conftest import convert_tiny
from test_zeroshot import PAIRS, independent_loglikelihood, request, run_cli, write_jsonl

from spikecompile.errors import SpikecompileError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="needs lm-eval: pip install -e '.[eval]' (scripts/install.sh does it)")
cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return convert_tiny(tmp_path_factory.mktemp("zeroshot_devices"))


def _lm(model_path, model_args: str = "", **lm_eval_options):
    """The model as lm-eval builds it: model_args from --model_args, the rest from lm-eval's own options."""
    from spikecompile.zeroshot import SpikecompileLM

    return SpikecompileLM.create_from_arg_string(f"path={model_path}{model_args}", lm_eval_options)


def _check_scores(lm, tolerance: float) -> None:
    """Each request's loglikelihood equals the independent computation on the same placed spiking model."""
    scores = lm.loglikelihood([request("loglikelihood", *pair) for pair in PAIRS], disable_tqdm=True)
    for pair, (value, greedy) in zip(PAIRS, scores, strict=True):
        expected, expected_greedy = independent_loglikelihood(lm, *pair, lm.spiking.logits)
        assert value == pytest.approx(expected, abs=tolerance) and greedy == expected_greedy


@pytest.mark.parametrize("device", [None, "cpu", "auto"])
def test_lm_evals_device_places_the_model_and_the_default_is_the_cpu(model_path, device):
    lm = _lm(model_path, device=device, batch_size=1)
    expected = "cuda" if device == "auto" and torch.cuda.is_available() else "cpu"
    assert lm.device.type == expected and lm.spiking.model.device.type == expected
    assert next(lm.spiking.model.parameters()).dtype == torch.float32


def test_dtype_model_argument_runs_the_model_in_bfloat16(model_path):
    lm = _lm(model_path, ",dtype=bfloat16", device="cpu", batch_size=1)
    assert {parameter.dtype for parameter in lm.spiking.model.parameters()} == {torch.bfloat16}
    assert all(site.neuron.tau.dtype == torch.float32 for site in lm.spiking.sites.values())  # neurons stay fp32
    _check_scores(lm, 1e-3)
    float32 = _lm(model_path, device="cpu", batch_size=1)
    bf16 = [value for value, _ in lm.loglikelihood([request("loglikelihood", *PAIRS[0])], disable_tqdm=True)]
    fp32 = [value for value, _ in float32.loglikelihood([request("loglikelihood", *PAIRS[0])], disable_tqdm=True)]
    assert bf16 != fp32  # it did run in bfloat16


@pytest.mark.parametrize("model_args, options, message", [
    (",dtype=int8", {"device": "cpu"}, "--dtype 'int8': choose one of float32, bfloat16, float16"),
    ("", {"device": "mps"}, "--device 'mps': choose one of cpu, cuda, auto"),
])
def test_a_placement_that_cannot_run_is_one_line_before_loading(model_args, options, message):
    with pytest.raises(SpikecompileError) as raised:
        _lm("nowhere.pt", model_args, **options)  # no such file: the placement is refused first
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_one_line_in_the_lm_and_the_cli(tmp_path, model_path):
    with pytest.raises(SpikecompileError, match="^--device cuda: torch .* sees no CUDA device"):
        _lm(model_path, device="cuda")
    with pytest.warns(UserWarning, match="device cuda:0: torch sees 0 CUDA device"):  # lm_eval's own default
        assert _lm(model_path, device="cuda:0").device.type == "cpu"  # as lm-eval's HFLM falls back
    tasks = write_jsonl(tmp_path / "mc.jsonl", [{"query": "a b", "choices": ["c", "d"], "gold": 0}])
    result = run_cli("zeroshot", model_path, "--task", tasks, "--device", "cuda", "--json", tmp_path / "z.json")
    assert result.exit_code == 2 and result.output.startswith("error: --device cuda:")
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "z.json").exists()


def test_zeroshot_cli_runs_in_bfloat16_and_reports_placement_and_memory(tmp_path, model_path):
    records = [{"query": "the cat", "choices": ["sat", "ran", "flew"], "gold": 0},
               {"query": "a dog", "choices": ["barked", "sang"], "gold": 1}]
    tasks = write_jsonl(tmp_path / "mc.jsonl", records)
    out = tmp_path / "z.json"
    result = run_cli("zeroshot", model_path, "--task", f"mc={tasks}", "--device", "auto", "--dtype", "bfloat16",
                     "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert report["placement"] == {"device": expected, "dtype": "bfloat16"} and report["peak_rss_mb"] > 0
    assert report["results"]["spiking"]["mc"]["n"] == 2


@cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_cuda_the_scores_are_those_of_the_model_on_cuda(model_path, dtype):
    lm = _lm(model_path, f",dtype={dtype}", device="cuda:0", batch_size=4)
    assert lm.device.type == "cuda" and next(lm.spiking.model.parameters()).device.type == "cuda"
    _check_scores(lm, 1e-3 if dtype == "float32" else 5e-2)
    generated = lm.generate_until([request("generate_until", "the cat", {"until": ["."], "max_gen_toks": 4})],
                                  disable_tqdm=True)
    assert len(generated) == 1 and isinstance(generated[0], str)
    cpu = _lm(model_path, f",dtype={dtype}", device="cpu", batch_size=4)
    on_cpu = [value for value, _ in cpu.loglikelihood([request("loglikelihood", *PAIRS[0])], disable_tqdm=True)]
    on_gpu = [value for value, _ in lm.loglikelihood([request("loglikelihood", *PAIRS[0])], disable_tqdm=True)]
    assert on_gpu[0] == pytest.approx(on_cpu[0], abs=1e-2 if dtype == "float32" else 0.5)
