"""Image-captioning model compression: data, encoders, decoders, training, compression, evaluation."""

__version__ = "0.1.0"
