"""edgeqat: Keras models to fully-integer TFLite, trained to survive quantization."""

__version__ = "0.1.0"
