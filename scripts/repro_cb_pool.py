"""Reproduction for issue #23 (open): Hermes' continuous-batching forward is not bit-exact for every KV pool size.

    .venv/bin/python scripts/repro_cb_pool.py hf        # transformers, the model held whole
    .venv/bin/python scripts/repro_cb_pool.py 560MiB    # hermes.load at this budget

Llama-3.2-1B bf16 made by ``hermes synth llama-3.2-1b ckpt/llama1b --dtype bfloat16``; one 32-token random prompt,
16 greedy tokens (as ``hermes serve`` asks: sampling with top_k=1), through transformers' continuous batching with
``hermes serve``'s settings and pools of 8 and 256 pages. Seen 2026-11-30: transformers gives tokens 13-16
``126072, 111059, 35513`` for both pools; hermes at 560 MiB the same with 8 pages, ``104210, 62782, 72444`` with
256 (a near tie in this random model's logits, computed differently).
"""
import random
import sys

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

rng = random.Random(0)
prompt = [rng.randrange(128256) for _ in range(32)]
which = sys.argv[1] if len(sys.argv) > 1 else "hf"
if which == "hf":
    model = AutoModelForCausalLM.from_pretrained("ckpt/llama1b")
else:
    import hermes

    model = hermes.load("ckpt/llama1b", budget=which)
for blocks in (8, 256):
    gc = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=16, eos_token_id=-1,
                          pad_token_id=0)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=blocks, max_batch_tokens=128, max_requests_per_batch=8,
                                  per_request_processors=True, allow_block_sharing=False, use_async_batching=False,
                                  use_cuda_graph=False, max_memory_percent=1.0)
    with torch.no_grad():
        manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
        manager.start()
        rid = manager.add_request(prompt, max_new_tokens=16, eos_token_id=-1, temperature=1.0, top_k=1, top_p=1.0)
        out = manager.get_result(request_id=rid, timeout=600)
        manager.stop(block=True)
    print(which, f"{blocks} pages", list(out.generated_tokens)[12:], flush=True)
