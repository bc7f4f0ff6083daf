"""comp-mer's lowest layer: the types and services that the extractors, the model and the pipeline share.

`clip` (the decoded clip, the modality and stage names), `records` (the feature store's records and the
extraction spec hash), `config` (dataclass configs from YAML/dicts, strict about keys), `errors` (the error
root, `CompError`), `progress` (the progress hook's shape), `atomic` (atomic file replacement), `devices`
and `distributed` (device choice, process groups). It imports no other package of the project.
"""

__version__ = "0.1.0"
