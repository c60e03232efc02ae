"""NIR export benchmark on SmolLM2-135M-Instruct (issue: NIR backend).

model.pt is --model, or converted here (phase coding, T=8, grains 2, Hadamard rotation, WikiText-2 valid
calibration: bench/convert_smollm2.py's protocol). In this process:
  * build: load, trace and the default passes (spikecompile.build);
  * whole model: the NIR export (exact variant) — seconds, bytes on disk by kind, segments, NIR nodes, fidelity
    counts — and our reader's round trip (seconds);
  * one decoder layer (--layer): its attention and MLP blocks (ir.decoder_block) exported, then run on --tokens
    seeded random tokens with nirtorch for the segments and the interpreter for the other ops (run + consumer.py):
    export seconds, consumer seconds (nirtorch graph building + running), and the largest difference to the
    block interpreted whole.
Prints a summary and writes bench/results/nir_smollm2.json.

    python bench/nir_smollm2.py [--model out/smollm2-t8.pt] [--layer 0] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from spikecompile.devices import peak_rss_mb

from convert_smollm2 import CALIB, ROOT, convert

RESULTS = ROOT / "bench" / "results" / "nir_smollm2.json"


def folder_bytes(folder: Path) -> dict[str, int]:
    """Bytes on disk by kind: the .nir segments, ops.safetensors, the two JSON files."""
    sizes: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            kind = "segments" if path.suffix == ".nir" else path.name
            sizes[kind] = sizes.get(kind, 0) + path.stat().st_size
    return dict(sorted(sizes.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="An existing model.pt (default: convert one at T=8).")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    if args.model is None and not CALIB.is_file():
        sys.exit(f"error: {CALIB} is missing; pass --model or provide ../shared/data")

    import nir
    import torch
    from spikecompile.backends.nir import export, read, run
    from spikecompile.backends.nir.consumer import NirtorchRunner

    from spikecompile.build import BuildOptions, build
    from spikecompile.files import atomic_write
    from spikecompile.ir import evaluate
    from spikecompile.ir import interpret
    from spikecompile.ir import decoder_block

    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        model = Path(args.model) if args.model else convert(workdir, 8, "phase", 2)[0]
        start = time.perf_counter()
        built = build(model, BuildOptions())
        results = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "model_pt": str(model),
                   "build_s": time.perf_counter() - start, "ir_nodes": len(built.graph)}

        folder = workdir / "nir"
        start = time.perf_counter()
        report = export(built.graph, built.store, folder)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        read(folder)
        read_s = time.perf_counter() - start
        segments = sorted((folder / "segments").glob("*.nir"))
        results["whole_model"] = {
            "export_s": export_s, "read_back_s": read_s, "bytes": folder_bytes(folder),
            "total_mib": sum(folder_bytes(folder).values()) / 2**20, "segments": len(segments),
            "nir_nodes": sum(len(nir.read(path).nodes) for path in segments), "fidelity": report["counts"]}

        ids = torch.randint(0, 49152, (1, args.tokens), generator=torch.Generator().manual_seed(0))
        values = evaluate(built.graph, built.store, ids)
        results["layer"] = {"index": args.layer, "tokens": args.tokens}
        for which, norm in (("attn", "input_layernorm"), ("mlp", "post_attention_layernorm")):
            block = decoder_block(built.graph, args.layer, which)
            x = values[built.graph.inputs(f"layers.{args.layer}.{norm}")["x"]]
            start = time.perf_counter()
            export(block, built.store, workdir / which)
            block_export_s = time.perf_counter() - start
            start = time.perf_counter()
            got = run(workdir / which, {"block_input": x}, NirtorchRunner())["block_output"]
            consumer_s = time.perf_counter() - start
            expected = interpret(block, built.store, {"block_input": x})
            results["layer"][which] = {"export_s": block_export_s, "consumer_run_s": consumer_s,
                                       "total_mib": sum(folder_bytes(workdir / which).values()) / 2**20,
                                       "max_abs_diff": (got - expected).abs().max().item(),
                                       "max_abs_output": expected.abs().max().item()}
        results["peak_rss_mb"] = peak_rss_mb()

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(RESULTS, lambda temp: Path(temp).write_text(json.dumps(results, indent=2) + "\n"))
    whole = results["whole_model"]
    print(f"build (load, trace, passes): {results['build_s']:.1f} s, {results['ir_nodes']} IR nodes")
    print(f"whole-model NIR export: {whole['export_s']:.1f} s, {whole['total_mib']:.1f} MiB on disk {whole['bytes']}, "
          f"{whole['segments']} segments, {whole['nir_nodes']} NIR nodes; read back {whole['read_back_s']:.1f} s; "
          f"fidelity {whole['fidelity']}")
    for which in ("attn", "mlp"):
        entry = results["layer"][which]
        print(f"layer {args.layer} {which} block: export {entry['export_s']:.2f} s ({entry['total_mib']:.1f} MiB), "
              f"nirtorch + interpreter run on {args.tokens} tokens {entry['consumer_run_s']:.2f} s, max |diff| "
              f"{entry['max_abs_diff']:.3g} (output max {entry['max_abs_output']:.3g})")
    print(f"peak RSS {results['peak_rss_mb']:.0f} MB; wrote {RESULTS}")


if __name__ == "__main__":
    main()
