"""Deployment without torch: a captioning model exported to ONNX and captioned with ONNX Runtime.

``onnx_export`` turns a ``Captioner`` into three ONNX graphs (encoder, decoder set-up, one decoder
step); ``beam_step`` appends beam search's per-step selection to the step, and ``search_graph``
loops over that, so the whole search is a graph too. ``ort_search`` runs them (``OrtCaptioner``,
whose captions are the torch path's) and keeps numpy greedy and beam search as their reference;
``ort_quantize`` makes them int8; ``bundle`` joins them into one model file for a runtime without
Python.
"""
