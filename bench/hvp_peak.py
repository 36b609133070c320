"""Peak RSS of one finite-difference HVP on CPU, over the RSS before it, for the code on ``sys.path``.

    python bench/hvp_peak.py [--hidden 768] [--layers 12] [--vocab 16384] [--tokens 256] [--dtype float32]

Builds a GPT-NeoX of the given shape (random init, one process, no Ray), runs one warm-up HVP (so that the
operator's parameter backup and the allocator's pools exist, as they do from a probe's second step on), resets
the peak (``/proc/self/clear_refs``), runs one more HVP and prints, as one JSON line, the parameter count, the
bytes of one parameter-sized buffer, and the growth of the peak RSS (VmHWM) over the RSS before the step:
what the step holds beyond the model and its backup. Same method as ``plan_check.py``: RSS, glibc's allocator
slack included; set MALLOC_MMAP_THRESHOLD_=1048576 to return freed blocks of 1 MiB and more at once.
It imports the installed package, or the checkout on PYTHONPATH: to compare two versions of the code, run it
once with each checkout on PYTHONPATH, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    import hessian_core
    from hessian_core import FiniteDifferenceHVP, ParamSpace, probe_vector
    from plan_check import _rss  # after hessian_core: plan_check puts its own checkout first on sys.path

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = GPTNeoXConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden,
                           max_position_embeddings=max(args.tokens, 128), attn_implementation="sdpa")
    model = GPTNeoXForCausalLM(config).to(dtype).eval()
    batches = [torch.randint(0, args.vocab, (1, args.tokens))]
    space = ParamSpace(model)
    v = probe_vector(space, seed=0, probe_index=0, dtype=torch.float32)
    op = FiniteDifferenceHVP(model, batches, eps=1e-2, space=space)
    op.matvec(v)  # warm-up: the backup exists from here on, as in every Lanczos step after the first
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _rss("VmRSS")
    hv = op.matvec(v)
    peak = _rss("VmHWM")
    del hv
    buffer = space.local_numel * torch.tensor([], dtype=op.out_dtype).element_size()
    print(json.dumps({"code": os.path.dirname(os.path.abspath(hessian_core.__file__)), "num_params": space.numel,
                      "dtype": args.dtype, "tokens": args.tokens, "buffer_bytes": buffer,
                      "step_peak_growth_bytes": peak - before,
                      "step_peak_growth_buffers": round((peak - before) / buffer, 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
