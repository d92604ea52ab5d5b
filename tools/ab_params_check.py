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

Then the same for the fast form (model.fast(), fast_cpu.FastCpuModel): its per-call test that model.params and
model.config (and model.dtype) are still what its fused copies were built from (FastCpuModel._sync: the tensors
by identity, their names by equality), on and off, over
--fast-steps decode steps of each side, and alone; then the same for the fast form's lock (FastCpuModel._lock:
calls from several threads take turns), against a form whose lock is a no-op.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from stablelm_ref import DEFAULT_MODEL, StableLmForCausalLM  # noqa: E402


PROMPT = [[11, 23, 5, 7, 42, 99, 3, 8]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="reference decode steps per side")
    parser.add_argument("--fast-steps", type=int, default=400, help="fast-form decode steps per side")
    args = parser.parse_args()
    reference(args.steps)
    fast(args.fast_steps)


def alternate(sides, steps, prompt):
    """{name: [seconds of each decode step]}, the sides' steps alternating in order, each through its own cache
    (restarted from the prompt at 256 positions)."""
    caches = {name: model(prompt, use_cache=True).past_key_values for name, model in sides.items()}
    times = {name: [] for name in sides}
    for step in range(steps):
        order = list(sides) if step % 2 == 0 else list(sides)[::-1]
        for name in order:
            if caches[name].length >= 256:
                caches[name] = sides[name](prompt, use_cache=True).past_key_values
            t0 = time.perf_counter()
            caches[name] = sides[name]([[7]], past_key_values=caches[name], use_cache=True,
                                       logits_to_keep=1).past_key_values
            times[name].append(time.perf_counter() - t0)
    return times


def alone(check):
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        check()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(what, times, check_alone, thing="the checks"):
    ms = {name: 1e3 * statistics.median(v) for name, v in times.items()}
    print(f"{what}, median of {len(times['checked'])}:")
    print(f"  with {thing:<13}{ms['checked']:8.3f} ms")
    print(f"  without it        {ms['unchecked']:8.3f} ms")
    print(f"  ratio             {ms['checked'] / ms['unchecked']:8.4f}  (with / without)")
    print(f"  {thing + ' alone':<18}{1e3 * check_alone:8.4f} ms (median of 2000), "
          f"{check_alone / statistics.median(times['unchecked']):.2%} of a step")


def reference(steps):
    checked = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL)
    unchecked = StableLmForCausalLM(checked.config, checked.params)
    unchecked._check_params = lambda: None
    sides = {"checked": checked, "unchecked": unchecked}
    report(f"default model ({checked.config.num_hidden_layers} layers, {len(checked.params)} tensors), reference "
           "decode step", alternate(sides, steps, PROMPT), alone(checked._check_params))


def fast(steps):
    checked = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL).fast()
    unchecked = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL).fast()
    unchecked._sync = lambda: None
    report("fast form (model.fast()), decode step", alternate({"checked": checked, "unchecked": unchecked}, steps,
                                                             PROMPT), alone(checked._sync))
    unlocked = StableLmForCausalLM.from_pretrained(DEFAULT_MODEL).fast()
    unlocked._lock = contextlib.nullcontext()
    lock = checked._lock
    def take_and_release():
        with lock:
            pass

    report("fast form, its lock (calls from several threads take turns), decode step",
           alternate({"checked": checked, "unchecked": unlocked}, steps, PROMPT), alone(take_and_release),
           thing="the lock")


if __name__ == "__main__":
    main()
