"""GRPO algorithm pieces: group-normalised advantages and the policy losses (megammr.algo.losses),
computed on the log-prob primitives of megammr.kernels."""
from .advantages import group_advantages, token_advantages
from .loss import policy_loss, policy_loss_from_hidden, policy_loss_terms
from .losses import POLICY_LOSSES

__all__ = ["group_advantages", "token_advantages", "policy_loss", "policy_loss_from_hidden", "policy_loss_terms",
           "POLICY_LOSSES"]
