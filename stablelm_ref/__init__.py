"""stablelm-ref: a readable, exact NumPy reference implementation of the StableLM models.

    from stablelm_ref import StableLmForCausalLM, Tokenizer
    model = StableLmForCausalLM.from_pretrained("stablelm-ref:default")   # or a directory, or a Hub repo id
    tok = Tokenizer.from_pretrained("stablelm-ref:default")
    logits = model(tok("def fibonacci(n):")["input_ids"]).logits

The public names are the ones transformers users know (StableLmConfig, StableLmModel, StableLmFor*,
TextStreamer), plus Tokenizer (transformers' AutoTokenizer for these models), KVCache, the error
classes and DEFAULT_MODEL, the name of the small model shipped inside the package.
"""

from ._version import __version__
from .config import StableLmConfig
from .errors import (
    CheckpointError,
    ConfigError,
    GenerationError,
    HubError,
    StableLmError,
    TokenizerError,
)
from .generation import TextStreamer
from .heads import (
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
)
from .hub import DEFAULT_MODEL
from .kv_cache import KVCache
from .model import StableLmModel, StableLmPreTrainedModel
from .tokenizer import Tokenizer

# Beside the reference, which imports none of them: fast_cpu and fast_gpu register model.fast() for the
# CPU and the GPU (fast_forms.py; fast_gpu imports no CuPy until used), the CUDA kernel modules register
# themselves for CuPy arrays (kernels.py).
from . import fast_cpu, fast_gpu  # noqa: E402,F401
from .cuda import flash_prefill, fused, gemm  # noqa: E402,F401

__all__ = [
    "__version__", "DEFAULT_MODEL",
    "StableLmConfig", "StableLmModel", "StableLmPreTrainedModel", "StableLmForCausalLM",
    "StableLmForSequenceClassification", "StableLmForTokenClassification",
    "Tokenizer", "TextStreamer", "KVCache",
    "StableLmError", "ConfigError", "CheckpointError", "TokenizerError", "GenerationError", "HubError",
]
