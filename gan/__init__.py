"""gan: train generative adversarial networks on anime faces with JAX and Flax."""

import jax

# XLA:CPU compiles the default threefry generator slowly (seconds per random tensor shape on
# two cores); the RngBitGenerator-based 'rbg' compiles about four times faster and is just as
# deterministic on a given backend. Every key in the project is made after this import.
jax.config.update("jax_default_prng_impl", "rbg")
