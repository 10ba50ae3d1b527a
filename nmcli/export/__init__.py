"""Export backends: ``onnx`` (torch.onnx exporters, weights kept as plain initializers, fp16/bf16
casts with exact zeros), ``verify`` (onnxruntime against torch on the same inputs) and ``tensorrt``
(engine builds with sparse weights, the builder's report, the equivalent ``trtexec`` line). The
command that chains them is :mod:`nmcli.commands.export`."""
