"""minikproxy: a Python implementation of kube-proxy.

Importing the package has no side effects; see :mod:`minikproxy.cli` for the entry points.
"""

__version__ = "0.1.0"
