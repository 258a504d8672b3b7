"""Deployment without torch: a captioning model exported to ONNX and captioned with ONNX Runtime.

``onnx_export`` turns a ``Captioner`` into three ONNX graphs (encoder, decoder set-up, one decoder
step); ``beam_step`` appends beam search's per-step selection to the step, and ``search_graph``
loops over that, so the whole search is a graph too; ``captioner_graph`` joins the encoder, the
set-up and the search into one model. ``ort_search`` captions with it (``OrtCaptioner``, whose
captions are the torch path's) and keeps numpy greedy and beam search as their reference;
``ort_quantize`` makes the graphs int8; ``bundle`` writes the joined model and its vocabulary for a
runtime without Python.
"""
