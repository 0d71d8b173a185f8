"""Using a trained model: prediction over files, ONNX export and its size-free forward, the
inference runtimes (ONNX Runtime, OpenVINO; fp32, bf16, int8) and the detection / segmentation
backbone.

Imports `swinv2.model`, `swinv2.weights` and the ground floor; never `swinv2.train`.
"""
