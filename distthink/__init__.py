"""distthink: distributed fine-tuning of reasoning LLMs with an exact training signal."""

__version__ = "0.1.0"
