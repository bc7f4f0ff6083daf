"""comp-mer pipeline: decoding, the extraction run, the feature store, import, prediction and the CLIs."""

__version__ = "0.1.0"
