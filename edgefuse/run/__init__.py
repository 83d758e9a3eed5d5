"""One run: the setup every candidate shares, the candidates measured alike, the chooser, the report."""
