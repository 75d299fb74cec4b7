"""One rank of the tensor-parallel tests (test_parallel.py starts each rank as a process with torchrun's environment:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Argument: a JSON file of jobs, each loading a checkpoint with
tensor_parallel=True and writing what it computed to a safetensors file of its own per rank:

- "logits": the prefill logits of `prompts` and the decode logits of each row of `decode` fed in turn
  (fixed tokens, so both sides see the same inputs);
- "sample": the tokens generate_tokens samples with no seed (each rank would draw its own without the broadcast);
- "die": rank 1 exits at once after loading; rank 0 then decodes and must fail, not hang.
"""

import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import mistral_ext
from mistral_ext.checkpoint import write_safetensors


def run(job: dict, rank: int) -> dict[str, torch.Tensor]:
    model = mistral_ext.load(job["path"], device="cpu", quantize=job.get("quantize"), tensor_parallel=True)
    if job["kind"] == "sample":
        tokens = mistral_ext.generate_tokens(model, job["prompts"], max_tokens=job["max_tokens"], temperature=1.0)
        return {f"tokens{b}": torch.tensor(t, dtype=torch.float64) for b, t in enumerate(tokens)}  # exact ids
    cache = model.new_cache(len(job["prompts"]))
    if job["kind"] == "die" and rank == 1:
        os._exit(3)
    out = {"prefill": model.prefill(job["prompts"], cache)}
    for i, row in enumerate(job["decode"]):
        out[f"decode{i}"] = model.decode(torch.tensor(row), cache)
    return out


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("TP_TIMEOUT", "60"))))
    rank = dist.get_rank()
    for job in jobs:
        write_safetensors(f"{job['out']}.rank{rank}.safetensors", run(job, rank))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
