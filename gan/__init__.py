"""gan: train generative adversarial networks on anime faces with JAX and Flax."""
