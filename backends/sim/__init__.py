"""The reference simulator backend."""
