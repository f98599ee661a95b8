"""The robot exploration example. Its code ships inside sagaline, in `sagaline/demo/robots/`
(read it there), so that `sagaline demo` runs from an installed package too; this
package gives it the name the examples use:

    sagaline worker -A examples.robots.app          # one terminal
    python -m examples.robots --fail-at plan_route  # another, from this checkout's root
"""
