"""Record a transformers StableLmForCausalLM's intermediates under stablelm-ref's trace names.

    python tools/trace_transformers.py --model DIR (--ids 1,2,3 | --text "...") [--mask 1,1,1]
                                       [--dtype float32|float64|bfloat16] [--exact] --out hf.safetensors
    stablelm-ref compare ours.safetensors hf.safetensors

The trace file has the same format as `stablelm-ref trace` (stablelm_ref.trace.write_trace), so one
`compare` command checks the two implementations against each other, tensor by tensor.

How each name is recorded (forward hooks on transformers' modules, whose names are the checkpoint's):

    model.embed_tokens, ...input_layernorm, ...post_attention_layernorm, ...o_proj, ...mlp.gate_proj,
    ...mlp.up_proj, ...mlp.down_proj, model.layers.{i}, model.norm, lm_head      module outputs
    ...self_attn.{q,k,v}_proj       q_proj/k_proj/v_proj outputs [B, T, H*D] -> [B, H, T, D] (our layout)
    ...self_attn.{q,k}_layernorm    StableLmLayerNormPerHead outputs (already [B, H, T, D])
    ...mlp.act                      the input of down_proj (a pre-hook): act(gate) * up, as ours
    ...self_attn.rotary_q/rotary_k, attn_weights, attn_output
                                    a registered attention function (transformers' AttentionInterface)
                                    that wraps transformers' own eager_attention_forward and records the
                                    query and key it receives (after rotary, keys before repeat_kv, [B, KVH,
                                    S, D] as ours), the probabilities it returns, and its output moved back
                                    from [B, T, H, D] to [B, H, T, D].
Nothing is omitted: every name of stablelm-ref's trace is recorded faithfully, from a model loaded by
load_transformers_model or by transformers' own from_pretrained (sdpa or flash attention included: the
tracing attention is switched in for the traced call, then switched back); a pass that records fewer
attention names than every layer's is an error, never a shorter trace.

Numerics: transformers computes the rotary cos/sin tables and the eager softmax in float32 even in
a float64 model, so a float64 transformers trace matches a float64 stablelm-ref trace to ~1e-8 of
scale from rotary_q of layer 0 on, not to 1e-12. `--exact` computes those two steps in the model's
dtype (a forward hook replaces the rotary tables; the attention function does its softmax in
float64); everything else stays transformers' code, so float64 against float64 then agrees to
rounding. The trace metadata ("compute") says which was used.

Needs torch and transformers (`pip install '.[crosscheck]'`); stablelm-ref itself never imports them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablelm_ref.checkpoint import checkpoint_files  # noqa: E402
from stablelm_ref.errors import GenerationError, StableLmError  # noqa: E402
from stablelm_ref.trace import check_trace_output, ids_and_mask, text_ids, write_trace  # noqa: E402

ATTENTION_NAME = "stablelm_ref_trace"
LAYER_OUTPUTS = ("input_layernorm", "post_attention_layernorm", "q_layernorm", "k_layernorm", "o_proj", "gate_proj",
                 "up_proj", "down_proj")
_state = {"record": None, "exact": False}


def _numpy(t):
    """A torch tensor -> a NumPy array of the same dtype (bfloat16 through ml_dtypes)."""
    import torch

    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)  # exact: every bfloat16 is a float32
    return t.numpy().copy()


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, recording what goes in and comes out (see the module docstring)."""
    import torch
    from transformers.models.stablelm import modeling_stablelm as ms

    if _state["exact"]:  # eager_attention_forward with the softmax in query.dtype
        k, v = ms.repeat_kv(key, module.num_key_value_groups), ms.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.nn.functional.softmax(scores, dim=-1, dtype=query.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    else:
        out, weights = ms.eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                                  dropout=dropout, **kwargs)
    record = _state["record"]
    if record is not None:
        p = f"model.layers.{module.layer_idx}.self_attn."
        record(p + "rotary_q", query)                       # [B, H, T, D]
        record(p + "rotary_k", key)                         # [B, KVH, S, D]
        record(p + "attn_weights", weights)                 # [B, H, T, S]
        record(p + "attn_output", out.transpose(1, 2))      # [B, T, H, D] -> [B, H, T, D]
    return out, weights


def _register_attention():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # the additive float mask eager attention takes


def load_transformers_model(model_dir, dtype="float32"):
    """transformers' StableLmForCausalLM from a model directory, in `dtype`, with the tracing attention (eval
    mode). trace_transformers takes a model loaded any other way too: it switches the attention for its call."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise StableLmError(f"tracing transformers needs torch and transformers ({e}): "
                            "pip install 'stablelm-ref[crosscheck]'") from None
    _register_attention()
    checkpoint_files(model_dir)             # safetensors only: a pickle checkpoint (pytorch_model.bin) is refused
    torch_dtype = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.StableLmForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, use_safetensors=True,
                                                            attn_implementation=ATTENTION_NAME)
    return model.eval()


def _exact_rotary(module, args, kwargs, output):
    """--exact: the rotary cos/sin tables computed in float64 (transformers computes them in float32)."""
    import torch

    config = module.config
    rope = config.rope_parameters
    if rope.get("rope_type", "default") != "default":
        raise StableLmError(f"--exact supports the default rotary embedding only, not rope_type "
                            f"{rope['rope_type']!r}; trace without --exact")
    x = args[0]
    position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
    dim = int(config.hidden_size // config.num_attention_heads * rope.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # [d/2]
    freqs = position_ids[..., None].to(torch.float64) * inv_freq                 # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                      # [B, T, d]
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


_ATTENTION_NAMES = ("rotary_q", "rotary_k", "attn_weights", "attn_output")


def trace_transformers(model, input_ids, attention_mask=None, position_ids=None, exact=False):
    """One forward pass -> (logits [B, T, vocab] as NumPy, {name: NumPy array} in execution order).

    `model` is a transformers StableLmForCausalLM, loaded by load_transformers_model or any other way: the
    tracing attention function is switched in for this one call (set_attn_implementation; a model loaded with
    sdpa or flash attention never calls it, and recorded no rotary_q/rotary_k/attn_weights/attn_output) and the
    model runs in eval mode (no dropout); both are restored afterwards. Another architecture is refused, and so
    is a pass that records fewer names than every layer's (a StableLmError).

    exact=True computes transformers' two float32 steps (rotary tables, eager softmax) in the model's
    dtype instead: for float64 against float64 checks; the rest is transformers' code unchanged."""
    import torch

    if getattr(model.config, "model_type", None) != "stablelm":
        raise StableLmError(f"trace_transformers traces transformers' StableLmForCausalLM, got a "
                            f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r}); "
                            "load one with load_transformers_model(model_dir, dtype)")

    recorded = {}
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads

    def record(name, t):
        if name in recorded:
            raise StableLmError(f"trace name {name!r} recorded twice")
        recorded[name] = _numpy(t)

    def output_hook(name, split_heads=False):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if split_heads:
                b, t, _ = out.shape
                out = out.view(b, t, -1, head_dim).transpose(1, 2)  # [B, T, H*D] -> [B, H, T, D]
            record(name, out)
        return hook

    def act_hook(name):
        def hook(module, args):
            record(name, args[0])                            # the input of down_proj: act(gate) * up
        return hook

    handles = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        top = name in ("model.embed_tokens", "model.norm", "lm_head") or re.fullmatch(r"model\.layers\.\d+", name)
        if top or (name.startswith("model.layers.") and last in LAYER_OUTPUTS):
            handles.append(module.register_forward_hook(output_hook(name)))
        if last in ("q_proj", "k_proj", "v_proj"):
            handles.append(module.register_forward_hook(output_hook(name, split_heads=True)))
        if last == "down_proj":
            handles.append(module.register_forward_pre_hook(act_hook(name.rsplit(".", 1)[0] + ".act")))
        if name == "model.rotary_emb" and exact:
            handles.append(module.register_forward_hook(_exact_rotary, with_kwargs=True))
    _register_attention()
    attention, training = model.config._attn_implementation, model.training
    _state["record"], _state["exact"] = record, exact
    try:
        if attention != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)      # records rotary q/k, the weights and the output
        model.eval()
        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))
            kw = {}
            if attention_mask is not None:
                kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
            if position_ids is not None:
                kw["position_ids"] = torch.as_tensor(np.asarray(position_ids, dtype=np.int64))
            logits = model(ids, use_cache=False, **kw).logits
    finally:
        _state["record"], _state["exact"] = None, False
        for h in handles:
            h.remove()
        if attention != ATTENTION_NAME:
            model.set_attn_implementation(attention)
        model.train(training)
    missing = [f"model.layers.{i}.self_attn.{n}" for i in range(config.num_hidden_layers) for n in _ATTENTION_NAMES
               if f"model.layers.{i}.self_attn.{n}" not in recorded]
    if missing:
        raise StableLmError(f"the forward pass recorded no {missing[0]} ({len(missing)} attention names missing): "
                            f"the model's attention ({model.config._attn_implementation!r}) did not go through the "
                            "tracing attention function (an attention module of its own that does not call "
                            "transformers' attention interface?); trace a StableLmForCausalLM as transformers ships it")
    return _numpy(logits), recorded


def main(argv=None):
    parser = argparse.ArgumentParser(description="Trace transformers' StableLM with stablelm-ref's names.",
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="model directory (config.json + model.safetensors)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ids", help="comma-separated token ids; a padded batch: rows separated by ';' with --mask")
    parser.add_argument("--mask", metavar="ROWS", help="attention mask of the --ids rows, rows separated by ';' "
                                                       "(0: padding, 1: token), recorded in the trace")
    src.add_argument("--text", help="text, tokenized with stablelm-ref's tokenizer")
    parser.add_argument("--dtype", choices=("float64", "float32", "bfloat16"), default="float32")
    parser.add_argument("--exact", action="store_true",
                        help="compute the rotary tables and the softmax in the model's dtype, not float32 as "
                             "transformers does (for float64 against float64 checks)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        check_trace_output(args.out, "--out")             # before loading: --out never replaces a non-trace
        if not args.model:
            raise StableLmError("--model is empty (''): give a model directory holding config.json and "
                                "model.safetensors")
        ids, mask, tok = ((*ids_and_mask(args.ids, args.mask), None) if args.ids is not None
                          else text_ids(args.model, args.text, args.mask))
        model = load_transformers_model(args.model, args.dtype)
        vocab = model.config.vocab_size
        if tok is not None:
            tok.check_vocabulary(vocab, args.model)
        bad = [i for row in ids for i in row if not 0 <= i < vocab]     # torch's embedding: an IndexError
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        _, trace = trace_transformers(model, ids, attention_mask=mask, exact=args.exact)   # positions 0..T-1
        import torch
        import transformers

        how = ("transformers' eager attention; rotary tables and softmax in float32" if not args.exact else
               f"transformers' eager attention, --exact: rotary tables and softmax in {args.dtype}")
        meta = {"model": args.model, "dtype": args.dtype, "device": "cpu", "ids": ids, "compute": how,
                "producer": f"transformers {transformers.__version__} (torch {torch.__version__})"}
        write_trace(args.out, trace, meta if mask is None else {**meta, "attention_mask": mask.tolist()})
    except StableLmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(trace)} tensors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
