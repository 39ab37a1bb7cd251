"""Measure knowledge superposition in language models (Hu et al., AAAI 2025)."""

__version__ = "0.1.0"
