"""GPT-2 forward pass with the semantics of transformers' GPT2LMHeadModel, in NumPy, from a
Lathe checkpoint directory's config.json and model.safetensors alone. Prints the mean
cross-entropy of a byte-tokenized text. Used by trainer/tests/train_safety.rs where Python has
numpy and safetensors: python3 hf_gpt2_reference.py STEP_DIR TEXT_FILE"""
import json, sys, numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
cfg = json.load(open(d + "/config.json"))
W = load_file(d + "/model.safetensors")
toks = np.frombuffer(open(sys.argv[2], "rb").read(), dtype=np.uint8).astype(np.int64)
x_ids, y_ids = toks[:-1], toks[1:]
C, H, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
eps = cfg["layer_norm_epsilon"]
def ln(x, w, b):
    m = x.mean(-1, keepdims=True); v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b
def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
T = len(x_ids)
h = W["wte.weight"][x_ids] + W["wpe.weight"][:T]
h = h.astype(np.float64)
for i in range(L):
    p = lambda n: W[f"h.{i}.{n}"].astype(np.float64)
    a = ln(h, p("ln_1.weight"), p("ln_1.bias"))
    qkv = a @ p("attn.c_attn.weight") + p("attn.c_attn.bias")
    q, k, v = np.split(qkv, 3, axis=-1)
    D = C // H
    q = q.reshape(T, H, D).transpose(1, 0, 2); k = k.reshape(T, H, D).transpose(1, 0, 2); v = v.reshape(T, H, D).transpose(1, 0, 2)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(D)
    s = s + np.triu(np.full((T, T), -np.inf), 1)
    s = np.exp(s - s.max(-1, keepdims=True)); s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(1, 0, 2).reshape(T, C)
    h = h + o @ p("attn.c_proj.weight") + p("attn.c_proj.bias")
    m = ln(h, p("ln_2.weight"), p("ln_2.bias"))
    h = h + gelu(m @ p("mlp.c_fc.weight") + p("mlp.c_fc.bias")) @ p("mlp.c_proj.weight") + p("mlp.c_proj.bias")
h = ln(h, W["ln_f.weight"], W["ln_f.bias"])
logits = h @ W["wte.weight"].astype(np.float64).T
assert logits.shape[-1] == cfg["vocab_size"]
lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
loss = (lse - logits[np.arange(T), y_ids]).mean()
print(f"{loss:.8f}")
