"""The frontend: trace a converted spiking model into the IR (trace), and run IR graphs in decoded mode
(interpret), the reference that every pass and backend is checked against.

    trace      trace(SpikingModel) -> (Graph, TensorStore): a structured walk of a transformers LLaMA
    interpret  interpret(graph, store, ids) -> logits: one function per node type, decoded mode
               (evaluate: every node's value; sites_off: the override that runs the float model)
"""

from .interpret import evaluate, interpret, sites_off
from .trace import trace

__all__ = ["evaluate", "interpret", "sites_off", "trace"]
