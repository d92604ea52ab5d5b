"""Print the worst error of this project against every golden in tests/goldens/ (transformers' outputs).

    python tools/golden_report.py          (PYTHONPATH=. or an installed package)

Relative error = ||ours - transformers|| / ||transformers|| over the token positions; float64 runs
compare with transformers float64, float32 with transformers float32.
"""

import glob
import os

import numpy as np
from safetensors.numpy import load_file

from stablelm_ref import StableLmForCausalLM

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "goldens")


def rel(ours, theirs, where):
    ours, theirs = np.asarray(ours, np.float64)[where], np.asarray(theirs, np.float64)[where]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def main():
    print(f"{'variant':14s} {'float64':>9s} {'float32':>9s} {'f64 left-pad':>12s} {'f32 left-pad':>12s}")
    worst = [0.0, 0.0]
    for path in sorted(glob.glob(os.path.join(ROOT, "*", "golden.safetensors"))):
        folder, g = os.path.dirname(path), load_file(path)
        row = []
        for dtype, suffix in (("float64", ""), ("float32", "_f32")):
            m = StableLmForCausalLM.from_pretrained(folder, dtype=dtype)
            r = rel(m(g["right_ids"], attention_mask=g["right_mask"]).logits, g["right_logits" + suffix],
                    g["right_mask"] == 1)
            l_ = rel(m(g["left_ids"], attention_mask=g["left_mask"], position_ids=g["left_pos"]).logits,
                     g["left_logits" + suffix], g["left_mask"] == 1)
            row.append((r, l_))
        worst = [max(worst[0], *row[0]), max(worst[1], *row[1])]
        print(f"{os.path.basename(folder):14s} {row[0][0]:9.2e} {row[1][0]:9.2e} {row[0][1]:12.2e} {row[1][1]:12.2e}")
    print(f"worst: float64 {worst[0]:.2e} (bound 1e-7), float32 {worst[1]:.2e} (bound 1e-4)")


if __name__ == "__main__":
    main()
