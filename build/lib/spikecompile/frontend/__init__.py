"""The frontend: trace a converted spiking model into the IR.

    trace      trace(SpikingModel) -> (Graph, TensorStore): a structured walk of a transformers LLaMA
"""

from .trace import trace

__all__ = ["trace"]
