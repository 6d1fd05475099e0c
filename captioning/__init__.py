"""Image captioning in JAX/Flax NNX on precomputed CNN features."""

__version__ = "0.1.0"
