"""Command-line entry points: comp-extract, comp-train, comp-predict, comp-import."""
