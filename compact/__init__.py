"""compact: see, prune, sparsify and distill causal language models."""

from compact.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
