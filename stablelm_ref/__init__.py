"""stablelm-ref: a readable, exact NumPy reference implementation of the StableLM models."""

__version__ = "0.1.0"

from .errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    GenerationError,
    HubError,
    StableLmError,
    TokenizerError,
)
