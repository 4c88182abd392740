"""visrec: PP-ShiTu style image recognition as a reproducible MLOps project."""

__version__ = "0.1.0"
