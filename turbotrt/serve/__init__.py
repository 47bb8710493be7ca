"""Serve bundles over HTTP on Ray Serve: `turbotrt serve BUNDLE` (the `serve` extra).

Each stage of the runtime's Pipeline (text encoder, image encoder for I2V, DiT steps, VAE decode)
is a Ray Serve deployment with its own replicas and GPUs; an API deployment takes requests, keeps
jobs on disk and drives them through the stages with deployment handles.

Nothing here is imported by `turbotrt.runtime`; only `app`, `api` and `stages` import ray.
"""

INSTALL_HINT = "turbotrt serve needs Ray Serve: pip install 'turbotrt[serve]'"
