"""GAN losses on discriminator logits.

Each loss is a pair: what D minimises given its logits on real and on generated images, and what G
minimises given D's logits on generated images. All are computed in float32. The gradient
penalties (`wgan_gp`'s and R1) are functions of the squared norms of D's gradients with respect to
its inputs, which the train step computes.
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


def _wasserstein(real, fake):
  # The critic's estimate of the Wasserstein distance (Arjovsky et al. 2017); it is bounded only
  # with its gradient penalty, which the step adds (Gulrajani et al. 2017).
  return jnp.mean(fake) - jnp.mean(real), -jnp.mean(fake)


_LOSSES = {
  "non_saturating": _non_saturating,
  "hinge": _hinge,
  "least_squares": _least_squares,
  "wgan_gp": _wasserstein,
}
NAMES = tuple(_LOSSES)


def discriminator_loss(name: str, real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
  """D's loss given its logits on a real and a generated batch."""
  return _LOSSES[name](real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32))[0]


def generator_loss(name: str, fake_logits: jax.Array) -> jax.Array:
  """G's loss given D's logits on a generated batch."""
  fake_logits = fake_logits.astype(jnp.float32)
  # The D half of the pair ignores the real logits here; only G's half is used.
  return _LOSSES[name](jnp.zeros_like(fake_logits), fake_logits)[1]


def gradient_penalty(squared_norms: jax.Array, gamma: float) -> jax.Array:
  """WGAN-GP's penalty, gamma * E[(||grad D(x)|| - 1)^2], from the squared gradient norms at
  points between real and generated inputs (Gulrajani et al. 2017)."""
  # The small constant keeps the square root's gradient finite at a zero gradient.
  norms = jnp.sqrt(squared_norms.astype(jnp.float32) + 1e-12)
  return gamma * jnp.mean((norms - 1) ** 2)


def r1_penalty(squared_norms: jax.Array, gamma: float) -> jax.Array:
  """R1, gamma / 2 * E[||grad D(x)||^2] on real inputs (Mescheder et al. 2018)."""
  return 0.5 * gamma * jnp.mean(squared_norms.astype(jnp.float32))
