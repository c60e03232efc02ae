"""Scale benchmark (issue 15): the streamed `convert` of a LLaMA-2-7B-shaped model with few decoder layers.

The bench writes the model itself: hidden 4096, intermediate 11008, 32 heads (no GQA), vocab 32000, random bf16
weights (std 0.02, norms near 1), as sharded safetensors with an index (one shard per decoder layer, one for the
embedding, final norm and lm_head) and a small BPE tokenizer trained on the builtin text. It then runs the CLI,
`convert -T 8 --calib-windows 4 --calib-seqlen 512 --dtype bfloat16`, in its own process at each depth and reports
its peak RSS (the --json report's: the process's VmHWM), wall time, seconds per calibrated layer, the ratio of the two
depths' times (the whole process, and the per-layer loops of the prefix scan and the calibration alone, without
the fixed costs: process start, imports, hashing, the embedding and lm_head), and the time extrapolated to 32
layers (a line through the two depths: fixed + per layer × 32).
With --baseline DIR (a checkout of an earlier spikecompile, e.g. a git worktree) each depth is also converted by
that version, right after this one on the same files, and the two times are compared side by side.
Writes bench/results/scale.json.

    python bench/scale.py [--depths 4 8] [--shape llama2-7b|llama3-8b] [--workdir DIR] [--keep] [--baseline DIR]
                          [--dtype bfloat16|float32] [--repeats R] [--device cpu|cuda] [--results FILE] [--later]
                          [--eval]

--shape llama3-8b writes bench/results/scale_llama3_8b.json instead. --dtype float32 (convert's --dtype: the
weights on disk stay bf16) appends _float32 to the file name: for a CPU whose bf16 matrix products are emulated
(AVX2 without AVX512-BF16/AMX, where they run several times slower than float32). --repeats R converts the two depths
alternately R times (4, 8, 4, 8, ...) and keeps each depth's fastest run: this machine's speed drifts by tens of
percent over minutes, and alternating puts both depths through the same drift.

--eval also runs `eval` on each depth's model.pt after its timed conversions (`--max-windows 4 --seqlen 512` of the
builtin text, the conversion's --dtype and --device: the ANN, the float model with the prefix and the SNN, one
decoder layer at a time) and reports its wall time, peak RSS and depth ratio beside the conversion's (`eval` in
each run and in the summary), the depth ratio of its layer loop alone, and its fixed lm_head cost (the logits of
the three passes: vocab × hidden multiply-adds per token each, 3.2e12 for LLaMA-3's 128256 × 4096 over 4 × 512
tokens) in seconds and in layers of the loop. The weights are random, so its perplexities only show that the run is
finite.

Every run scans for its prefix (SPIKECOMPILE_CACHE=off), as a first conversion of a model does. With --later the
runs cache their prefix selection (a fresh cache folder for each run), and each depth is converted once more
reading it, as a later conversion of the same model at another T, coding or budget does; its time is reported
beside the first's (`later` in each run and in the summary).

--device cuda runs convert with --device cuda and appends _cuda to the file name. The report then also holds each
run's peak GPU memory (convert's --json: torch's peak allocation) and the issue's GPU targets: the deepest run
within 180 s (the issue's full 32 layers: `--depths 8 32`), and a peak GPU memory within one decoder layer's weights
plus the activations plus 4 GiB (`gpu_memory_budget_mb`, how it is counted: gpu_memory_budget). bench/device_check.sh
runs it on a lent GPU machine. --results FILE writes the report there instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.json"
SHAPES = {
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                  "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
                  "rms_norm_eps": 1e-5},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                  "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
}
"""LLaMA-2-7B's and LLaMA-3.1-8B's shapes (GQA with 8 KV heads, a 128256 vocabulary, llama3 RoPE scaling); the depth of
both is 32."""
RESULTS_OF = {"llama2-7b": RESULTS, "llama3-8b": ROOT / "bench" / "results" / "scale_llama3_8b.json"}
WINDOWS, SEQLEN = 4, 512  # the calibration windows and their length
CONVERT = ("-T", "8", "--calib-windows", str(WINDOWS), "--calib-seqlen", str(SEQLEN), "--no-progress")
"""convert's options, and --dtype (bench option, default bfloat16)"""


def _random(shape, generator, std=0.02, mean=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std + mean).to(torch.bfloat16)


def write_model(folder: Path, layers: int, seed: int = 0, shape: str = "llama2-7b") -> None:
    """config.json, one bf16 safetensors shard per decoder layer plus one for the rest, the index, a tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = SHAPES[shape]
    LlamaConfig(**config, num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                dtype="bfloat16").save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    weight_map = {}
    shards = layers + 1

    def save(index: int, tensors: dict) -> None:
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
                  "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
                  "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
        tensors = {f"{prefix}{name}.weight": _random(shape, generator) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{prefix}{norm}.weight"] = _random((hidden,), generator, std=0.1, mean=1.0)
        save(layer, tensors)
    save(layers, {"model.embed_tokens.weight": _random((vocab, hidden), generator),
                  "model.norm.weight": _random((hidden,), generator, std=0.1, mean=1.0),
                  "lm_head.weight": _random((vocab, hidden), generator)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _tokenizer().save_pretrained(folder)


def _tokenizer():
    """A 4000-token BPE trained on the builtin text (token ids stay below the model's vocab)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from spikecompile.data import load_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([load_text("builtin", "calib").text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def spikecompile_of(code: Path) -> tuple[list[str], dict]:
    """The command prefix that runs checkout `code`'s spikecompile, and its environment. `python -P`: without -P,
    `python -m` puts the working directory first on sys.path, so run from this checkout it imports this checkout's
    package whatever PYTHONPATH says (the baselines of earlier runs were this version). Exits if the import does not
    come from `code`. SOURCE_DATE_EPOCH: model.pt's creation time, so that two versions can write the same bytes."""
    # code first; the rest of PYTHONPATH stays (a GPU machine's carried wheels: bench/device_check.sh)
    path = os.pathsep.join([str(code), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    # no cache: --repeats converts the same files again, and each run must scan for its prefix as a first one does
    environment = {**os.environ, "PYTHONPATH": path, "SOURCE_DATE_EPOCH": "0", "SPIKECOMPILE_CACHE": "off"}
    found = subprocess.run([sys.executable, "-P", "-c", "import spikecompile; print(spikecompile.__file__)"],
                           env=environment, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(Path(code).resolve()):
        sys.exit(f"error: PYTHONPATH={code} imports spikecompile from {found}")
    return [sys.executable, "-P", "-m", "spikecompile"], environment


GIB_MB = 1024
GPU_WALL_TARGET_S = 180.0  # the issue's: a 7B-shaped model, all 32 layers, converted on one GPU


def gpu_memory_budget(shape: dict, dtype: str) -> dict:
    """The issue's bound on a GPU conversion's peak memory, in MB: one decoder layer's weights (in the convert
    dtype), the activations (the calibration windows' hidden states, which stay on the device, and one window's
    widest transient: its MLP's gate, up and product rows), and 4 GiB for the rest (the CUDA context, the fitting's
    site samples, the allocator's slack)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    layer = (2 * hidden * hidden + 2 * kv * hidden + 3 * inter * hidden + 2 * hidden) * width
    activations = (WINDOWS * SEQLEN * hidden + 3 * SEQLEN * inter) * width
    mb = 1 << 20
    return {"layer_mb": layer / mb, "activations_mb": activations / mb, "headroom_mb": 4 * GIB_MB,
            "gpu_memory_budget_mb": (layer + activations) / mb + 4 * GIB_MB}


def run(folder: Path, workdir: Path, code: Path | None = None, dtype: str = "bfloat16", device: str = "cpu",
        cache: Path | None = None) -> dict:
    """The CLI's convert of `folder` in its own process (with the spikecompile of checkout `code` when given): its
    --json report and wall time. cache: the SPIKECOMPILE_CACHE folder (default: off)."""
    tag = "-baseline" if code else ""
    output, report = workdir / f"{folder.name}{tag}.pt", workdir / f"{folder.name}{tag}.json"
    prefix, environment = spikecompile_of(code or ROOT)
    if cache is not None:
        environment["SPIKECOMPILE_CACHE"] = str(cache)
    command = [*prefix, "convert", str(folder), "-o", str(output), "--json", str(report), *CONVERT, "--dtype", dtype,
               "--device", device]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment)
    figures = json.loads(report.read_text())
    figures["wall_s"] = time.perf_counter() - start
    return figures


def evaluate(model_file: Path, dtype: str = "bfloat16", device: str = "cpu") -> dict:
    """The CLI's eval of model_file on WINDOWS x SEQLEN builtin tokens in its own process: wall time, peak RSS (and
    GPU memory), the three perplexities."""
    prefix, environment = spikecompile_of(ROOT)
    report = model_file.with_name(f"{model_file.stem}-eval.json")
    command = [*prefix, "eval", str(model_file), "--ppl", "builtin", "--seqlen", str(SEQLEN), "--max-windows",
               str(WINDOWS), "--json", str(report), "--no-progress", "--dtype", dtype, "--device", device]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    figures = json.loads(report.read_text())
    return {"wall_s": wall, "peak_rss_mb": figures["peak_rss_mb"], "peak_gpu_mb": figures.get("peak_gpu_mb"),
            "windows": figures["windows"], "seqlen": figures["seqlen"], "ann_ppl": figures["ann_ppl"],
            "prefixed_float_ppl": figures["prefixed_float_ppl"], "snn_ppl": figures["snn_ppl"],
            "timings_s": figures["timings_s"], "layer_s": figures["layer_s"],
            "mean_layer_s": sum(figures["layer_s"]) / len(figures["layer_s"])}


def depth_line(layers: tuple[int, int], walls: tuple[float, float]) -> dict:
    """The line through two depths' wall times: seconds per layer, the fixed part, and the time at 32 layers."""
    per_layer = (walls[1] - walls[0]) / (layers[1] - layers[0])
    fixed = walls[0] - per_layer * layers[0]
    return {"wall_s_per_layer": per_layer, "fixed_s": fixed, "extrapolated_32_layers_s": fixed + 32 * per_layer}


def main() -> None:
    from spikecompile.devices import cpu_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 4], help="two depths (default 2 4; the issue: 4 8)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the models are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier checkout to convert with, side by side")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="convert's --dtype")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the depths R times; keep each's fastest")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="convert's --device")
    parser.add_argument("--results", type=Path, default=None, help="where the report goes (default: bench/results/)")
    parser.add_argument("--later", action="store_true",
                        help="convert each depth once more, reading the prefix selection its first run cached")
    parser.add_argument("--eval", action="store_true", help="also run eval on each depth's model.pt (4 x 512 tokens)")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: torch sees no CUDA device here")
    workdir = arguments.workdir or Path(tempfile.mkdtemp(prefix="scale-"))
    folders, written_s = {}, {}
    for depth in arguments.depths:
        folders[depth] = workdir / f"{arguments.shape}-shape-{depth}layers"
        started = time.perf_counter()
        write_model(folders[depth], depth, shape=arguments.shape)
        written_s[depth] = time.perf_counter() - started
    runs = {}
    cache = workdir / "cache" if arguments.later else None
    for repeat in range(arguments.repeats):
        for depth in arguments.depths:
            depth_cache = cache / str(depth) if cache is not None else None
            if depth_cache is not None:  # every timed run scans, as a first conversion does, and caches its selection
                subprocess.run(["rm", "-rf", str(depth_cache)], check=True)
            figures = run(folders[depth], workdir, dtype=arguments.dtype, device=arguments.device, cache=depth_cache)
            walls = [*runs.get(depth, {}).get("walls_s", []), figures["wall_s"]]
            print(f"{depth} layers (run {repeat + 1}): wall {figures['wall_s']:.1f} s, peak RSS "
                  f"{figures['peak_rss_mb']:.0f} MB, "
                  + (f"peak GPU {figures['peak_gpu_mb']:.0f} MB, " if figures.get("peak_gpu_mb") is not None else "")
                  + "per calibrated layer "
                  f"{sum(figures['layer_s']) / len(figures['layer_s']):.1f} s, stages "
                  + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in figures["timings_s"].items()),
                  flush=True)
            if depth in runs and runs[depth]["wall_s"] <= figures["wall_s"]:
                runs[depth]["walls_s"] = walls
                continue
            runs[depth] = {"layers": depth, "write_model_s": written_s[depth], "wall_s": figures["wall_s"],
                           "walls_s": walls,
                           "peak_rss_mb": figures["peak_rss_mb"], "peak_gpu_mb": figures.get("peak_gpu_mb"),
                           "timings_s": figures["timings_s"],
                           "layer_s": figures["layer_s"], "prefix_layer_s": figures.get("prefix_layer_s", []),
                           "mean_layer_s": sum(figures["layer_s"]) / len(figures["layer_s"]),
                           "layer_loop_s": sum(figures["layer_s"]) + sum(figures.get("prefix_layer_s", []))}
    for depth in arguments.depths:
        folder = folders[depth]
        if cache is not None:  # the selection the last timed run of this depth cached
            later = run(folder, workdir, dtype=arguments.dtype, device=arguments.device, cache=cache / str(depth))
            assert later["prefix_cached"], "the later conversion scanned: its prefix selection was not cached"
            runs[depth]["later"] = {"wall_s": later["wall_s"], "timings_s": later["timings_s"],
                                    "peak_rss_mb": later["peak_rss_mb"],
                                    "speedup": runs[depth]["wall_s"] / later["wall_s"]}
            print(f"{depth} layers, later conversion (prefix selection cached): wall {later['wall_s']:.1f} s, "
                  f"peak RSS {later['peak_rss_mb']:.0f} MB, stages "
                  + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in later["timings_s"].items()),
                  flush=True)
        if arguments.eval:  # the model.pt of this depth's last conversion (every run writes the same one)
            evaluated = evaluate(workdir / f"{folder.name}.pt", arguments.dtype, arguments.device)
            runs[depth]["eval"] = evaluated
            print(f"{depth} layers, eval ({evaluated['windows']} x {evaluated['seqlen']} tokens): wall "
                  f"{evaluated['wall_s']:.1f} s, peak RSS {evaluated['peak_rss_mb']:.0f} MB, "
                  + (f"peak GPU {evaluated['peak_gpu_mb']:.0f} MB, " if evaluated["peak_gpu_mb"] is not None else "")
                  + f"ANN {evaluated['ann_ppl']:.4g}, SNN {evaluated['snn_ppl']:.4g}", flush=True)
        if arguments.baseline:
            before = run(folder, workdir, arguments.baseline, arguments.dtype, arguments.device)
            runs[depth]["baseline"] = {"wall_s": before["wall_s"], "timings_s": before["timings_s"],
                                       "peak_rss_mb": before["peak_rss_mb"]}
            print(f"{depth} layers, baseline {arguments.baseline}: wall {before['wall_s']:.1f} s, stages "
                  + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in before["timings_s"].items()),
                  flush=True)
        if not arguments.keep:
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    low, high = (runs[depth] for depth in arguments.depths)
    depths = (low["layers"], high["layers"])
    line = depth_line(depths, (low["wall_s"], high["wall_s"]))
    summary = {"shape_name": arguments.shape, "shape": SHAPES[arguments.shape],
               "convert": " ".join([*CONVERT, "--dtype", arguments.dtype, "--device", arguments.device]),
               "device": arguments.device,
               "cpu": cpu_info("model name") or "unknown", "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "torch_threads": torch.get_num_threads(), "repeats": arguments.repeats,
               "runs": list(runs.values()), "depth_ratio": high["wall_s"] / low["wall_s"],
               "layer_loop_ratio": high["layer_loop_s"] / low["layer_loop_s"],
               **line,
               "peak_rss_mb_max": max(run["peak_rss_mb"] for run in runs.values()), "peak_rss_target_mb": 6144}
    if arguments.device == "cuda":
        budget = gpu_memory_budget(SHAPES[arguments.shape], arguments.dtype)
        peak_gpu = max(run["peak_gpu_mb"] or 0.0 for run in runs.values())
        summary.update({"gpu": torch.cuda.get_device_name(), **budget, "peak_gpu_mb_max": peak_gpu,
                        "gpu_memory_within_budget": peak_gpu <= budget["gpu_memory_budget_mb"],
                        "deepest_wall_s": high["wall_s"], "deepest_layers": high["layers"],
                        "wall_target_s": GPU_WALL_TARGET_S, "within_wall_target": high["wall_s"] <= GPU_WALL_TARGET_S})
        print(f"GPU {summary['gpu']}: {high['layers']} layers in {high['wall_s']:.1f} s "
              f"(target {GPU_WALL_TARGET_S:.0f} s), peak GPU memory {peak_gpu:.0f} MB "
              f"(budget {budget['gpu_memory_budget_mb']:.0f} MB: one layer {budget['layer_mb']:.0f} "
              f"+ activations {budget['activations_mb']:.0f} + 4096)", flush=True)
    if cache is not None:
        summary["later"] = depth_line(depths, (low["later"]["wall_s"], high["later"]["wall_s"]))
        print(f"later conversions (prefix cached): {summary['later']['wall_s_per_layer']:.1f} s per layer, "
              f"32 layers ≈ {summary['later']['extrapolated_32_layers_s'] / 60:.1f} min", flush=True)
    if arguments.eval:
        walls = (low["eval"]["wall_s"], high["eval"]["wall_s"])
        loops = (low["eval"]["timings_s"]["layers"], high["eval"]["timings_s"]["layers"])
        head = high["eval"]["timings_s"]["head"]  # in layers of the same run: the machine drifts between runs
        summary["eval"] = {"depth_ratio": walls[1] / walls[0], "layer_loop_ratio": loops[1] / loops[0],
                           **depth_line(depths, walls), "head_s": head,
                           "head_in_layers": head / high["eval"]["mean_layer_s"],
                           "mean_layer_s": [low["eval"]["mean_layer_s"], high["eval"]["mean_layer_s"]],
                           "peak_rss_mb_max": max(low["eval"]["peak_rss_mb"], high["eval"]["peak_rss_mb"])}
        print(f"eval: depth ratio {summary['eval']['depth_ratio']:.2f} (the layer loop alone "
              f"{summary['eval']['layer_loop_ratio']:.2f}, mean seconds per layer "
              + " and ".join(f"{seconds:.1f}" for seconds in summary["eval"]["mean_layer_s"])
              + f"; the lm_head's logits of the three passes "
              f"{summary['eval']['head_s']:.1f} s, as long as {summary['eval']['head_in_layers']:.1f} layers), "
              f"{summary['eval']['wall_s_per_layer']:.1f} s per layer, 32 layers ≈ "
              f"{summary['eval']['extrapolated_32_layers_s'] / 60:.1f} min, peak RSS ≤ "
              f"{summary['eval']['peak_rss_mb_max']:.0f} MB", flush=True)
    if arguments.baseline:
        walls = [runs[depth]["baseline"]["wall_s"] for depth in arguments.depths]
        summary["baseline"] = {"checkout": str(arguments.baseline), "depth_ratio": walls[1] / walls[0],
                               "speedup": {depth: runs[depth]["baseline"]["wall_s"] / runs[depth]["wall_s"]
                                           for depth in arguments.depths}}
        print(f"baseline depth ratio {summary['baseline']['depth_ratio']:.2f}; this version is "
              + ", ".join(f"{speed:.2f}x as fast at {depth} layers"
                          for depth, speed in summary["baseline"]["speedup"].items()))
    print(f"depth ratio {summary['depth_ratio']:.2f} ({high['layers']}/{low['layers']} layers; the layer loops "
          f"alone {summary['layer_loop_ratio']:.2f}), "
          f"{line['wall_s_per_layer']:.1f} s per layer, "
          f"32 layers ≈ {summary['extrapolated_32_layers_s'] / 60:.1f} min, "
          f"peak RSS ≤ {summary['peak_rss_mb_max']:.0f} MB")
    results = RESULTS_OF[arguments.shape]
    if arguments.dtype != "bfloat16":
        results = results.with_name(f"{results.stem}_{arguments.dtype}.json")
    if arguments.device != "cpu":
        results = results.with_name(f"{results.stem}_{arguments.device}.json")
    results = arguments.results or results
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
