"""`sagaline worker -A examples.robots.app`: the app defined in `sagaline/demo/robots/app.py`."""

from sagaline.demo.robots.app import app

__all__ = ["app"]
