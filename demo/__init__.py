"""Generated inputs for the demo, the tests and the benchmarks: clips with speech, faces and every kind of
missing or broken stream (`media`), and feature stores with a known signal (`synthetic`).

Not needed to extract, train or predict; install the `demo` extra (`pip install comp-mer[demo]`, scikit-image
for the face images; speech needs the espeak-ng program) to use it.
"""
