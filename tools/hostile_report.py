"""The worst time and memory of hostile inputs, one class at a time (the figures of the hostile-input note).

Each case runs in a fresh Python process: it imports the package, records its peak resident memory
(ru_maxrss), runs the case, and reports the wall time and how far the peak rose above that baseline
(a high-water mark: the most the case ever held at once, C allocations included). The outcome column
is the exception class and the start of its message (or "ok").

    .venv/bin/python tools/hostile_report.py            (about a minute; prints a Markdown table)
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import json, os, resource, sys, time, warnings
import numpy as np
sys.path.insert(0, os.path.join({root!r}, "tests"))
warnings.simplefilter("ignore")
from conftest import tiny_model
from stablelm_ref import StableLmForCausalLM, checkpoint, trace
from stablelm_ref.tokenizer import Tokenizer, render_chat_template
from stablelm_ref.config import StableLmConfig
from test_tokenizer import tiny_tokenizer_dir
W = {work!r}
def model_dir(path=os.path.join(W, "m"), **kw):
    if not os.path.isdir(path):
        tiny_model(seed=5, dtype="float32", vocab_size=320, max_position_embeddings=256, **kw).save_pretrained(path)
        tiny_tokenizer_dir(path)
    return path
"""

RUN = """
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.monotonic()
try:
    case()
    outcome = "ok"
except BaseException as e:
    outcome = type(e).__name__ + ": " + str(e).replace(W, "DIR")[:70]
dt = time.monotonic() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"outcome": outcome, "seconds": dt, "mib": (peak - base) / 1024}}))
"""

CASES = [
    ("1 template", "string doubling in a loop (~)", """
def case(): render_chat_template('{% set ns = namespace(x="a") %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}', messages=[])"""),
    ("1 template", "nested loops, empty bodies (10^10 steps)", """
def case(): render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", messages=[])"""),
    ("1 template", "format width 10^12", """
def case(): render_chat_template('{{ "%999999999999s"|format("x") }}', messages=[])"""),
    ("1 template", "lipsum(10^8)", """
def case(): render_chat_template("{{ lipsum(10**8) }}", messages=[])"""),
    ("2 files", "config.json is a FIFO", """
d = model_dir(); os.unlink(os.path.join(d, "config.json")); os.mkfifo(os.path.join(d, "config.json"))
def case(): StableLmForCausalLM.from_pretrained(d)"""),
    ("2 files", "tokenizer.json links to /dev/zero", """
d = model_dir(); os.unlink(os.path.join(d, "tokenizer.json")); os.symlink("/dev/zero", os.path.join(d, "tokenizer.json"))
def case(): Tokenizer.from_pretrained(d)"""),
    ("2 files", "tokenizer.json of 64 MiB + 1 (sparse)", """
d = model_dir(); f = open(os.path.join(d, "tokenizer.json"), "wb"); f.truncate(64 * 2**20 + 1); f.close()
def case(): Tokenizer.from_pretrained(d)"""),
    ("3 JSON", "100 MB safetensors header of [{},{},...]", """
p = os.path.join(W, "h.safetensors"); n = 100 * 2**20 // 3 - 1; f = open(p, "wb")   # written in chunks: the
f.write((3 * n + 4).to_bytes(8, "little") + b"[")                                   # baseline stays small
for _ in range(n // 2**16): f.write(b"{}," * 2**16)
f.write(b"{}," * (n % 2**16) + b"{}]"); f.close()
def case(): checkpoint.read_header(p)"""),
    ("3 JSON", "header at the item limit (83,330 one-key objects)", """
p = os.path.join(W, "h.safetensors"); head = b"[" + b",".join([b'{"":0}'] * 83330) + b"]"
open(p, "wb").write(len(head).to_bytes(8, "little") + head)
def case(): checkpoint.read_header(p)"""),
    ("3 JSON", "config.json with a 4,000-digit integer", """
d = model_dir(); open(os.path.join(d, "config.json"), "w").write('{"model_type": "stablelm", "vocab_size": ' + "9" * 4000 + "}")
def case(): StableLmForCausalLM.from_pretrained(d)"""),
    ("3 JSON", "config.json nested 10^6 deep", """
d = model_dir(); open(os.path.join(d, "config.json"), "w").write("[" * 10**6 + "]" * 10**6)
def case(): StableLmForCausalLM.from_pretrained(d)"""),
    ("4 sizes", "generate(max_new_tokens=10**12)", """
m = tiny_model(seed=1, dtype="float32")
def case(): m.generate([[1, 2, 3]], max_new_tokens=10**12)"""),
    ("4 sizes", "forward of 4096 rows x 4096 tokens", """
m = tiny_model(seed=1, dtype="float32", max_position_embeddings=4096); ids = np.ones((4096, 4096), dtype=np.int64)
def case(): m(ids)"""),
    ("5 text", "10 MB prompt, a lone surrogate at the end", """
tok = Tokenizer.from_pretrained(model_dir()); text = "a" * 10**7 + chr(0xDC80)
def case(): tok.encode(text)"""),
    ("6 numbers", "config rope_theta = 1e-300", """
d = model_dir(); c = json.load(open(os.path.join(d, "config.json"))); c["rope_parameters"]["rope_theta"] = 1e-300
json.dump(c, open(os.path.join(d, "config.json"), "w"))
def case(): StableLmForCausalLM.from_pretrained(d)"""),
    ("6 numbers", "weights that overflow float32: generate", """
m = tiny_model(seed=2, dtype="float32"); m.params["model.layers.1.mlp.down_proj.weight"][:] = 3e38
def case(): m.generate([[1, 2, 3]], max_new_tokens=3)"""),
    ("6 numbers", "temperature 1e-300, 32 sampled tokens", """
m = tiny_model(seed=4, dtype="float32", eos_token_id=None)
def case(): m.generate([[5, 17, 33]], max_new_tokens=32, do_sample=True, temperature=1e-300, seed=0)"""),
    ("7 CLI", "compare: a tensor of 10,000 dimensions", """
p = os.path.join(W, "t.safetensors"); head = json.dumps({"a": {"dtype": "F32", "shape": [1] * 10000, "data_offsets": [0, 4]}}).encode()
open(p, "wb").write(len(head).to_bytes(8, "little") + head + bytes(4))
def case(): trace.read_trace(p)"""),
    ("7 CLI", "compare: metadata 'order' nested 10^5 deep", """
p = os.path.join(W, "t.safetensors"); checkpoint.save_file({"a": np.zeros(2, np.float32)}, p, {"order": "[" * 10**5 + "]" * 10**5})
def case(): trace.read_trace(p)"""),
    ("8 API", "token labels of the wrong shape", """
from stablelm_ref.heads import StableLmForTokenClassification
m = tiny_model(seed=1, cls=StableLmForTokenClassification, num_labels=3)
def case(): m([[1, 2, 3, 4]], labels=[1, 2, 0, 1])"""),
    ("8 API", "position ids 2**64 - 1 (uint64)", """
m = tiny_model(seed=1)
def case(): m([[1, 2]], position_ids=np.array([[0, 2**64 - 1]], dtype=np.uint64))"""),
    ("9 outputs", "chat with stdin from /dev/zero (no newline)", """
from stablelm_ref.cli import main
d = model_dir(); sys.stdin = open("/dev/zero")
def case(): raise SystemExit(main(["chat", "--model", d, "--max-new-tokens", "1"]))"""),
    ("9 outputs", "trace --out naming the model's model.safetensors", """
from stablelm_ref.cli import main
d = model_dir()
def case(): raise SystemExit(main(["trace", "--model", d, "--ids", "1,2", "--out", os.path.join(d, "model.safetensors")]))"""),
    ("9 outputs", "tokenizer.json regex that gives up on a text (a Rust panic)", """
d = model_dir(); p = os.path.join(d, "tokenizer.json"); t = json.load(open(p))
t["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
json.dump(t, open(p, "w")); tok = Tokenizer.from_pretrained(d)
def case(): tok.encode("a" * 40 + "!")"""),
]


def main():
    for cls, name, body in CASES:
        with tempfile.TemporaryDirectory() as work:
            code = PRELUDE.format(root=ROOT, work=work) + textwrap.dedent(body) + RUN.format()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": ROOT})
        try:
            res = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            res = {"outcome": f"process failed: {r.stderr.strip().splitlines()[-1:]}", "seconds": float("nan"),
                   "mib": float("nan")}
        print(f"| {cls} | {name} | {res['outcome']} | {res['seconds']:.2f} | {res['mib']:.0f} |", flush=True)


if __name__ == "__main__":
    print("| class | hostile input | outcome | seconds | peak MiB above baseline |")
    print("|---|---|---|---:|---:|")
    main()
