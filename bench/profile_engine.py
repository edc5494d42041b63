"""Where a paged-engine step spends its time: ``torch.profiler`` over decode steps at a given batch
size and context length (the figures in docs/engine.md, "Where the time goes").

    python -m bench.profile_engine --batch 32 --context 400      # decode steps, 32 x 400 tokens
    python -m bench.profile_engine --batch 1 --context 32 --no-pack

Random weights in the SmolLM2-135M shape (``bench/smollm_shape.py``); prints ms per step and the
profiler's table of the most expensive aten/oneDNN ops.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    import worker.engine  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=400, help="prompt tokens of every request")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps")
    ap.add_argument("--no-pack", action="store_true", help="without oneDNN-packed weights")
    ap.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import profile

    from bench.smollm_shape import make_artifact
    from protocol.messages import SamplingParams
    from worker.engine.api import EngineRequest
    from worker.engine.loader import load_engine

    model_dir = make_artifact(REPO / "var" / "bench", dtype="bfloat16")
    kv_tokens = args.batch * (args.context + 2 * args.steps + 64)
    settings = argparse.Namespace(max_batch=args.batch, max_num_batched_tokens=max(512, args.context),
                                  kv_cache_memory=kv_tokens * 48 * 1024, kv_block_size=16, torch_threads=0,
                                  cpu_packed_weights=not args.no_pack)
    engine = load_engine("paged", model_dir, "cpu", args.dtype, settings)
    for i in range(args.batch):
        prompt = [(i * 7919 + j) % 49000 + 1 for j in range(args.context)]
        engine.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=10**6,
                                                                          ignore_eos=True)))
    while engine.stats().running < args.batch or any(
            s.num_computed_tokens < s.num_tokens - 1 for s in engine.seqs.values()):
        engine.step()  # prefill everyone
    engine.step()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    per_step = (time.perf_counter() - start) / args.steps
    print(f"batch {args.batch}, context {args.context}, {engine.runner.dtype}, packed weights "
          f"{engine.runner.packed_weights}, {torch.get_num_threads()} threads: {per_step * 1000:.1f} ms per "
          f"decode step ({args.batch / per_step:.1f} tok/s)")
    with profile() as prof:
        for _ in range(3):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
