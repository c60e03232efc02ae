"""Target descriptions (TOML, JSON) shipped as package data of spikecompile.targets; read by spikecompile.hardware."""
