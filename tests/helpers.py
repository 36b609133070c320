"""Shared test helpers: tiny trained HF causal LMs, their data, dense float64 Hessians as references, and flat
vector utilities. Imported as a module (``from helpers import ...``) by tests and by the worker scripts that
tests start; ``conftest.py`` keeps only fixtures and pytest hooks."""

from __future__ import annotations

import math

import torch
from torch.func import functional_call

from hessian_core import causal_lm_loss, float64_rmsnorm

VOCAB = 32
ARCHS = ("gpt_neox", "llama", "qwen2")


def tiny_config(arch: str, *, hidden: int = 8, layers: int = 1, vocab: int = VOCAB):
    from transformers import GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=64, attn_implementation="sdpa")
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common, hidden_dropout=0.1, attention_dropout=0.1)
    if arch == "llama":
        return LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=False)
    raise ValueError(arch)


def make_batches(*, num_batches: int = 2, batch_size: int = 2, seq_len: int = 8, vocab: int = VOCAB,
                 seed: int = 0) -> list[torch.Tensor]:
    """Sequences with learnable structure (noisy arithmetic progressions mod vocab)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_batches):
        start = torch.randint(0, vocab, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        seq = (start + stride * torch.arange(seq_len)) % vocab
        noise = torch.rand(batch_size, seq_len, generator=g) < 0.1
        seq = torch.where(noise, torch.randint(0, vocab, (batch_size, seq_len), generator=g), seq)
        out.append(seq)
    return out


def make_tiny_model(arch: str, *, dtype: torch.dtype = torch.float64, seed: int = 0, train_steps: int = 30,
                    hidden: int = 8, layers: int = 1):
    """A tiny model trained a few Adam steps (so its Hessian is not that of random init), in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, hidden=hidden, layers=layers), dtype=torch.float64)
    data = make_batches(num_batches=4, batch_size=4, seed=seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for step in range(train_steps):
        opt.zero_grad()
        causal_lm_loss(model, data[step % len(data)]).backward()
        opt.step()
    model.eval()
    model.to(dtype)
    float64_rmsnorm(model)
    return model


def flat_params(model) -> tuple[list[str], list[torch.Size], torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    return names, shapes, flat


def dense_hessian(model, batches) -> torch.Tensor:
    """The full Hessian of the analysis loss over the flattened parameters, row by row through autograd.

    torch.autograd.functional.hessian, not torch.func.hessian: on GPT-NeoX the vmapped torch.func version
    returns a Hessian that is 6% asymmetric (in torch 2.13), while this one is symmetric to 1e-16. Its rows
    vectorized (one batched backward) agree with the row-by-row loop to 3e-17 on the tiny models, in a tenth
    of the time.
    """
    names, shapes, flat = flat_params(model)
    sizes = [math.prod(s) for s in shapes]

    def loss_of(theta):
        params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
        return sum(causal_lm_loss(_Bound(model, params), b) for b in batches) / len(batches)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss_of, flat, vectorize=True)


class _Bound(torch.nn.Module):
    """Calls ``model`` with substituted parameters (so causal_lm_loss can be reused under torch.func)."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, **kwargs):
        return functional_call(self.model, self.params, args=(), kwargs=kwargs)


def flatten(vec) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in vec])


def unflatten_like(flat: torch.Tensor, model) -> list[torch.Tensor]:
    out, i = [], 0
    for _, p in model.named_parameters():
        out.append(flat[i:i + p.numel()].reshape(p.shape).to(p.dtype))
        i += p.numel()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def dense_gauss_newton(model, batches) -> torch.Tensor:
    """The Gauss-Newton matrix of the analysis loss, sum over counted tokens of J_t^T (diag p_t - p_t p_t^T) J_t
    divided by the set's counted tokens, with J_t the Jacobian of token t's logits w.r.t. the flattened parameters
    (torch.func.jacrev through functional_call) and the counted tokens found from the labels, the attention mask
    and -100 directly (not through hessian_core)."""
    from torch.func import jacrev
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names, shapes, flat = flat_params(model)
    sizes = [math.prod(s) for s in shapes]
    total, count = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64), 0
    for b in batches:
        b = {"input_ids": b} if isinstance(b, torch.Tensor) else b
        mask = b.get("attention_mask")

        def logits_of(theta, b=b, mask=mask):
            params = {n: t.reshape(s) for n, t, s in zip(names, torch.split(theta, sizes), shapes)}
            return functional_call(model, params, args=(), kwargs=dict(input_ids=b["input_ids"], attention_mask=mask,
                                                                         use_cache=False)).logits

        with sdpa_kernel(SDPBackend.MATH):
            logits = logits_of(flat).detach()
            jac = jacrev(logits_of)(flat)  # [batch, seq, vocab, P]
        labels = b.get("labels", b["input_ids"])
        keep = labels[:, 1:] != -100
        if mask is not None:
            keep &= mask[:, 1:] == 1
        for i, t in keep.nonzero().tolist():
            p = torch.softmax(logits[i, t].double(), dim=-1)
            j = jac[i, t].double()
            total += j.T @ ((torch.diag(p) - torch.outer(p, p)) @ j)
            count += 1
    return total / count
