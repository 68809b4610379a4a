"""fedkd: federated lifelong distillation on Flower + Ray.

The library is importable without Flower's simulation engine running; entry points
live in `simulations/`.
"""

__version__ = "0.1.0"
