"""``nmcli export``: ONNX (sparsity checked, verified), TensorRT engines and compressed checkpoints.

:func:`run_export` is the whole command: it rebuilds the model from the checkpoint (effective
weights), exports it with :mod:`nmcli.export.onnx`, finds every pruned layer's weight in the graph
by value (:func:`nmcli.formats.onnx_layout.locate_weights`), verifies the file in onnxruntime
(:mod:`nmcli.export.verify`), and builds a TensorRT engine (:mod:`nmcli.export.tensorrt`) or, when
``tensorrt`` is missing, gives the equivalent ``trtexec`` command. ``--compress`` writes the
compressed copy of :mod:`nmcli.nm.codec`.
"""
