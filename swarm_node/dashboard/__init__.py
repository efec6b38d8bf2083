"""The live web dashboard every node serves at `/` on its metrics port (issue 12, docs/operations.md).

- http.py: the hardened read-only HTTP server (own thread and event loop, timeouts, connection limit);
- api.py: the JSON endpoints and the static files, built from snapshots the node prepares;
- static/: the page (HTML, CSS, a little JS) and the vendored chart library uPlot (MIT, static/vendor/uplot/).
"""
