"""Feature extractors: one module per modality, each behind the contract in `extractors.base`."""
