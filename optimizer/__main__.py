"""``python -m optimizer <name> --passes bf16,int8``: run optimizer passes on an artifact.

Reads ARTIFACTS_DIR / BUNDLED_MODELS_DIR like every service; writes ``<name>-<pass>`` into
ARTIFACTS_DIR. Exit status 0 when every pass passed its gate, 1 when a gate failed, 2 on a bad request.
"""

from __future__ import annotations

import argparse
import json
import sys

from optimizer import quality
from optimizer.passes import PASSES, GateFailed, OptimizeError, optimize
from protocol.artifacts import ArtifactStore, InvalidModelName
from protocol.logs import setup_logging
from protocol.settings import ManagerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="source model name in the artifact volume (or bundled)")
    parser.add_argument("--passes", default="bf16,int8", help=f"comma-separated, from: {','.join(PASSES)}")
    parser.add_argument("--max-perplexity-ratio", type=float, default=None,
                        help="override every pass's perplexity tolerance (candidate/source)")
    parser.add_argument("--min-top1-agreement", type=float, default=None,
                        help="override every pass's greedy top-1 agreement threshold")
    parser.add_argument("--max-eval-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    settings = ManagerSettings()
    setup_logging("optimizer", settings.log_level, "text")
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    gates = {}
    for p in passes:
        base = quality.DEFAULT_GATES.get(p, quality.Gate(1.05, 0.9))
        gates[p] = quality.Gate(args.max_perplexity_ratio or base.max_perplexity_ratio,
                                args.min_top1_agreement if args.min_top1_agreement is not None
                                else base.min_top1_agreement)
    store = ArtifactStore(settings.artifacts_dir, settings.bundled_models_dir)

    def progress(stage: str, message: str = "", fraction: float = 0.0) -> None:
        print(f"[{fraction * 100:5.1f}%] {stage}: {message}", file=sys.stderr)

    try:
        results = optimize(store, args.name, passes, gates=gates, progress=progress,
                           max_eval_tokens=args.max_eval_tokens, min_free_bytes=settings.min_free_disk_bytes)
        code = 0
    except GateFailed as e:
        results, code = e.results, 1
        print(f"error: {e}", file=sys.stderr)
    except (OptimizeError, InvalidModelName) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps({"pass": r.pass_name, "output": r.output if r.passed else None, "passed": r.passed,
                          "quality": r.quality, "reason": r.reason}))
    return code


if __name__ == "__main__":
    sys.exit(main())
