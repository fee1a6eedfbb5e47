"""jaxctx: long-context transformer training in JAX/Flax."""

__version__ = "0.1.0"
