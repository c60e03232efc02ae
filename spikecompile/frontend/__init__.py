"""The frontend: trace a converted spiking model into the IR (trace), and run IR graphs in decoded mode
(interpret), the reference that every pass and backend is checked against.

    trace      trace(SpikingModel) -> (Graph, TensorStore): a structured walk of a transformers LLaMA
    interpret  interpret(graph, store, ids) -> logits: one function per node type, decoded mode
"""

from .interpret import interpret
from .trace import trace

__all__ = ["interpret", "trace"]
