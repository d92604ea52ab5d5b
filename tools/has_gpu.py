"""Exit 0 when this machine can run stablelm-ref on a GPU (CuPy and an NVIDIA device); else say why, exit 1.

    python tools/has_gpu.py && echo "GPU ready"

`make test-gpu` and `make bench-gpu` ask it first, so that without a GPU they say so and succeed.
"""

import sys

from stablelm_ref.errors import StableLmError
from stablelm_ref.model import array_module

if __name__ == "__main__":
    try:
        array_module("gpu")
    except StableLmError as e:
        print(f"no GPU: {e}")
        sys.exit(1)
