"""Passes over the IR: each pass declared once and registered by name; PassManager orders, runs and checks them."""

from .manager import REGISTRY, Pass, PassContext, PassManager, PassResult, register_pass
from . import cleanup, timesteps  # noqa: F401,E402  (importing a pass module registers its passes)

__all__ = ["REGISTRY", "Pass", "PassContext", "PassManager", "PassResult", "register_pass"]
