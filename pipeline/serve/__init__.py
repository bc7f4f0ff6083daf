"""comp-serve: a trained checkpoint behind HTTP, with a page to try clips in a browser.

Layers, one job each: `limits` (the server's limits as a strict dataclass), `uploads` (a multipart body
streamed into a private folder under a size limit, the client's file name never used as a path),
`media_checks` (duration and readability before any model runs), `jobs` (a bounded queue and the one worker
that runs the models), `app` (the FastAPI routes and the page under `static/`). The prediction itself is
`pipeline.predict.Predictor`, the one code path `comp-predict` uses.
"""
