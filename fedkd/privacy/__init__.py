"""Differential privacy in fedkd (`privacy.mode`, conf/privacy/).

- `sample`: DP-SGD on each client's private data with Opacus (per-example clipping
  to `max_grad_norm`, Gaussian noise `noise_multiplier * max_grad_norm`, Poisson
  sampling of the private set). The KD steps on the public proxy set are not
  private and need not be. A client's soft labels are computed by its DP-trained
  student: post-processing, so their epsilon is the training epsilon.
- `client`: client-level DP on uploads (fedkd/privacy/upload.py): clients clip their
  logits; the server's privacy layer (fedkd/privacy/ledger.py, called by the round
  loop, not by strategies) samples a secret Poisson cohort, adds Gaussian noise to
  the sum and hands strategies only that noisy mean: everything after is
  post-processing.

Both are accounted with dp-accounting's RDP accountant as Poisson-subsampled
Gaussian mechanisms, composed over every DP step (sample) or round (client) so far.
Neighbouring datasets differ by adding or removing one example (sample) or one
client's whole data (client); docs/privacy.md says what the released shard size
means for that.
"""

from fedkd.privacy.accounting import gaussian_epsilon

MODES = ("none", "sample", "client")
OPTIMIZERS = ("sgd", "adam")  # privacy.optimizer: DP-SGD's, or DP-Adam
ACTIVATIONS = ("tanh",)  # privacy.activation: bounded, as DP-SGD prefers (Papernot et al. 2021)

__all__ = ["ACTIVATIONS", "MODES", "OPTIMIZERS", "gaussian_epsilon"]
