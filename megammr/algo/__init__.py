"""GRPO algorithm pieces: group-normalised advantages and the policy loss (on megammr.kernels)."""
from .advantages import group_advantages, token_advantages
from .loss import policy_loss, policy_loss_from_hidden

__all__ = ["group_advantages", "token_advantages", "policy_loss", "policy_loss_from_hidden"]
