"""Zero-shot evaluation through lm-eval (EleutherAI lm-evaluation-harness 0.4.x, `pip install -e .[eval]`).

Two parts:

* `SpikecompileLM`, an lm-eval model registered as "spikecompile": model_args `path` (model.pt, required),
  `mode` (`spiking`, the default: the spiking model after its KV prefix, `SpikingModel.logits`; `ann`: the
  float model with every site off and no prefix, `SpikingModel.ann_logits`, scored exactly the same way),
  `source` (the source model's path if it moved since conversion), `max_length` and `dtype` (float32, the
  default, bfloat16 or float16: the source weights and the float forward; the neurons stay fp32); `--batch_size`
  and `--device` are lm-eval's own options (`auto` batch = 16; device cpu, the default, cuda, cuda:N or auto:
  CUDA when present, as `spikecompile --device`). lm-eval computes every metric (acc, acc_norm, ...) from what
  `loglikelihood` returns; nothing here re-implements a metric.
* Tasks read from local JSON Lines files of {"query": str, "choices": [str, ...], "gold": int} records (the
  schema of ../shared/data/copa_val.jsonl and openbookqa_test.jsonl): `task_config(name, path)` is an lm-eval
  multiple-choice task config (the text is the query, the choices follow it after one space, as in lm-eval's
  copa and openbookqa; metrics acc and acc_norm), `write_task_yaml` writes it for `lm_eval --tasks FILE.yaml`.
  `validate_jsonl` checks a file first and fails with one line naming the file, the line and the field.

How `lm_eval --model spikecompile` finds the model. lm-eval resolves `--model` in its model registry. The
package declares the entry point `lm_eval.models: spikecompile = spikecompile.zeroshot:SpikecompileLM`, the
plugin mechanism of lm-eval releases after 0.4.13. lm-eval 0.4.13 (the newest release) has no plugin
discovery, so for it the task YAMLs written here name `spikecompile.zeroshot.process_docs` (the per-record
schema check) as their `process_docs` function: lm-eval imports this module, which registers the model, while
it loads the YAML files given to `--tasks` (files or a folder), before it resolves `--model`. With 0.4.13,
give the YAML files (or their folder) to `--tasks`; `--include_path DIR --tasks NAME` loads the YAML only
after the model, so there it needs a release with entry-point discovery. `spikecompile zeroshot` needs none
of this: it passes the model object to `lm_eval.simple_evaluate`.

Requests (as lm-eval's HFLM does them): the context and continuation are encoded as one string and the
continuation's tokens are the tail after the context's tokens (trailing spaces of the context move to the
continuation; lm-eval's `TemplateLM._encode_pair`); the score is the sum of the continuation tokens' log
probabilities and whether each is the greedy argmax. No BOS token is added (the spiking model's KV prefix
stands in for it, as in `spikecompile eval`); an empty context is conditioned on BOS (else EOS). Requests with
the same input tokens share one forward; the others run right-padded in batches of equal-or-shorter inputs
sorted by length (causal attention: padding on the right never changes the scored positions), at most
`batch_size` rows and `TOKEN_BUDGET` tokens per forward. `loglikelihood_rolling` scores disjoint windows of
`max_length` tokens (lm-eval's rolling windows), `generate_until` decodes greedily with a KV cache until a
stop string, EOS or `max_gen_toks`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import warnings
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's own model table; its registry loads it only while empty)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm.auto import tqdm

from .errors import SpikecompileError

MODEL_NAME = "spikecompile"
MODES = ("spiking", "ann")
FIELDS = ("query", "choices", "gold")
DEFAULT_BATCH_SIZE = 16
TOKEN_BUDGET = 4096
"""At most this many (padded) tokens per forward, whatever the batch size: logits are tokens x vocabulary."""
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ---------------------------------------------------------------------------------------------------------
# Task files: {query, choices, gold} JSON Lines
# ---------------------------------------------------------------------------------------------------------

def record_error(record) -> str | None:
    """What is wrong with one record (naming the field), or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object with fields {', '.join(FIELDS)}, got {type(record).__name__}"
    for name in FIELDS:
        if name not in record or record[name] is None:
            return f"missing field '{name}'"
    if not isinstance(record["query"], str):
        return f"field 'query' must be a string, got {type(record['query']).__name__}"
    choices = record["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        return "field 'choices' must be a list of at least 2 strings"
    if not all(choice.strip() for choice in choices):
        return "field 'choices' has an empty choice"
    gold = record["gold"]
    if isinstance(gold, bool) or not isinstance(gold, int):
        return f"field 'gold' must be an integer index into choices, got {json.dumps(gold)}"
    if not 0 <= gold < len(choices):
        return f"field 'gold' is {gold}, out of range for {len(choices)} choices (0..{len(choices) - 1})"
    return None


def validate_jsonl(path: str | Path) -> int:
    """Check every record of a {query, choices, gold} JSON Lines file; return the number of records.

    Blank lines are skipped; anything else fails with one line: the file, the line number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise SpikecompileError(f"{path}: no such task file (JSON Lines of {{query, choices, gold}} records)")
    count = 0
    try:
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SpikecompileError(f"{path}:{number}: invalid JSON ({error.msg}, column {error.colno})") \
                        from None
                problem = record_error(record)
                if problem:
                    raise SpikecompileError(f"{path}:{number}: {problem}")
                count += 1
    except UnicodeDecodeError as error:
        raise SpikecompileError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if count == 0:
        raise SpikecompileError(f"{path}: no records (expected JSON Lines of {{query, choices, gold}} records)")
    return count


def process_docs(dataset):
    """lm-eval `process_docs` of the tasks written here: check each record's schema, return the docs as they are.

    Importing this module (which lm-eval does to find this function) also registers the "spikecompile" model.
    """
    for index, record in enumerate(dataset):
        problem = record_error(dict(record))
        if problem:
            raise SpikecompileError(f"task data, record {index + 1}: {problem}")
    return dataset


def parse_task_spec(spec: str, label: str = "--task") -> tuple[str, Path]:
    """"NAME=FILE.jsonl" or "FILE.jsonl" (the name is then the file's stem) -> (name, path)."""
    name, separator, file = spec.partition("=")
    if not separator:
        name, file = Path(spec).stem, spec
    if not TASK_NAME.match(name):
        raise SpikecompileError(f"{label} {spec}: task name {name!r} must be letters, digits, '_', '-' or '.' "
                                f"(give NAME=FILE.jsonl)")
    return name, Path(file)


def parse_task_specs(specs, label: str = "--task") -> dict[str, Path]:
    """Several task specs -> {name: path}, names unique, every file validated (before any model is loaded)."""
    tasks: dict[str, Path] = {}
    for spec in specs:
        name, path = parse_task_spec(spec, label)
        if name in tasks:
            raise SpikecompileError(f"{label} {spec}: task name {name!r} given twice; use NAME=FILE.jsonl")
        validate_jsonl(path)
        tasks[name] = path
    return tasks


def _task_fields(name: str, path: Path) -> dict:
    return {
        "task": name,
        "dataset_path": "json",  # datasets' packaged JSON builder: local files, no hub access
        "dataset_kwargs": {"data_files": {"test": str(Path(path).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def task_config(name: str, path: str | Path) -> dict:
    """The lm-eval task config (for `simple_evaluate(tasks=[...])`) of a {query, choices, gold} file, validated."""
    if not TASK_NAME.match(name):
        raise SpikecompileError(f"task name {name!r}: use letters, digits, '_', '-' or '.'")
    validate_jsonl(path)
    return {**_task_fields(name, Path(path)), "process_docs": process_docs}


def write_task_yaml(name: str, path: str | Path, folder: str | Path) -> Path:
    """Write FOLDER/NAME.yaml, the task config of a validated {query, choices, gold} file, for `lm_eval --tasks`."""
    from .files import atomic_write

    task_config(name, path)
    fields = _task_fields(name, Path(path))
    lines = [
        "# lm-eval task written by `spikecompile tasks`: multiple choice over {query, choices, gold} records.",
        "# process_docs checks each record; importing spikecompile.zeroshot also registers --model spikecompile.",
        f"task: {json.dumps(fields['task'])}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(fields['dataset_kwargs']['data_files']['test'])}",
        "test_split: test",
        "output_type: multiple_choice",
        "process_docs: !function spikecompile.zeroshot.process_docs",
        "doc_to_text: query",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: " "',
        "metric_list:",
    ]
    for metric in fields["metric_list"]:
        lines += [f"  - metric: {metric['metric']}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", "  version: 1.0", ""]
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SpikecompileError(f"-o {folder}: exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.yaml"

    def write(temp):
        Path(temp).write_text("\n".join(lines), encoding="utf-8")

    atomic_write(target, write)
    return target


# ---------------------------------------------------------------------------------------------------------
# The lm-eval model
# ---------------------------------------------------------------------------------------------------------

def _batch_size(value) -> int:
    """lm-eval's --batch_size: an integer, or auto / auto:N (our default; the CPU has no memory to probe)."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise SpikecompileError(f"batch_size {value!r}: give a positive integer or auto")
    return size


def lm_eval_placement(device: str | None, dtype: str | None):
    """The devices.Placement of lm-eval's `device` and the `dtype` model argument (one-line errors as `--device`
    and `--dtype` give them). None is the CPU, spikecompile's default. cuda:N keeps its index; where torch sees no
    such device it falls back to auto with a warning, as lm-eval's HFLM does: `lm_eval` passes cuda:0 when the
    user names no device. A plain `cuda` without CUDA is refused."""
    from dataclasses import replace

    import torch

    from .devices import resolve_placement

    device = "cpu" if device is None else str(device)
    dtype = "float32" if dtype is None else str(dtype)
    index = re.fullmatch(r"cuda:(\d+)", device)
    if index and int(index[1]) >= torch.cuda.device_count():
        warnings.warn(f"device {device}: torch sees {torch.cuda.device_count()} CUDA device(s); using auto "
                      f"(CUDA when present, else the CPU)", stacklevel=2)
        return resolve_placement("auto", dtype)
    placement = resolve_placement("cuda" if index else device, dtype)
    return replace(placement, device=device) if index else placement


class SpikecompileLM(TemplateLM):
    """A spikecompile model.pt as an lm-eval LM (see the module docstring)."""

    def __init__(self, path: str | None = None, mode: str = "spiking", source: str | None = None,
                 max_length: int | None = None, batch_size=DEFAULT_BATCH_SIZE, max_batch_size=None, device=None,
                 dtype: str = "float32", spiking=None, **unknown):
        # max_batch_size and device come from lm-eval's own options: batches are bounded by batch_size and
        # TOKEN_BUDGET; device places the model (lm_eval_placement).
        super().__init__()
        if unknown:
            raise SpikecompileError(f"--model_args {', '.join(sorted(unknown))}: unknown to the spikecompile model; "
                                    f"it takes path, mode ({'|'.join(MODES)}), source, max_length, dtype")
        if not path:
            raise SpikecompileError("--model_args: give path=model.pt (a model written by spikecompile convert)")
        from .conversion.convert import load_spiking_model

        self.mode = mode  # checked by the setter
        self.batch_size = _batch_size(batch_size)
        self.path = str(path)
        # spiking: an already loaded SpikingModel (Python callers, e.g. with neurons a build pass refitted), which
        # stays where it is
        placement = lm_eval_placement(device, dtype) if spiking is None else None
        self.spiking = spiking if spiking is not None else load_spiking_model(self.path, source_path=source,
                                                                              placement=placement)
        self._device = self.spiking.model.device
        self.tokenizer = self.spiking.tokenizer
        prefix = self.spiking.prefix.length if self.spiking.prefix else 0
        limit = int(self.spiking.model.config.max_position_embeddings) - prefix
        if max_length is not None:
            if not 2 <= int(max_length) <= limit:
                raise SpikecompileError(f"max_length {max_length}: must be in 2..{limit} (positions left after the "
                                        f"{prefix}-token prefix)")
            limit = int(max_length)
        self._max_length = limit

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise SpikecompileError(f"mode {value!r}: choose {' or '.join(MODES)}")
        self._mode = value

    # lm-eval's tokenization hooks ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        record = self.spiking.record
        return {"spikecompile_model": self.path, "spikecompile_mode": self.mode, "coding": record["coding"],
                "source": record["source"], "prefix": (record["prefix"] or {}).get("tokens")}

    # forward passes -----------------------------------------------------------------------------------

    def _logits(self, ids):
        """[B, L] ids -> [B, L, V] logits of the current mode (the spiking model's KV prefix repeated per row)."""
        if self.mode == "ann":
            return self.spiking.ann_logits(ids)
        prefix = self.spiking.prefix
        if ids.shape[0] == 1 or prefix is None:
            return self.spiking.logits(ids)
        cache = copy.deepcopy(prefix.cache)  # as PrefixCache.forward, for B rows
        cache.batch_repeat_interleave(ids.shape[0])
        return self.spiking.model(ids, cache=cache, use_cache=True).logits

    def _batches(self, inputs: list[tuple[int, ...]]):
        """Inputs sorted longest first, cut into batches of at most batch_size rows and TOKEN_BUDGET tokens."""
        batch: list[tuple[int, ...]] = []
        for tokens in inputs:
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * len(batch[0]) > TOKEN_BUDGET):
                yield batch
                batch = []
            batch.append(tokens)
        if batch:
            yield batch

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context tokens, continuation tokens) -> (log p, is greedy)."""
        import torch

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > self.max_length:
                raise SpikecompileError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                                        f"{self.max_length}")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):][:-1]
            groups.setdefault(tuple(tokens), []).append(index)
        inputs = sorted(groups, key=lambda tokens: (-len(tokens), tokens))
        pad = self.eot_token_id if self.eot_token_id is not None else 0
        with tqdm(total=len(requests), desc=f"loglikelihood ({self.mode})", disable=disable_tqdm) as bar, \
                torch.inference_mode():
            for batch in self._batches(inputs):
                ids = torch.full((len(batch), len(batch[0])), pad, dtype=torch.long)
                for row, tokens in enumerate(batch):
                    ids[row, :len(tokens)] = torch.tensor(tokens)
                logits = self._logits(ids.to(self.device))
                for row, tokens in enumerate(batch):
                    members = groups[tokens]
                    longest = max(len(requests[index][2]) for index in members)
                    scores = torch.log_softmax(logits[row, len(tokens) - longest:len(tokens)].float(), dim=-1)
                    greedy = scores.argmax(-1)
                    for index in members:
                        request, _, continuation = requests[index]
                        target = torch.tensor(continuation, device=scores.device)
                        tail = scores[longest - len(continuation):]
                        answer = (float(tail.gather(-1, target[:, None]).sum()),
                                  bool((greedy[longest - len(continuation):] == target).all()))
                        results[index] = answer
                        if request is not None:
                            self.cache_hook.add_partial("loglikelihood", request, answer)
                    bar.update(len(members))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string: disjoint rolling windows of max_length tokens, summed (as HFLM)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for owner, request in enumerate(requests):
            (string,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding of each context until a stop string (`until`, plus EOS) or max_gen_toks tokens."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        outputs = []
        for request in tqdm(requests, desc=f"generate_until ({self.mode})", disable=disable_tqdm):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise SpikecompileError("generate_until: the spikecompile model decodes greedily only "
                                        "(do_sample must be false)")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_new = int(kwargs["max_gen_toks"])
            if not 0 < max_new < self.max_length:
                raise SpikecompileError(f"max_gen_toks {max_new}: must be in 1..{self.max_length - 1}")
            tokens = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            text = postprocess_generated_text(self.tok_decode(self._greedy(tokens, max_new, until)), until, None)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _greedy(self, tokens: list[int], max_new: int, until: list[str]) -> list[int]:
        import torch

        spiking = self.spiking
        ann = self.mode == "ann"
        cache = copy.deepcopy(spiking.prefix.cache) if spiking.prefix and not ann else None
        generated: list[int] = []
        with torch.inference_mode(), (spiking.sites.all_off() if ann else contextlib.nullcontext()):
            output = spiking.model(torch.tensor([tokens], device=self.device), cache=cache, use_cache=True)
            while len(generated) < max_new:
                token = int(output.logits[0, -1].argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop and stop in text for stop in until) or len(generated) == max_new:
                    break
                output = spiking.model(torch.tensor([[token]], device=self.device), cache=output.cache,
                                       use_cache=True)
        return generated


if MODEL_NAME not in model_registry:  # lm-eval with entry-point discovery already holds a placeholder for it
    model_registry.register(MODEL_NAME, target=SpikecompileLM)


# ---------------------------------------------------------------------------------------------------------
# `spikecompile zeroshot`
# ---------------------------------------------------------------------------------------------------------

METRICS = ("acc", "acc_norm")


def zeroshot_eval(model_file: str, tasks: dict[str, Path], modes=("spiking",), limit: int | None = None,
                  batch_size=DEFAULT_BATCH_SIZE, source: str | None = None, device: str = "cpu",
                  dtype: str = "float32") -> dict:
    """Run lm-eval on validated {query, choices, gold} tasks for each mode; one model load for all modes; the
    model on `device` with its weights in `dtype` (lm_eval_placement).

    Returns {"lm_eval": version, "results": {mode: {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}}}.
    """
    lm = SpikecompileLM(path=model_file, mode=modes[0], source=source, batch_size=batch_size, device=device,
                        dtype=dtype)
    return score_tasks(lm, tasks, modes, limit)


def score_tasks(lm: SpikecompileLM, tasks: dict[str, Path], modes=("spiking",), limit: int | None = None) -> dict:
    """zeroshot_eval on a model already wrapped as an lm-eval LM."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise SpikecompileError(f"--limit {limit}: must be at least 1")
    configs = [task_config(name, path) for name, path in tasks.items()]
    manager = TaskManager(include_defaults=False)
    results: dict[str, dict] = {}
    for mode in modes:
        lm.mode = mode
        run = lm_eval.simple_evaluate(model=lm, tasks=copy.deepcopy(configs), limit=limit, task_manager=manager,
                                      log_samples=False)
        results[mode] = {}
        for name in tasks:
            row = run["results"][name]
            entry = {"n": int(run["n-samples"][name]["effective"])}
            for metric in METRICS:
                entry[metric] = float(row[f"{metric},none"])
                stderr = row.get(f"{metric}_stderr,none")
                entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) else math.nan
            results[mode][name] = entry
    record = lm.spiking.record
    return {"lm_eval": lm_eval.__version__, "coding": record["coding"], "budget": record.get("budget"),
            "results": results}
