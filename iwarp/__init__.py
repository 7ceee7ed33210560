"""iwarp: real-time avatar animation with implicit warping (Mallya et al., NeurIPS 2022)."""

__version__ = "0.1.0"
