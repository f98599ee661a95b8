"""The collaborative exploration saga: allocate robots, plan a route, explore, integrate maps.

Run it with `sagaline demo`, or by hand (works from any directory once sagaline
is installed):

    sagaline worker -A sagaline.demo.robots.app          # one terminal
    python -m sagaline.demo.robots --fail-at plan_route  # another

`examples.robots` is the same app under the name the examples use.
"""
