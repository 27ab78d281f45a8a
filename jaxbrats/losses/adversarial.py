"""RIRN's adversarial terms (paper section 3.5, eq. 8).

A discriminator D looks at output maps and returns logits z of any shape
(one per position for a fully convolutional D); D(x) = sigmoid(z) is read
as "x comes from the teacher". Every term is averaged over all axes (batch
and positions): the log is taken per position, then averaged, as a
per-position (PatchGAN-style) cross-entropy does.

The paper writes L_ADV(T, S) = log(1 - D(T)) + log(D(S)) (eq. 8). Read with
its D as "from the student" and maximised by the discriminator, it is the
usual GAN objective; with our D = 1 - (its D) it is minus the cross-entropy
below, so maximising eq. 8 is minimising `discriminator_loss`. Minimising
eq. 8 as written, instead, has no minimum (log(1 - D(T)) -> -inf as
D(T) -> 1) and its gradient vanishes exactly where D is wrong, so we do not.

The two sides are trained alternately and neither loss helps the other:
- in the discriminator's update, the teacher's and the student's outputs
  enter gradient-stopped (only D's parameters are differentiated);
- in the student's update, D is frozen (its parameters are not updated),
  and only the student's parameters are differentiated.
The losses themselves stop no gradient: the caller decides which
parameters each update differentiates.

Computed with log_sigmoid: log(sigmoid(z)) = log_sigmoid(z) and
log(1 - sigmoid(z)) = log_sigmoid(-z), finite for any logit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def discriminator_loss(teacher_logits, student_logits):
    """The discriminator's objective, to be minimised: the BCE with teacher label 1 and student label 0.

    L_D = -mean log D(T_out) - mean log(1 - D(S_out))
        = -mean log_sigmoid(z_T) - mean log_sigmoid(-z_S),
    which is minus eq. 8 with the paper's D taken as 1 - D (see the module
    docstring). Minimising it drives D(T_out) -> 1 and D(S_out) -> 0. The
    value is >= 0: 0 for a perfect discriminator, 2 log 2 for one that cannot
    tell the outputs apart (D = 1/2 everywhere). The two means are taken
    separately, so the logit maps may differ in shape.

    Returns (loss, {"adv_d": loss, "d_teacher": mean D(T_out),
    "d_student": mean D(S_out)}).
    """
    z_teacher = jnp.asarray(teacher_logits, jnp.float32)
    z_student = jnp.asarray(student_logits, jnp.float32)
    loss = -jnp.mean(jax.nn.log_sigmoid(z_teacher)) - jnp.mean(jax.nn.log_sigmoid(-z_student))
    parts = {
        "adv_d": loss,
        "d_teacher": jnp.mean(jax.nn.sigmoid(z_teacher)),
        "d_student": jnp.mean(jax.nn.sigmoid(z_student)),
    }
    return loss, parts


def student_adversarial_loss(student_logits):
    """The student's adversarial term: the non-saturating generator loss -log D(S_out), mean over all axes.

    The paper does not write the student's side of eq. 8. Minimising
    -log D(S_out) = -log_sigmoid(z_S) asks D to take the student's output
    for the teacher's; unlike minimising log(1 - D(S_out)), its gradient is
    largest while D still rejects the student's output. D is frozen in this
    update (see the module docstring).

    Returns (loss, {"adv_s": loss}).
    """
    loss = -jnp.mean(jax.nn.log_sigmoid(jnp.asarray(student_logits, jnp.float32)))
    return loss, {"adv_s": loss}
