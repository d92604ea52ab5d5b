"""The reference forward's checks of model.config and model.params, on and off, in one process.

    python tools/ab_params_check.py [--steps 40]

StableLmPreTrainedModel._check_params runs at the start of every reference forward: model.config read back
through config.json (config.edit_problem) and the shapes it implies computed (checkpoint.expected_shapes), both
only when a field changed since the last check (StableLmPreTrainedModel._shapes), then the names and shapes of
every tensor compared with the config's. Here the default model decodes one token at a time through a KV cache
(the reference forward's cheapest call), its steps alternating between the model as it is and the same model with
the checks replaced by a no-op, so that a slow moment of a shared machine costs both alike. Prints the median step of each side, their ratio,
and the checks alone (median of 2,000 calls): on a busy 2-core machine the ratio moves by several percent
from run to run, far more than the checks cost, so the last line is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stablelm_ref import DEFAULT_MODEL, StableLmForCausalLM  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="decode steps per side")
    args = parser.parse_args()
    checked = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL)
    unchecked = StableLmForCausalLM(checked.config, checked.params)
    unchecked._check_params = lambda: None
    prompt = [[11, 23, 5, 7, 42, 99, 3, 8]]
    sides = {"checked": checked, "unchecked": unchecked}
    caches = {name: model(prompt, use_cache=True).past_key_values for name, model in sides.items()}
    times = {name: [] for name in sides}
    for step in range(args.steps):
        order = list(sides) if step % 2 == 0 else list(sides)[::-1]
        for name in order:
            t0 = time.perf_counter()
            caches[name] = sides[name]([[7]], past_key_values=caches[name], use_cache=True).past_key_values
            times[name].append(time.perf_counter() - t0)
    alone = []
    for _ in range(2000):
        t0 = time.perf_counter()
        checked._check_params()
        alone.append(time.perf_counter() - t0)
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"default model ({checked.config.num_hidden_layers} layers, {len(checked.params)} tensors), reference "
          f"decode step, median of {args.steps}:")
    print(f"  with the checks   {ms['checked']:8.3f} ms")
    print(f"  without it        {ms['unchecked']:8.3f} ms")
    print(f"  ratio             {ms['checked'] / ms['unchecked']:8.4f}  (with / without)")
    print(f"  the checks alone  {1e3 * statistics.median(alone):8.4f} ms (median of 2000), "
          f"{statistics.median(alone) / statistics.median(times['unchecked']):.2%} of a step")


if __name__ == "__main__":
    main()
