"""The IR backend, `spikecompile build` without --target: the compiled graph as a folder (graph.json, its
tensors and weights, spikecompile.ir.write) and build.json, what was built from what with each pass's report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from spikecompile.files import atomic_write, file_sha256
from spikecompile.ir import write

from .. import BuildResult, parse_options
from ..options import BY_TARGET

OPTIONS = BY_TARGET["ir"]
REPORT_FILE = "build.json"


def check(options: dict) -> dict:
    """The IR folder takes no options of its own but --progress (of the load and trace)."""
    return parse_options(OPTIONS, options)


def build(result: BuildResult, folder: str | Path, progress: bool = True) -> dict:
    """Write the graph, its weights and build.json (what was built from what, and each pass's report).
    progress: a bar per weight tensor written (the build's own bars are drawn by spikecompile.build)."""
    start = time.perf_counter()
    write(result.graph, folder, result.store, progress)
    seconds = {**result.seconds, "write": time.perf_counter() - start}
    report = {
        "model": {"path": result.model_path, "sha256": file_sha256(result.model_path)},
        "source": result.record["source"],
        "options": result.options,
        "passes": result.passes,
        "seconds": seconds,
        "nodes": len(result.graph),
        "bytes": {path.name: path.stat().st_size for path in sorted(Path(folder).iterdir()) if path.is_file()},
    }
    text = json.dumps(report, indent=2, default=str) + "\n"
    atomic_write(Path(folder) / REPORT_FILE, lambda temp: Path(temp).write_text(text, encoding="utf-8"))
    return report


def report_lines(report: dict, folder: str | Path) -> list[str]:
    """One line per pass (its time or "skipped", its notes), then what was written and the time of each stage."""
    lines = []
    for entry in report["passes"]:
        state = "skipped" if entry["skipped"] else f"{entry['seconds']:.2f} s"
        lines.append(f"  pass {entry['name']:<18} {state:>9}  {_brief(entry['notes'])}")
    total = sum(report["bytes"].values())
    seconds = report["seconds"]
    lines.append(f"wrote {folder}: {report['nodes']} nodes, {total / 2**20:.1f} MiB "
                 f"(load {seconds['load']:.1f} s, trace {seconds['trace']:.2f} s, "
                 f"passes {seconds['passes']:.2f} s, write {seconds['write']:.1f} s)")
    return lines


def _brief(notes: dict) -> str:
    """A pass's notes on one line, long lists shortened to their length."""
    parts = []
    for key, value in notes.items():
        if isinstance(value, list | dict) and len(value) > 4:
            value = f"<{len(value)}>"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


__all__ = ["OPTIONS", "REPORT_FILE", "build", "check", "report_lines"]
