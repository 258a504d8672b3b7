"""Deployment without torch: a captioning model exported to ONNX and captioned with ONNX Runtime.

``onnx_export`` turns a ``Captioner`` into three ONNX graphs (encoder, decoder set-up, one decoder
step); ``ort_search`` runs them with numpy beam search / greedy that give the torch path's captions.
"""
