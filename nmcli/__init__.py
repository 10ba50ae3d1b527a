"""nmcli: prune PyTorch models to N:M structured sparsity, recover them with SR-STE, export and benchmark.

Importing this package is cheap (no torch): the command line imports heavy modules only inside
the command that needs them.
"""

__version__ = "0.1.0"
