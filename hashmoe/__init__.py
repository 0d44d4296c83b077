"""hashmoe: Hash Layers for Large Sparse Models (Roller et al., 2021) in JAX/Flax."""

__version__ = "0.1.0"
