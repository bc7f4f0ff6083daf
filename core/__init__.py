"""comp-mer's lowest layer: the types and services that extractors, the model and the pipeline all use.

Configuration (`config`), the feature store's records (`records`), the clip and its modalities (`clip`),
devices, distributed set-up, progress reporting, atomic file writes and the error root. It imports no other
package of the project, so every package above can depend on it and none of them on each other's internals.
"""

__version__ = "0.1.0"
