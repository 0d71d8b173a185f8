"""Weights: the registry of variants, the weight formats and their key maps, safe loading, the
factory users start from (`create_model`, `load_model`, writing any format) and weights by name
from the hub.

Imports `swinv2.model` and the ground floor.
"""
