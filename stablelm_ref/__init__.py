"""stablelm-ref: a readable, exact NumPy reference implementation of the StableLM models.

    from stablelm_ref import StableLmForCausalLM
    model = StableLmForCausalLM.from_pretrained("path/or/repo-id", dtype="float64")
    logits = model([[510, 8588, 310]]).logits
"""

__version__ = "0.1.0"

from .config import StableLmConfig  # noqa: F401
from .errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    GenerationError,
    HubError,
    StableLmError,
    TokenizerError,
)
from .heads import (  # noqa: F401
    StableLmForCausalLM,
    StableLmForSequenceClassification,
    StableLmForTokenClassification,
)
from .kv_cache import KVCache  # noqa: F401
from .model import StableLmModel  # noqa: F401
from . import fast_cpu, fast_gpu  # noqa: F401,E402  (register model.fast() per device; see fast_forms.py)
