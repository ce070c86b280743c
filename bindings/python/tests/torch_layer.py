"""A Llama-style attention layer's tensors for the kvpress tests: a module with the attributes
kvpress's presses read, hidden states, post-RoPE keys/queries and the full causal attention
matrix (what kvpress gets with eager attention), all in float32 from one seed."""
import math
from types import SimpleNamespace

import torch


class FakeAttention(torch.nn.Module):
    """The attributes kvpress's presses read from a Llama-style attention layer."""

    def __init__(self, hq, hkv, d, hidden, layer_idx=0):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=hq, num_key_value_heads=hkv)
        self.head_dim = d
        self.layer_idx = layer_idx
        self.q_proj = torch.nn.Linear(hidden, hq * d, bias=False)


def rope_tables(batch, n, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[None].expand(batch, n, d).contiguous(), emb.sin()[None].expand(batch, n, d).contiguous()


def rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]], dim=-1)


def make_layer(batch, hq, hkv, d, hidden, n, seed=0):
    torch.manual_seed(seed)
    module = FakeAttention(hq, hkv, d, hidden).eval()
    hidden_states = torch.randn(batch, n, hidden)
    keys = torch.randn(batch, hkv, n, d)
    values = torch.randn(batch, hkv, n, d)
    cos, sin = rope_tables(batch, n, d)
    with torch.no_grad():
        q = module.q_proj(hidden_states).view(batch, n, hq, d).transpose(1, 2)
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        k_rep = keys.repeat_interleave(hq // hkv, dim=1)
        logits = q @ k_rep.transpose(2, 3) / math.sqrt(d)
        logits = logits + torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        attn = torch.softmax(logits, dim=-1)
    return SimpleNamespace(module=module, hidden=hidden_states, keys=keys, values=values, queries=q,
                           logits=logits, attn=attn, kwargs={"position_embeddings": (cos, sin)})
