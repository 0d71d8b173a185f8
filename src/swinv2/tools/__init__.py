"""Measuring: the side-by-side benchmark against timm, transformers and torchvision, and FLOPs.

May import every package below it.
"""
