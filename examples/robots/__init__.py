"""The collaborative exploration saga: allocate robots, plan a route, explore, integrate maps.

Run it with `sagaline demo`, or by hand:

    sagaline worker -A examples.robots.app          # one terminal
    python -m examples.robots --fail-at plan_route  # another
"""
