"""Passes over the IR: each pass declared once and registered by name; PassManager orders, runs and checks them."""

from .context import CompileInputs
from .manager import REGISTRY, Pass, PassContext, PassManager, PassResult, register_pass
from . import cleanup, fold_hadamard, grains, loihi_mapping, timesteps  # noqa: F401,E402  (importing a pass module registers its passes)

__all__ = ["CompileInputs", "REGISTRY", "Pass", "PassContext", "PassManager", "PassResult", "register_pass"]
