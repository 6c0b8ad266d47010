"""Stage 3: the text-to-image sampler behind Ray Serve (HTTP API + web page)."""
