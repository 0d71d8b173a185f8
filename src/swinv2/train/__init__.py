"""Training: datasets and samplers, the LR schedule, the engine, evaluation, the run directory,
distributed set-up, fault handling and multi-stage recipes.

Imports `swinv2.model`, `swinv2.weights` and the ground floor; never `swinv2.serve`.
"""
