"""The start-up warm-up's requests: the kinds of step serving will run, run once before it.

Engine.warm_up feeds these phases to its own step, on the engine thread, before `/health`
turns 200 (`--no-warmup` skips it). The one-time costs of those shapes (the allocator growing
to a full step, the BLAS and attention kernels' first calls at new sizes, Triton compiling a
variant) and of the thread (its OpenMP team, a cuBLAS handle) then fall on start-up, not on
the first requests; and a step that does not fit in memory refuses to start instead of
failing requests later. vLLM's profile run and llama.cpp's warm-up do the same.

1. The largest steps there are: prompt chunks filling the token budget (or every slot's
   length, if less), as many of their tokens with logits as a step may score for prompt
   logprobs (Scheduler.max_scored_tokens): the most memory a step takes, and what start-up's
   pool sizing reserves. Where the cap is below that many tokens, two steps: every token
   unscored, then prompts scored up to the cap beside unscored ones (a scored chunk being cut
   at the cap, the slots may not hold both at their largest in one step).
2. A one-token prompt in every slot but one, so that there are as many decode rows as a full
   pool has;
3. a short prompt prefilled beside those decode rows (a mixed step), sampled with logprobs;
   then decode rows alone, all slots full, until everything has finished.

With LoRA adapters the largest steps' prompts run on one of them, every other prompt (its
rows apart: model/lora.py gathers them, the most memory a step's deltas take on top of the
base model's step).

Every request is seeded: a row without a seed would draw from the sampler's shared generator
and so change what later unseeded requests get.
"""

from __future__ import annotations

from server.request import Request, SamplingParams
from server.runner import out_of_memory
from server.scheduler import Scheduler


def phases(scheduler: Scheduler, vocab_size: int, lora: str | None = None
           ) -> list[list[Request]]:
    """Each phase's requests; the engine runs steps until each of them has an output token,
    then adds the next phase, and after the last runs until nothing is left. With `lora`, a
    LoRA adapter's name, every other prompt of the largest steps runs on it (its deltas take
    more memory than the base model's step alone, the most with its rows apart)."""
    max_len, n_slots = scheduler.max_model_len, scheduler.n_slots

    def prompt(n: int, salt: int) -> list[int]:
        # A prime stride: ids spread over the vocabulary, no run of one id (any ids would do)
        return [(salt + 7919 * i) % vocab_size for i in range(n)]

    def params(max_tokens: int, **sampling: object) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, seed=0, ignore_eos=True,
                              **sampling)  # type: ignore[arg-type]

    budget, cap = scheduler.max_num_batched_tokens, scheduler.max_scored_tokens
    length = min(budget, max_len - 1)  # one output each

    def largest(name: str, scored: int, salt: int) -> list[Request]:
        """Prompts filling a step, `scored` of its tokens with prompt logprobs: the scored
        prompts first, so that the scheduler gives them those, then the others the rest.
        (Salted apart from another phase's prompts, which the prefix cache would supply.)"""
        n_scored = -(-scored // length)
        n = min(n_scored + -(-(budget - scored) // length), n_slots)
        return [Request(f"warm-up-{name}-{i}", prompt(length, salt + i),
                        params(1, temperature=0.0, prompt_logprobs=0 if i < n_scored else None,
                               lora=lora if i % 2 == 0 else None))
                for i in range(n)]

    most_tokens = min(budget, n_slots * length)
    scored = min(cap, most_tokens)
    first = [largest("scored", scored, salt=0)]
    if scored < most_tokens:  # and first the most tokens, none scored (see 1. above)
        first.insert(0, largest("full", 0, salt=n_slots + 1))
    # Three outputs: the second beside the mixed step's chunk, the third beside its decode row.
    rows = [Request(f"warm-up-row-{i}", prompt(1, i), params(min(3, max_len - 1), temperature=0.0))
            for i in range(max(1, n_slots - 1))]
    outputs = min(2, max_len - 1)
    short = min(16, max_len - outputs)
    mixed = Request("warm-up-mixed", prompt(short, n_slots),
                    params(outputs, temperature=1.0, logprobs=0))
    return [*first, rows, [mixed]]


def failure_message(error: BaseException, budget: int) -> str:
    """What a failed warm-up tells the operator: for memory, what to lower."""
    cause = error.__cause__ or error
    if out_of_memory(cause):
        return (f"the start-up warm-up ran out of memory ({cause}): this server cannot run the "
                f"steps it would be given, up to {budget} tokens; lower "
                f"--max-num-batched-tokens, --max-num-seqs or --kv-cache-memory (or pass "
                f"--no-warmup to find out later)")
    return (f"the start-up warm-up failed ({cause}); the same would fail requests (pass "
            f"--no-warmup to start anyway)")
