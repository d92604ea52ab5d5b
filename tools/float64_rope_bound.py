"""How far our float64 logits are from transformers' float64 logits, by sequence length (README's table).

transformers builds its RoPE cos/sin tables in float32 even for a float64 model; everything else of its
float64 forward is float64. This prints, for a random model with stablelm-3b-4e1t's head (80 dims, 20
of them rotary, rope_theta 10000, std-0.2 weights, one layer), the relative max logit error
max |ours - theirs| / max |theirs| over the first L positions, against transformers as it is and against
transformers with float64 tables (the patch of tests/crosscheck/test_edges_vs_transformers.py).
Causal attention makes the first L positions of one 4,096-token forward the same as a forward of L tokens.

    .venv/bin/python tools/float64_rope_bound.py          (needs torch and transformers: make crosscheck)
"""

import os
import sys
import tempfile

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from conftest import tiny_model  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "crosscheck"))
from test_edges_vs_transformers import LONG, float64_rope  # noqa: E402


def main():
    with tempfile.TemporaryDirectory() as tmp:
        ours = tiny_model(seed=3, dtype="float64", **LONG)
        ours.save_pretrained(tmp)
        theirs = transformers.StableLmForCausalLM.from_pretrained(tmp, dtype=torch.float64).eval()
        ids = np.random.default_rng(0).integers(0, 101, (1, 4096))
        got = ours(ids).logits[0]                                              # [T, V]
        with torch.no_grad():
            plain = theirs(torch.tensor(ids)).logits[0].numpy()
            patched = float64_rope(theirs, ours.config)(torch.tensor(ids)).logits[0].numpy()
    print("| positions | transformers as it is (float32 RoPE tables) | with float64 RoPE tables |")
    print("|---:|---:|---:|")
    for n in (128, 256, 512, 1024, 2048, 4096):
        errs = [float(np.abs(got[:n] - w[:n]).max() / np.abs(w[:n]).max()) for w in (plain, patched)]
        print(f"| {n:,} | {errs[0]:.1e} | {errs[1]:.1e} |")


if __name__ == "__main__":
    main()
