"""pmaster's web dashboard (``pmaster --dashboard HOST:PORT``): server.py serves the pages and
the JSON endpoints, api.py answers them as a client of the master's client socket, samples.py
keeps the 15-minute ring the charts draw, static/ holds the page, its script and the
vendored chart library (uPlot, MIT)."""
