"""Look inside a model: what batch normalization does to activations, gradients and the loss.

- :class:`ActivationTracker` — percentiles of pre-activations over training (Ioffe & Szegedy
  2015, Figure 1(b, c)) for any model.
- :func:`internal_covariate_shift` — Santurkar et al. (2018)'s ICS: change of a layer's gradient
  when the layers before it take their optimizer step on the same batch.
- :func:`gradient_landscape` — loss variation, gradient change and effective β-smoothness along
  the gradient (Santurkar et al. 2018, Section 3.1).
- :func:`bn_health` / :func:`health_table` — per-layer drift of batch vs running statistics,
  near-zero variance channels, γ collapse.

None of them changes the model's weights, buffers or the optimizer's state.
"""

from .health import bn_health, bn_layers, health_table
from .ics import default_ics_layers, forward_order, internal_covariate_shift
from .landscape import gradient_landscape
from .tracker import ACTIVATIONS, ActivationTracker

__all__ = [
    "ACTIVATIONS",
    "ActivationTracker",
    "bn_health",
    "bn_layers",
    "default_ics_layers",
    "forward_order",
    "gradient_landscape",
    "health_table",
    "internal_covariate_shift",
]
