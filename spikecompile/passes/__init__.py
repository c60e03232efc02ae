"""Passes over the IR: each pass declared once and registered by name; PassManager orders, runs and checks them."""

from .manager import REGISTRY, Pass, PassContext, PassManager, PassResult, register_pass

__all__ = ["REGISTRY", "Pass", "PassContext", "PassManager", "PassResult", "register_pass"]
