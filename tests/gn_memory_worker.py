"""Peak host memory (VmHWM) of one Gauss-Newton product and of one gradient pass on a 1-layer, hidden-64 Llama with
a 50k vocabulary (2 x 512 tokens, float32), printed as JSON. Run as its own process with glibc's mmap threshold
fixed (MALLOC_MMAP_THRESHOLD_): every large tensor is then its own mapping, returned at free, so the peak RSS
follows the live tensors to ~0.1 MiB instead of wandering with what the heap keeps."""

from __future__ import annotations

import json
import sys

import torch

from hessian_core import (AnalysisLoss, GaussNewtonOperator, ParamSpace, accumulate_gradient,
                          gauss_newton_extra_bytes, probe_vector)
from hessian_core.profiling import PeakMemory

VOCAB, SEQ, ROWS, HIDDEN = 50_000, 512, 2, 64


def main(chunks: list[int]) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=2 * HIDDEN, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    batches = [torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))]
    space = ParamSpace(model)
    loss = AnalysisLoss(batches, space=space)
    v = probe_vector(space, seed=0, probe_index=0)
    memory = PeakMemory(space.device)

    def peak(fn) -> float:
        fn()  # warm-up: the FD backup and the allocator's first mappings
        base = memory.reset()
        out = fn()
        mib = memory.peak() - base
        del out
        return mib

    def gradient():
        accumulate_gradient(model, batches, loss=loss)
        model.zero_grad(set_to_none=True)

    result = {"gradient_mib": peak(gradient), "tokens": ROWS * SEQ, "vocab": VOCAB,
              "param_mib": space.local_numel * 4 / 2**20, "gauss_newton": {}}
    for chunk in chunks:
        op = GaussNewtonOperator(model, batches, eps=1e-3, space=space, chunk_tokens=chunk)
        formula = gauss_newton_extra_bytes(tokens_per_batch=ROWS * SEQ, vocab=VOCAB, chunk_tokens=chunk,
                                           dtype=torch.float32) / 2**20
        result["gauss_newton"][chunk] = {"peak_mib": peak(lambda op=op: op.matvec(v)), "formula_mib": formula}
    return result


if __name__ == "__main__":
    print(json.dumps(main([int(c) for c in sys.argv[1:]])))
