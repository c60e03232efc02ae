"""Zero-shot evaluation through lm-eval: the "spikecompile" lm-eval model (loglikelihood, rolling, greedy
generation) against independent computations from SpikingModel.logits / ann_logits, acc and acc_norm as lm-eval
computes them, task files in the {query, choices, gold} schema, `spikecompile zeroshot` / `tasks`, and the
`lm_eval` console command, all on a tiny converted model and synthetic JSON Lines files."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import convert_tiny, synthetic_text

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                reason="needs lm-eval: pip install -e '.[eval]' (scripts/install.sh does it)")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_cli(*args):
    from spikecompile.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def words(count, seed):
    vocabulary = synthetic_text(words=400, seed=3).split()
    rng = random.Random(seed)
    return " ".join(rng.choice(vocabulary) for _ in range(count))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zeroshot")


@pytest.fixture(scope="module")
def model_path(root):
    return convert_tiny(root)


@pytest.fixture(scope="module")
def mc_file(root):
    """12 synthetic multiple-choice records (2 to 4 choices) in the {query, choices, gold} schema."""
    rng = random.Random(1)
    records = []
    for index in range(12):
        n = rng.choice([2, 3, 4])
        records.append({"query": words(rng.randint(3, 9), seed=100 + index),
                        "choices": [words(rng.randint(1, 3), seed=1000 + 10 * index + k) for k in range(n)],
                        "gold": rng.randrange(n)})
    return write_jsonl(root / "mc.jsonl", records)


@pytest.fixture(scope="module")
def lm(model_path):
    from spikecompile.zeroshot import SpikecompileLM

    return SpikecompileLM(path=str(model_path), batch_size=4)


def request(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def independent_loglikelihood(lm, context, continuation, forward):
    """lm-eval's definition, computed directly: trailing spaces of the context move to the continuation; the
    continuation's tokens are the tail of the whole string's after the context's; an empty context is BOS."""
    tokenizer = lm.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if context == "":
        context_ids, continuation_ids = [tokenizer.bos_token_id], encode(continuation)
    else:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context_ids = encode(stripped)
        continuation_ids = encode(stripped + continuation)[len(context_ids):]
    ids = context_ids + continuation_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(forward(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    positions = range(len(context_ids) - 1, len(ids) - 1)
    total = sum(float(logprobs[p, ids[p + 1]]) for p in positions)
    greedy = all(int(logprobs[p].argmax()) == ids[p + 1] for p in positions)
    return total, greedy


PAIRS = [(words(6, 1), " " + words(2, 2)), (words(3, 3), " " + words(1, 4)), (words(9, 5) + " ", words(3, 6)),
         ("", words(4, 7)), (words(5, 8), " " + words(4, 9)), (words(5, 8), " " + words(1, 10))]


@pytest.mark.parametrize("mode", ["spiking", "ann"])
def test_loglikelihood_equals_an_independent_computation(lm, mode):
    lm.mode = mode
    forward = lm.spiking.logits if mode == "spiking" else lm.spiking.ann_logits
    try:
        batched = lm.loglikelihood([request("loglikelihood", *pair) for pair in PAIRS], disable_tqdm=True)
        lm.batch_size = 1
        single = lm.loglikelihood([request("loglikelihood", *pair) for pair in PAIRS], disable_tqdm=True)
    finally:
        lm.batch_size, lm.mode = 4, "spiking"
    for pair, one, alone in zip(PAIRS, batched, single, strict=True):
        expected, greedy = independent_loglikelihood(lm, *pair, forward)
        assert one[0] == pytest.approx(expected, abs=1e-4) and alone[0] == pytest.approx(expected, abs=1e-4)
        assert one[1] == alone[1] == greedy
        assert expected < 0


def test_spiking_and_ann_modes_differ(lm):
    pairs = [request("loglikelihood", *pair) for pair in PAIRS]
    spiking = [value for value, _ in lm.loglikelihood(pairs, disable_tqdm=True)]
    lm.mode = "ann"
    try:
        ann = [value for value, _ in lm.loglikelihood(pairs, disable_tqdm=True)]
    finally:
        lm.mode = "spiking"
    assert max(abs(a - b) for a, b in zip(spiking, ann, strict=True)) > 1e-3


def test_loglikelihood_rolling_sums_lm_evals_disjoint_windows(lm, model_path):
    from spikecompile.zeroshot import SpikecompileLM

    text = words(40, 11)
    tokens = lm.tok_encode(text)
    bos = lm.tokenizer.bos_token_id
    with torch.inference_mode():
        logprobs = torch.log_softmax(lm.spiking.logits(torch.tensor([[bos] + tokens[:-1]]))[0].double(), -1)
    whole = sum(float(logprobs[j, token]) for j, token in enumerate(tokens))
    assert lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)[0] == \
        pytest.approx(whole, abs=1e-4)

    # Windows of m = 16 tokens: the first predicts tokens 0..15 after BOS; each later one predicts up to m more,
    # with the m tokens before its last prediction as input.
    m = 16
    short = SpikecompileLM(path=str(model_path), max_length=m)
    expected, predicted = 0.0, 0
    while predicted < len(tokens):
        end = min(len(tokens), predicted + m)
        window = [bos] + tokens[:m - 1] if predicted == 0 else tokens[end - m - 1:end - 1]
        start = 0 if predicted == 0 else end - m - 1
        with torch.inference_mode():
            logprobs = torch.log_softmax(short.spiking.logits(torch.tensor([window]))[0].double(), -1)
        for j in range(predicted, end):
            position = j if predicted == 0 else j - start - 1
            expected += float(logprobs[position, tokens[j]])
        predicted = end
    assert len(tokens) > 2 * m
    got = short.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)[0]
    assert got == pytest.approx(expected, abs=1e-4)
    assert got != pytest.approx(whole, abs=1e-3)  # the windows really cut the context


def test_generate_until_is_greedy_and_stops_on_until(lm):
    context = words(8, 12)
    ids = lm.tok_encode(context)
    generated = []
    with torch.inference_mode():
        for _ in range(6):  # greedy without a KV cache: the whole sequence each step
            generated.append(int(lm.spiking.logits(torch.tensor([ids + generated]))[0, -1].argmax()))
    text = lm.tokenizer.decode(generated, skip_special_tokens=True)
    out = lm.generate_until([request("generate_until", context, {"until": [], "max_gen_toks": 6})],
                            disable_tqdm=True)
    assert out == [text]
    stop = text.split()[1]
    cut = lm.generate_until([request("generate_until", context, {"until": [" " + stop], "max_gen_toks": 6})],
                            disable_tqdm=True)
    assert cut == [text.split(" " + stop)[0]]
    from spikecompile.errors import SpikecompileError

    with pytest.raises(SpikecompileError, match="greedily"):
        lm.generate_until([request("generate_until", context, {"do_sample": True, "temperature": 1.0})],
                          disable_tqdm=True)


def test_lm_eval_acc_and_acc_norm_equal_argmax_of_our_loglikelihoods(lm, mc_file):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from spikecompile.zeroshot import task_config

    lm.batch_size = 1  # every request alone: the same numbers whichever requests lm-eval batches together
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=[task_config("mc", mc_file)], log_samples=False,
                                          task_manager=TaskManager(include_defaults=False))["results"]["mc"]
        records = [json.loads(line) for line in mc_file.read_text().splitlines()]
        hits, hits_norm = [], []
        for record in records:
            scores = [value for value, _ in lm.loglikelihood(
                [request("loglikelihood", record["query"], " " + choice) for choice in record["choices"]],
                disable_tqdm=True)]
            # lm-eval's acc_norm: argmax of loglikelihood / character length of the choice (without the delimiter)
            normalised = [score / len(choice) for score, choice in zip(scores, record["choices"], strict=True)]
            hits.append(max(range(len(scores)), key=scores.__getitem__) == record["gold"])
            hits_norm.append(max(range(len(scores)), key=normalised.__getitem__) == record["gold"])
    finally:
        lm.batch_size = 4
    n = len(records)
    acc, acc_norm = sum(hits) / n, sum(hits_norm) / n
    assert results["acc,none"] == pytest.approx(acc) and results["acc_norm,none"] == pytest.approx(acc_norm)
    assert acc != acc_norm  # the file tells the two metrics apart
    assert results["acc_stderr,none"] == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))


def test_tasks_command_writes_yaml_that_lm_eval_loads(root, mc_file, lm):
    from lm_eval.tasks._yaml_loader import load_yaml

    from spikecompile.zeroshot import process_docs

    result = run_cli("tasks", f"multi={mc_file}", mc_file, "-o", root / "tasks")
    assert result.exit_code == 0, result.output
    config = load_yaml(root / "tasks" / "multi.yaml", resolve_func=True)
    assert config["process_docs"] is process_docs
    assert config["dataset_kwargs"]["data_files"]["test"] == str(mc_file.resolve())
    assert {key: config[key] for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target",
                                         "target_delimiter")} == {
        "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
        "doc_to_target": "gold", "target_delimiter": " "}
    assert (root / "tasks" / "mc.yaml").is_file() and "--tasks" in result.output


BAD_RECORDS = [
    ({"choices": ["a", "b"], "gold": 0}, "missing field 'query'"),
    ({"query": "q", "gold": 0}, "missing field 'choices'"),
    ({"query": "q", "choices": ["a", "b"]}, "missing field 'gold'"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "field 'gold' is 2, out of range for 2 choices"),
    ({"query": "q", "choices": ["a", "b"], "gold": -1}, "field 'gold' is -1, out of range"),
    ({"query": "q", "choices": ["a", "b"], "gold": "0"}, "field 'gold' must be an integer"),
    ({"query": "q", "choices": ["a", "b"], "gold": True}, "field 'gold' must be an integer"),
    ({"query": "q", "choices": "a b", "gold": 0}, "field 'choices' must be a list of at least 2 strings"),
    ({"query": "q", "choices": ["a"], "gold": 0}, "field 'choices' must be a list of at least 2 strings"),
    ({"query": "q", "choices": ["a", 3], "gold": 0}, "field 'choices' must be a list of at least 2 strings"),
    ({"query": 5, "choices": ["a", "b"], "gold": 0}, "field 'query' must be a string"),
    (["q", ["a", "b"], 0], "expected a JSON object"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS, ids=[message for _, message in BAD_RECORDS])
def test_schema_errors_name_the_file_line_and_field(tmp_path, record, message):
    from spikecompile.errors import SpikecompileError
    from spikecompile.zeroshot import process_docs, validate_jsonl

    good = {"query": "q", "choices": ["a", "b"], "gold": 1}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(SpikecompileError) as error:
        validate_jsonl(path)
    assert str(error.value).startswith(f"{path}:3: ") and message in str(error.value)
    assert "\n" not in str(error.value)
    if isinstance(record, dict):
        with pytest.raises(SpikecompileError, match="record 2: " + message.split(" ")[0]):
            process_docs([good, record])


def test_cli_errors_are_one_line(tmp_path, model_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"query": "q", "choices": ["a", "b"]\n')
    result = run_cli("zeroshot", model_path, "--task", f"copa={bad}")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert result.output.startswith(f"error: {bad}:2: invalid JSON")
    for args, expected in [(["--task", f"copa={tmp_path / 'missing.jsonl'}"], "no such task file"),
                           (["--task", f"bad name={bad}"], "task name 'bad name'"),
                           (["--task", f"copa={bad}", "--limit", "0"], "--limit 0")]:
        result = run_cli("zeroshot", model_path, *args)
        assert result.exit_code == 2 and expected in result.output and result.output.strip().count("\n") == 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = run_cli("tasks", empty, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "no records" in result.output


def test_model_args_are_checked_before_loading():
    from spikecompile.errors import SpikecompileError
    from spikecompile.zeroshot import SpikecompileLM

    with pytest.raises(SpikecompileError, match="temperature: unknown"):
        SpikecompileLM.create_from_arg_string("path=nowhere.pt,temperature=0")
    with pytest.raises(SpikecompileError, match="mode 'float'"):
        SpikecompileLM.create_from_arg_string("path=nowhere.pt,mode=float")
    with pytest.raises(SpikecompileError, match="give path=model.pt"):
        SpikecompileLM.create_from_arg_string("")


def test_the_model_is_registered_under_spikecompile():
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    from spikecompile.zeroshot import SpikecompileLM

    assert get_model("spikecompile") is SpikecompileLM
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still there
    declared = {point.name: point.value for point in entry_points(group="lm_eval.models")}
    assert declared.get("spikecompile") == "spikecompile.zeroshot:SpikecompileLM"


def test_spikecompile_zeroshot_end_to_end(tmp_path, model_path, mc_file):
    out = tmp_path / "zeroshot.json"
    result = run_cli("zeroshot", model_path, "--task", f"mc={mc_file}", "--task", mc_file.with_name("mc.jsonl"),
                     "--mode", "both", "--limit", "5", "--json", out)
    assert result.exit_code == 2 and "given twice" in result.output  # mc=... and mc.jsonl have the same name
    result = run_cli("zeroshot", model_path, "--task", f"mc={mc_file}", "--mode", "both", "--limit", "5",
                     "--batch-size", "3", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"spiking", "ann"}
    for mode in ("spiking", "ann"):
        row = report["results"][mode]["mc"]
        assert row["n"] == 5 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
        line = next(line for line in result.output.splitlines() if line.split()[:2] == ["mc", mode])
        assert f"{row['acc']:.4f} ± {row['acc_stderr']:.4f}" in line
    assert report["tasks"]["mc"]["file"] == str(mc_file) and len(report["tasks"]["mc"]["sha256"]) == 64


def test_lm_eval_console_command(root, model_path, mc_file):
    """The literal `lm_eval --model spikecompile ...` in a subprocess, on a task YAML from `spikecompile tasks`."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    if not lm_eval.exists():
        pytest.skip(f"no lm_eval console script beside {sys.executable}")
    result = run_cli("tasks", mc_file, "-o", root / "console-tasks")
    assert result.exit_code == 0, result.output
    command = [str(lm_eval), "--model", "spikecompile", "--model_args", f"path={model_path},mode=ann",
               "--tasks", str(root / "console-tasks" / "mc.yaml"), "--limit", "6", "--batch_size", "auto"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("|")]
    values = {cells[5].strip(): float(cells[7]) for cells in (row.split("|") for row in rows[2:])}
    assert set(values) == {"acc", "acc_norm"}

    import lm_eval as harness
    from lm_eval.tasks import TaskManager

    from spikecompile.zeroshot import SpikecompileLM, task_config

    local = SpikecompileLM(path=str(model_path), mode="ann")
    expected = harness.simple_evaluate(model=local, tasks=[task_config("mc", mc_file)], limit=6, log_samples=False,
                                       task_manager=TaskManager(include_defaults=False))["results"]["mc"]
    assert values["acc"] == pytest.approx(expected["acc,none"], abs=1e-4)
    assert values["acc_norm"] == pytest.approx(expected["acc_norm,none"], abs=1e-4)


@pytest.mark.shared_data
def test_shared_task_files_follow_the_schema():
    from spikecompile.zeroshot import validate_jsonl

    files = {"copa_val.jsonl": 100, "openbookqa_test.jsonl": 500}
    missing = [name for name in files if not (SHARED / name).is_file()]
    if missing:
        pytest.skip(f"../shared/data lacks {', '.join(missing)}")
    for name, count in files.items():
        assert validate_jsonl(SHARED / name) == count
