"""What `model.generate` adds to the GPU decode step: the same engine stepped four ways, in one process.

    python tools/loop_probe.py                          # stablelm-3b-4e1t shapes, batch 1, greedy, 128 + 128 tokens
    python tools/loop_probe.py --shapes 2-1.6b --rounds 5

One model (random bf16 weights, bench_gpu.build_model) and its engine (built by a warm-up generate, so the
same tuning and cache size as generate's); each form decodes `new - 1` tokens after the same prompt, in
alternating rounds, ms a token (host clock from the first step's launch to the last token on the host):

  graphs      the step's graph replayed back to back (no host reads): what the GPU needs
  + copies    each replay followed by a copy of its picks into pinned memory in the stream, none read
  EngineSteps generate's step backend alone (fast_gpu.EngineSteps.step one step ahead + read_chosen)
  generate    model.generate(ids, max_new_tokens=new): decode_s / decode_tokens from its timings
  generate, no fit / copies / neither
              the same with the engine's attention grid for max_len (att_fit False), or its picks copied
              into pinned memory in the stream instead of written by the step into mapped memory (ring None)
  generate, argmax one block
              the argmax reading each row with one block, not a cluster of ARGMAX_CLUSTER
  generate, sampling / penalty / temperature
              generate with DECODING's settings (the step's sampler kernels instead of the argmax)

The differences say where generate's time beyond the step goes: the copy's place in the stream, the host's
read and the one-step-ahead queue, generation.py's loop; and what att_fit and the ring each save.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import FAMILY, build_model  # noqa: E402


def log(*a):
    print(*a, flush=True)


@contextlib.contextmanager
def engine_settings(e, form):
    """The engine as `form` names it (att_fit off, the picks copied), put back after."""
    fit, ring = e.att_fit, e.ring
    e.att_fit = fit and "no fit" not in form and "neither" not in form
    if "copies" in form or "neither" in form:
        e.ring = None
    if "argmax one block" in form:
        e.k.argmax_cluster = lambda: 0
    e.reset_plans()
    try:
        yield
    finally:
        e.att_fit, e.ring = fit, ring
        e.k.__dict__.pop("argmax_cluster", None)
        e.reset_plans()


DECODING = {   # generate forms with other decoding settings (the step's sampler in the argmax's place)
    "sampling": dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=0),   # bench_gpu's sampling
    "penalty": dict(repetition_penalty=1.2),                   # greedy with a repetition penalty: sample_step
    "temperature": dict(do_sample=True, temperature=0.8, top_k=0, seed=0),           # every token: sample_step
}


def run_form(model, form, ids, new):
    """ms a decoded token (new - 1 tokens after the prefill's) for one form."""
    if form.startswith("generate"):
        kw = next((v for k, v in DECODING.items() if form == f"generate, {k}"), {})
        with engine_settings(model.fast().engine, form):
            model.generate(ids, max_new_tokens=new, **kw)                # (captures its graphs)
            t = {}
            model.generate(ids, max_new_tokens=new, timings=t, **kw)
        return 1e3 * t["decode_s"] / t["decode_tokens"]
    return min(engine_loop(model, form, ids, new) for _ in range(2))    # the first captures the graphs


def engine_loop(model, form, ids, new):
    prompt = ids.shape[1]
    steps = model.fast().decode_steps(1, prompt + new)
    with steps.context():
        e = steps.engine
        e.use_sampler(None)
        mask = np.ones((1, prompt), np.int64)
        logits = steps.prefill(ids, mask, np.arange(prompt)[None])
        first = e.cp.argmax(logits.astype(e.cp.float32), axis=-1)
        e.set_tokens(first)
        e.capture(1)
        e.synchronize()
        n = new - 1
        t0 = time.perf_counter()
        if form == "graphs":
            for _ in range(n):
                e.decode_step()
            e.synchronize()
        elif form == "+ copies":
            for _ in range(n):
                e.decode_step()
                e.cp.asnumpy(e.tok_flags, stream=e.stream, out=e.picks_host, blocking=False)
            e.synchronize()
        elif form == "EngineSteps":
            chosen = steps.chosen_ids()
            for i in range(n):
                steps.step(None, chosen, None, None, fused=True)
                steps.read_chosen()
        else:
            raise ValueError(form)
        return 1e3 * (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="3b-4e1t", choices=list(FAMILY))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--forms", nargs="*", default=["graphs", "+ copies", "EngineSteps", "generate", "generate, no fit",
                                                   "generate, copies", "generate, neither",
                                                   "generate, argmax one block"])
    args = ap.parse_args()
    model = build_model(FAMILY[args.shapes], args.layers)
    ids = np.random.default_rng(0).integers(2, model.config.vocab_size, (1, args.prompt))
    model.generate(ids, max_new_tokens=args.new)                  # builds and tunes the engine, captures
    e = model.fast().engine
    log(f"{args.shapes}: engine max_len {e.max_len}, attention splits "
        f"{e.k.attention_splits(1, e.KVH, e.max_len)} at most, fitted {e.att_fit}, cluster {e.att_cluster}, picks "
        f"{'into mapped memory' if e.ring is not None else 'copied'}")
    got = {f: [] for f in args.forms}
    for _ in range(args.rounds):
        for f in args.forms:
            got[f].append(run_form(model, f, ids, args.new))
    base = float(np.median(got[args.forms[0]]))
    for f in args.forms:
        ms = float(np.median(got[f]))
        log(f"{f:12s} {ms:.4f} ms a token  {1e3 / ms:6.1f} tok/s  ({ms - base:+.4f} vs {args.forms[0]}; all "
            f"{', '.join(f'{v:.4f}' for v in got[f])})")


if __name__ == "__main__":
    main()
