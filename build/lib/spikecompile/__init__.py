"""spikecompile: a neuromorphic deployment compiler for spiking LLMs.

Data flows one way: conversion (ANN -> phase-coded spiking model, saved as model.pt) -> frontend (trace)
-> IR -> passes -> backends. Importing this package imports neither transformers nor any backend.
"""

__version__ = "0.1.0"
