"""GAN losses on discriminator logits.

Each loss is a pair: what D minimises given its logits on real and on generated images, and what G
minimises given D's logits on generated images. All are computed in float32.
"""

import jax
import jax.numpy as jnp


def _non_saturating(real, fake):
  # G maximises log D(G(z)) rather than minimising log(1 - D(G(z))): strong gradients early on.
  return jnp.mean(jax.nn.softplus(-real) + jax.nn.softplus(fake)), jnp.mean(jax.nn.softplus(-fake))


def _hinge(real, fake):
  return jnp.mean(jax.nn.relu(1 - real) + jax.nn.relu(1 + fake)), -jnp.mean(fake)


def _least_squares(real, fake):
  d_loss = 0.5 * jnp.mean((real - 1) ** 2 + fake**2)
  return d_loss, 0.5 * jnp.mean((fake - 1) ** 2)


_LOSSES = {"non_saturating": _non_saturating, "hinge": _hinge, "least_squares": _least_squares}
NAMES = tuple(_LOSSES)


def discriminator_loss(name: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """D's loss given its logits on a real and a generated batch."""
  return _LOSSES[name](real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32))[0]


def generator_loss(name: str, fake_logits: jax.Array) -> jax.Array:
  """G's loss given D's logits on a generated batch."""
  fake_logits = fake_logits.astype(jnp.float32)
  # The D half of the pair ignores the real logits here; only G's half is used.
  return _LOSSES[name](jnp.zeros_like(fake_logits), fake_logits)[1]
