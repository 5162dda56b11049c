"""fedloom: federated learning with one algorithm API from simulation to deployment."""

__version__ = "0.1.0"

__all__ = ["__version__"]
