"""Stages of the GRPO train step: experience (rollouts + rewards), batching, the Megatron step,
weight sync, and the setup that builds them from a recipe. megammr.trainer runs them in order."""
