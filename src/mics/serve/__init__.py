"""A local web page for one run (``mics serve``): upload an image, see the prediction and the run's report."""

from mics.serve.app import make_server, serve

__all__ = ["make_server", "serve"]
