"""comp-mer pipeline: decoding, extraction runs, the feature store, import, training runs, prediction, the CLIs."""
