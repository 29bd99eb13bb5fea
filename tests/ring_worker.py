"""One device of a ring in the ring tests: a forward, then a greedy generate, through hermes.ring's driver; writes
what rank 0 got and every rank's figures as JSON. Run by tests/test_ring.py as a separate process per rank."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--address", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--budget", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--stages", default=None)
    p.add_argument("--laps", type=int, default=1)
    p.add_argument("--ids", default="5,6,7,8,9,10,11")
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--slow", action="store_true", help="print 'reading' and sleep before each unit read")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--threads", type=int, default=2, help="this device's compute threads (torch.set_num_threads)")
    a = p.parse_args()

    import torch

    import hermes
    from hermes.errors import HermesError
    from hermes.ring import Ring, RingSpec
    from hermes.ring.driver import ring_forward, ring_generate

    if a.slow:
        load = hermes.load

        def slow_load(*args, **kwargs):
            model = load(*args, **kwargs)

            def slow(unit):
                print("reading", flush=True)
                time.sleep(0.2)

            model.hermes.before_read = slow
            return model

        hermes.load = slow_load
    torch.set_num_threads(a.threads)
    seen: dict[str, set[int]] = {"own": set(), "remote": set()}  # the threads each kind of block ran with
    load_threads = hermes.load

    def watched_load(*args, **kwargs):
        model = load_threads(*args, **kwargs)
        stage = model.hermes.stage
        for i, name in enumerate(stage.block_names):
            kind = "own" if any(a <= i < b for a, b in stage.own) else "remote"
            model.get_submodule(name).register_forward_pre_hook(
                lambda *_, kind=kind: seen[kind].add(torch.get_num_threads()))
        return model

    hermes.load = watched_load
    stages = tuple(int(x) for x in a.stages.split(",")) if a.stages else None
    ids = [int(x) for x in a.ids.split(",")]
    try:
        ring = Ring(RingSpec(a.address, a.rank, a.world_size, 20.0, stages, a.laps)).join()
        try:
            out: dict = {}
            if not a.generate_only:
                out["forward"] = ring_forward(a.model_dir, ring, budget=a.budget, input_ids=ids,
                                              save_output=a.out / "forward.safetensors" if a.rank == 0 else None)
            out["generate"] = ring_generate(a.model_dir, ring, budget=a.budget, ids=[ids],
                                            max_new_tokens=a.new_tokens, io="buffered")
            if not a.generate_only:  # a left-padded batch, sampled
                out["sampled"] = ring_generate(a.model_dir, ring, budget=a.budget, ids=[ids, ids[:4]],
                                               max_new_tokens=a.new_tokens, do_sample=True, top_k=50, seed=3)
        finally:
            ring.close()
        out["threads"] = {kind: sorted(n) for kind, n in seen.items()} | {"after": torch.get_num_threads()}
    except HermesError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    (a.out / f"rank{a.rank}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
