"""LocMoE for Megatron-Core: locality-aware MoE routing and a node-hierarchical dispatcher.

Importing the package is cheap; Megatron is imported by the modules that need it.
"""

__version__ = "0.1.0"
