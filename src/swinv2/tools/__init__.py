"""Measuring: the side-by-side benchmark against timm, transformers and torchvision, FLOPs, and the
training-data throughput per JPEG decoder.

May import every package below it.
"""
