"""megammr: the Infi-MMR curriculum (three phases of GRPO) for VLMs on megatron-core."""

__version__ = "0.1.0"
