"""The demo: the robot exploration saga (`robots/`) and `sagaline demo`'s runner (`runner.py`).

The saga ships inside the package so that an installed sagaline runs the demo
from any directory; `examples/robots` points users at this code.
"""
