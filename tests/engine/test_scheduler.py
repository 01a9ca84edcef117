"""Scheduler invariants with fake requests and no model: slots are never leaked, shared or
over-committed, budgets hold, and everything returns to zero when idle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import (
    MIN_PREFIX_TOKENS,
    PrefixCopy,
    Scheduler,
    SlotState,
    StepPlan,
    common_prefix,
)

EOS = 0


def check_invariants(s: Scheduler) -> None:
    running = [seq for r in s.requests.values() for seq in r.seqs
               if seq.status == RequestStatus.RUNNING]
    slots = [seq.slot for seq in running]
    assert len(slots) == len(set(slots)), "a slot is held by two sequences"
    assert not set(slots) & set(s.free_slots), "a held slot is also on the free list"
    assert len(s.free_slots) == len(set(s.free_slots))
    assert len(slots) + len(s.free_slots) == s.n_slots, "a slot leaked"
    assert 0 <= s.num_used_slots <= s.n_slots
    for seq in s.decoding:
        assert seq.num_computed + 1 == seq.num_tokens <= s.max_model_len


def run_step(s: Scheduler, token: int) -> None:
    plan = s.schedule()
    assert plan.num_tokens <= s.max_num_batched_tokens
    decoding_before = set(s.decoding)
    assert set(plan.decodes) == decoding_before, "a decoding sequence was skipped"
    s.update(plan, [token] * len(plan.sampled))
    check_invariants(s)


operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 40), st.integers(0, 12), st.integers(1, 3)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.sampled_from([5, 6, EOS])),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(operation, max_size=60), n_slots=st.integers(1, 5),
       budget=st.integers(5, 64))
def test_random_admit_abort_finish_never_leaks(ops: list, n_slots: int, budget: int) -> None:
    s = Scheduler(n_slots, max_model_len=48, max_num_batched_tokens=max(budget, n_slots),
                  eos_ids=frozenset({EOS}))
    added = 0
    for op in ops:
        if op[0] == "add":
            _, n_prompt, max_tokens, n = op
            if n <= n_slots:
                params = SamplingParams(n=n, max_tokens=min(max_tokens, 48 - n_prompt))
                s.add(Request(f"r{added}", [7] * n_prompt, params))
                added += 1
        elif op[0] == "abort":
            s.abort(f"r{op[1]}")
            check_invariants(s)
        else:
            run_step(s, op[1])
    for _ in range(200):  # drain: every request ends by eos or its limits
        if not s.has_work():
            break
        run_step(s, 5)
    assert not s.has_work()
    assert s.num_used_slots == 0 and s.num_used_tokens == 0
    assert sorted(s.free_slots) == list(range(n_slots))
    assert not s.requests


def test_long_prompt_is_chunked_while_others_decode() -> None:
    s = Scheduler(n_slots=2, max_model_len=1000, max_num_batched_tokens=16)
    s.add(Request("short", [1] * 4, SamplingParams(max_tokens=50, ignore_eos=True)))
    run_step(s, 5)  # prefill the short one; it now decodes
    s.add(Request("long", [1] * 100, SamplingParams(max_tokens=5)))
    for _ in range(6):
        plan = s.schedule()
        assert [seq.request.request_id for seq in plan.decodes] == ["short"]
        assert plan.num_tokens <= 16
        s.update(plan, [5] * len(plan.sampled))
    assert s.requests["long"].num_prefilled == 6 * 15


def test_slot_states_show_what_runs_and_what_last_ran() -> None:
    """GET /slots' view: a running sequence's progress (its prompt still in prefill, then
    decoding), a finished one kept by its slot as a snapshot until another takes it, tasks
    numbered in arrival order, and nothing of it left after forget_slot_history (the
    warm-up's)."""
    s = Scheduler(n_slots=3, max_model_len=1000, max_num_batched_tokens=16)
    assert s.slot_states() == [SlotState(0), SlotState(1), SlotState(2)]
    first = Request("a", [1] * 20, SamplingParams(max_tokens=3, ignore_eos=True))
    s.add(first)
    s.add(Request("b", [1] * 4, SamplingParams(max_tokens=8, ignore_eos=True, n=2)))
    run_step(s, 5)  # a's first 16 prompt tokens; b waits for the budget
    [a, *idle] = [state for state in s.slot_states() if state.processing] + [
        state for state in s.slot_states() if not state.processing]
    assert (a.task_id, a.request_id, a.prompt_tokens, a.prompt_computed, a.decoded,
            a.remaining) == (0, "a", 20, 16, 0, 3)
    assert all(state.task_id == -1 for state in idle)
    for _ in range(3):
        run_step(s, 5)
    [done] = first.seqs
    assert done.status.is_finished and s.slot_states()[done.slot] == SlotState(done.slot)
    s.keep_last(done)  # (by the output builder, once its last output is out)
    states = {state.request_id: state for state in s.slot_states() if state.task_id >= 0}
    assert sorted((st.request_id, st.task_id, st.sample) for st in s.slot_states()
                  if st.task_id >= 0) == [("a", 0, 0), ("b", 1, 0), ("b", 1, 1)]
    assert (states["a"].processing, states["a"].decoded, states["a"].remaining) == (
        False, 3, 0)
    assert states["b"].processing and states["b"].decoded + states["b"].remaining == 8
    s.forget_slot_history()
    s.add(Request("c", [1] * 4, SamplingParams(max_tokens=1)))
    assert s.requests["c"].task_id == 0
    assert all(state.request_id != "a" for state in s.slot_states())


def test_prompt_logprobs_chunks_share_a_cap_per_step() -> None:
    """Chunks of requests asking for prompt logprobs take at most `max_scored_tokens` tokens a
    step between them (each such token gets a row of logits); the others fill the rest."""
    s = Scheduler(n_slots=4, max_model_len=200, max_num_batched_tokens=64, max_scored_tokens=20)
    scored = SamplingParams(max_tokens=1, prompt_logprobs=0)
    s.add(Request("a", [1] * 30, scored))
    s.add(Request("b", [1] * 30, scored))
    s.add(Request("c", [1] * 30, SamplingParams(max_tokens=1)))

    def chunks(plan: StepPlan) -> list[tuple[str, int]]:
        return [(c.request.request_id, len(c.token_ids)) for c in plan.prefills]

    plan = s.schedule()  # b has no scored room left, and c does not overtake it (FCFS)
    assert chunks(plan) == [("a", 20)] and plan.num_scored_tokens == 20
    s.update(plan, [])
    plan = s.schedule()
    assert chunks(plan) == [("a", 10), ("b", 10), ("c", 30)] and plan.num_scored_tokens == 20
    s.update(plan, [5] * len(plan.sampled))
    assert chunks(s.schedule()) == [("b", 20)]


@settings(max_examples=100, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=8),
       n_slots=st.integers(1, 4), budget=st.integers(4, 64), cap=st.integers(1, 30))
def test_every_step_keeps_both_budgets_and_everything_finishes(
        prompts: list[tuple[int, bool]], n_slots: int, budget: int, cap: int) -> None:
    s = Scheduler(n_slots, max_model_len=48, max_num_batched_tokens=max(budget, n_slots),
                  max_scored_tokens=cap)
    for i, (n_prompt, scored) in enumerate(prompts):
        params = SamplingParams(max_tokens=2, ignore_eos=True,
                                prompt_logprobs=0 if scored else None)
        s.add(Request(f"r{i}", [7] * n_prompt, params))
    for _ in range(400):
        if not s.has_work():
            break
        plan = s.schedule()
        assert plan.num_tokens <= s.max_num_batched_tokens
        assert plan.num_scored_tokens <= cap
        assert plan.num_tokens > 0  # always progress
        s.update(plan, [5] * len(plan.sampled))
        check_invariants(s)
    assert not s.has_work() and s.num_used_slots == 0


def test_fcfs_waits_for_enough_slots() -> None:
    """A request needing n slots blocks later ones rather than being overtaken."""
    s = Scheduler(n_slots=2, max_model_len=100, max_num_batched_tokens=64)
    s.add(Request("a", [1] * 3, SamplingParams(max_tokens=3, ignore_eos=True)))
    s.add(Request("b", [1] * 3, SamplingParams(n=2, max_tokens=3)))
    s.add(Request("c", [1] * 3, SamplingParams(max_tokens=3)))
    plan = s.schedule()
    assert [c.request.request_id for c in plan.prefills] == ["a"]
    s.update(plan, [5])
    while s.requests.get("a"):
        run_step(s, 5)
    plan = s.schedule()
    assert [c.request.request_id for c in plan.prefills] == ["b"]


def test_token_level_stops() -> None:
    s = Scheduler(n_slots=4, max_model_len=10, max_num_batched_tokens=64,
                  eos_ids=frozenset({EOS}))
    s.add(Request("eos", [1, 2], SamplingParams(max_tokens=5)))
    s.add(Request("ignore", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True)))
    s.add(Request("stop_id", [1, 2], SamplingParams(max_tokens=5, stop_token_ids=(9,))))
    s.add(Request("ctx", [1] * 8, SamplingParams(max_tokens=None, ignore_eos=True)))
    reqs = dict(s.requests)
    plan = s.schedule()
    s.update(plan, [EOS, EOS, 9, 5])
    assert reqs["eos"].seqs[0].status == RequestStatus.FINISHED_STOPPED
    assert reqs["ignore"].seqs[0].status == RequestStatus.RUNNING
    assert reqs["stop_id"].seqs[0].status == RequestStatus.FINISHED_STOPPED
    plan = s.schedule()
    s.update(plan, [EOS, 5])
    assert reqs["ctx"].seqs[0].status == RequestStatus.FINISHED_LENGTH  # 8 + 2 = max_model_len
    assert reqs["ctx"].seqs[0].output_ids == [5, 5]
    run_step(s, 5)
    assert reqs["ignore"].seqs[0].status == RequestStatus.FINISHED_LENGTH
    assert reqs["ignore"].seqs[0].output_ids == [EOS, EOS, 5]


def test_plan_ahead_takes_the_same_decodes_one_token_on() -> None:
    """The step planned while a decode step runs: the same sequences at the next position,
    each fed its row of that step's tokens; not one that step ends by length (max_tokens,
    the context), and no plan at all while a prompt waits or is mid-prefill."""
    s = Scheduler(n_slots=4, max_model_len=12, max_num_batched_tokens=64)
    s.add(Request("a", [1, 2], SamplingParams(max_tokens=8, ignore_eos=True)))
    s.add(Request("last", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True)))
    s.add(Request("ctx", [1] * 10, SamplingParams(max_tokens=None, ignore_eos=True)))
    reqs = dict(s.requests)
    run_step(s, 5)  # the prompts; each has 1 token now
    assert s.plan_ahead(StepPlan(prefills=[])) is None
    plan = s.schedule()
    assert [q.request.request_id for q in plan.decodes] == ["a", "last", "ctx"]
    ahead = s.plan_ahead(plan)  # "last" ends with its 2nd token, "ctx" at 10 + 2 = 12
    assert ahead is not None
    assert [q.request.request_id for q in ahead.decodes] == ["a"] and ahead.fed_from == [0]
    assert ahead.decode_positions() == [plan.decode_positions()[0] + 1] == [3]
    s.update(plan, [6, 6, 6])
    assert reqs["last"].seqs[0].status == RequestStatus.FINISHED_LENGTH
    assert reqs["ctx"].seqs[0].status == RequestStatus.FINISHED_LENGTH
    assert ahead.decode_positions() == [4]  # counted from the updated state: one on again
    s.add(Request("new", [1, 2, 3], SamplingParams(max_tokens=3)))
    assert s.plan_ahead(s.schedule()) is None  # "new" is in that plan: mid-prefill until run


def test_plan_ahead_while_requests_wait_for_slots() -> None:
    """Under overload (every slot taken, requests queued) steps still go ahead, unless one
    that `plan` ends by length frees the slots the first waiting request needs."""
    s = Scheduler(n_slots=2, max_model_len=100, max_num_batched_tokens=64)
    s.add(Request("a", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True)))
    s.add(Request("b", [1, 2], SamplingParams(max_tokens=20, ignore_eos=True)))
    run_step(s, 5)  # both prefilled, 1 token each
    s.add(Request("queued", [1, 2, 3], SamplingParams(max_tokens=3)))
    plan = s.schedule()
    assert not plan.prefills and len(plan.decodes) == 2  # no slot for "queued"
    ahead = s.plan_ahead(plan)  # "a" gets its 2nd token: the slots stay full
    assert ahead is not None and len(ahead.decodes) == 2
    s.update(plan, [5, 5])
    plan = s.schedule()
    assert s.plan_ahead(plan) is None  # "a" ends with this step's token: "queued" goes next
    s.update(plan, [5, 5])
    assert [c.request.request_id for c in s.schedule().prefills] == ["queued"]


# --- prefix caching ----------------------------------------------------------------------------

class ShadowPool:
    """What each slot holds, written as the runner writes it: a plan's prefix copies, then its
    prompt chunks and decode rows, then an n > 1 prompt's copy to its other samples' slots."""

    def __init__(self, n_slots: int, max_len: int) -> None:
        self.slots: list[list[int | None]] = [[None] * max_len for _ in range(n_slots)]

    def run(self, plan: StepPlan) -> None:
        for copy in plan.copies:
            self.slots[copy.dst][:copy.length] = self.slots[copy.src][:copy.length]
        for chunk in plan.prefills:
            # What this chunk attends to must be its own prompt's tokens
            held = self.slots[chunk.slot][:chunk.start]
            assert held == chunk.request.prompt_ids[:chunk.start], "a prefix is not there"
            self.slots[chunk.slot][chunk.start:chunk.start + len(chunk.token_ids)] = \
                chunk.token_ids
        for seq in plan.decodes:
            tokens = seq.request.prompt_ids + seq.output_ids
            assert self.slots[seq.slot][:seq.num_computed] == tokens[:seq.num_computed]
            self.slots[seq.slot][seq.num_computed] = seq.last_token
        for chunk in plan.prefills:
            if chunk.is_last and not chunk.request.params.scores_only:
                prompt = chunk.request.prompt_ids
                for seq in chunk.request.seqs[1:]:
                    self.slots[seq.slot][:len(prompt)] = self.slots[chunk.slot][:len(prompt)]

    def check_claims(self, s: Scheduler) -> None:
        """What the scheduler believes each slot holds, it holds: free slots' cached tokens
        and running sequences' computed ones."""
        for slot, tokens in s.cached.items():
            assert self.slots[slot][:len(tokens)] == tokens, f"free slot {slot} claims wrong"
        for seq in s.decoding:
            tokens = seq.cached_tokens()
            assert self.slots[seq.slot][:len(tokens)] == tokens, f"slot {seq.slot} claims wrong"


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(-1, 8),
              st.one_of(st.integers(16, 40), st.integers(0, 40)), st.integers(0, 8),
              st.integers(1, 6), st.integers(0, 12), st.integers(1, 2)),
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("step"), st.integers(5, 9)),
), max_size=60), n_slots=st.integers(1, 4), budget=st.integers(4, 64), packed=st.booleans())
def test_every_reused_prefix_is_really_there(ops: list, n_slots: int, budget: int,
                                             packed: bool) -> None:
    """Random prompts sharing prefixes of one base (as system prompts do) or continuing an
    earlier request's prompt and output (as chat turns do), random outputs, aborts and
    budgets, slots packed or keeping caches: every token a step relies on is the one its
    request has, by a simulation of what each slot holds."""
    max_len = 64
    s = Scheduler(n_slots, max_model_len=max_len, max_num_batched_tokens=max(budget, n_slots),
                  eos_ids=frozenset({EOS}), prefix_caching=True, packed_slots=packed)
    pool = ShadowPool(n_slots, max_len)
    base = list(range(100, 100 + max_len))
    added: list[Request] = []
    for op in ops:
        if op[0] == "add":
            _, earlier, shared, tail, tail_token, max_tokens, n = op
            if earlier >= 0 and added:  # the next turn of an earlier request's first sample
                before = added[earlier % len(added)]
                head = before.prompt_ids + before.seqs[0].output_ids
            else:
                head = base
            prompt = head[:shared] + [tail_token] * tail or [1]
            if n <= n_slots and len(prompt) < max_len:
                params = SamplingParams(n=n, max_tokens=min(max_tokens, max_len - len(prompt)))
                added.append(Request(f"r{len(added)}", prompt, params))
                s.add(added[-1])
        elif op[0] == "abort":
            s.abort(f"r{op[1]}")
        else:
            plan = s.schedule()
            pool.run(plan)
            s.update(plan, [op[1]] * len(plan.sampled))
            check_invariants(s)
        pool.check_claims(s)
    while s.has_work():
        plan = s.schedule()
        pool.run(plan)
        s.update(plan, [5] * len(plan.sampled))
        pool.check_claims(s)


def test_a_finished_requests_slot_serves_the_next_turn() -> None:
    """The next chat turn (the whole conversation again, and more) copies what the last
    left: its prompt and all but its newest output token, which was never fed."""
    s = Scheduler(n_slots=2, max_model_len=200, max_num_batched_tokens=256,
                  prefix_caching=True)
    first = Request("a", list(range(1, 41)), SamplingParams(max_tokens=5, ignore_eos=True))
    s.add(first)
    while s.has_work():
        run_step(s, 5)
    assert s.cached == {0: list(range(1, 41)) + [5] * 4}
    turn = list(range(1, 41)) + [5] * 5 + [60, 61]
    s.add(Request("b", turn, SamplingParams(max_tokens=2)))
    s.add(Request("c", list(range(1, 41)), SamplingParams(max_tokens=2)))  # the same again
    plan = s.schedule()
    [b, c] = plan.prefills
    assert (b.slot, b.start, b.token_ids) == (0, 44, [5, 60, 61])  # its own slot: no copy
    assert (c.slot, c.start, c.token_ids) == (1, 39, [40])  # the last token is computed
    assert plan.copies == [PrefixCopy(src=0, dst=1, length=39)]
    assert plan.num_cached_tokens == 44 + 39 and plan.admitted == 2
    assert plan.num_queried_tokens == 47 + 40
    assert s.cached == {}  # both slots are in use again


def test_a_running_sequence_shares_its_prompt() -> None:
    s = Scheduler(n_slots=2, max_model_len=200, max_num_batched_tokens=256,
                  prefix_caching=True)
    system = list(range(1, 31))
    s.add(Request("a", system + [90], SamplingParams(max_tokens=50, ignore_eos=True)))
    run_step(s, 5)
    run_step(s, 5)  # a decodes in slot 0
    s.add(Request("b", system + [91, 92], SamplingParams(max_tokens=2)))
    plan = s.schedule()
    assert plan.copies == [PrefixCopy(src=0, dst=1, length=30)]
    assert (plan.prefills[0].start, plan.prefills[0].token_ids) == (30, [91, 92])


# Stand-ins for loaded LoRA adapters (the engine gives each request its adapter's object)
ADAPTERS = {"sql": object(), "chat": object(), "sql-reloaded": object()}


def on_adapter(rid: str, prompt: list[int], lora: str | None,
               max_tokens: int = 50) -> Request:
    name = None if lora is None else lora.removesuffix("-reloaded")
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                               lora=name),
                   adapter=None if lora is None else ADAPTERS[lora])  # type: ignore[arg-type]


def test_a_prefix_is_shared_only_within_one_lora_adapter() -> None:
    """K/V computed on one adapter (or the base model) are no other's: not from a finished
    request's slot, a running sequence's, or a prompt in prefill; the same adapter's are."""
    system = list(range(1, 31))
    s = Scheduler(n_slots=4, max_model_len=200, max_num_batched_tokens=256,
                  prefix_caching=True)
    s.add(on_adapter("done", system + [80], "sql", max_tokens=1))
    run_step(s, 5)  # finished: slot 0 holds its prompt, on "sql"
    s.add(on_adapter("running", system + [90], None))
    run_step(s, 5)  # decoding in slot 1, on the base model
    s.add(on_adapter("other", system + [91], "chat"))
    plan = s.schedule()
    assert plan.copies == [] and plan.prefills[0].start == 0  # neither is "chat"'s
    run_step_planned(s, plan, 5)
    for lora, source in (("sql", 0), (None, 1), ("chat", plan.prefills[0].slot)):
        s.add(on_adapter(f"again-{lora}", system + [92], lora, max_tokens=1))
        again = s.schedule()
        assert [c.src for c in again.copies] == [source], lora
        run_step_planned(s, again, 5)
    # "sql" unloaded and loaded again from other weights: its name's cache is not its own
    s.add(on_adapter("reloaded", system + [93], "sql-reloaded", max_tokens=1))
    assert s.schedule().copies == []


def test_a_prompt_in_prefill_shares_only_within_its_adapter() -> None:
    long = list(range(1, 101))
    for lora, copied in (("chat", False), ("sql", True)):
        s = Scheduler(n_slots=3, max_model_len=200, max_num_batched_tokens=70,
                      prefix_caching=True)
        s.add(on_adapter("long", long, "sql", max_tokens=5))
        run_step(s, 5)  # 70 of its 100 tokens in slot 0; the next step has room for "b"
        assert s.prefilling
        s.add(on_adapter("b", long[:60] + [7], lora, max_tokens=1))
        plan = s.schedule()
        assert bool(plan.copies) is copied, lora


def run_step_planned(s: Scheduler, plan: StepPlan, token: int) -> None:
    """run_step for a plan already made."""
    s.update(plan, [token] * len(plan.sampled))


def run_alone(s: Scheduler, request: Request) -> tuple[int, int, int]:
    """(the request's slot, prompt tokens it took from the cache, the copy's source or -1),
    run to its end."""
    s.add(request)
    plan = s.schedule()
    copies = [copy.src for copy in plan.copies]
    while s.has_work():
        s.update(plan, [5] * len(plan.sampled))
        plan = s.schedule()
    return request.seqs[0].slot, request.num_cached_tokens, copies[0] if copies else -1


def test_conversations_taking_turns_keep_their_caches() -> None:
    """Two chats take turns on 4 slots: each turn finds the last one's slot and decodes on
    there, though the other chat ran in between; with packed slots (CUDA graphs) each turn
    takes slot 0 and finds nothing of its own."""
    a, b = list(range(100, 140)), list(range(200, 240))
    for packed, want in [(False, [(0, 0, -1), (1, 0, -1), (0, 44, -1), (1, 44, -1)]),
                         (True, [(0, 0, -1), (0, 0, -1), (0, 0, -1), (0, 0, -1)])]:
        s = Scheduler(n_slots=4, max_model_len=200, max_num_batched_tokens=256,
                      prefix_caching=True, packed_slots=packed)
        params = SamplingParams(max_tokens=5, ignore_eos=True)
        got = [run_alone(s, Request("a1", a, params)), run_alone(s, Request("b1", b, params))]
        got += [run_alone(s, Request("a2", a + [5] * 5 + [7], params)),
                run_alone(s, Request("b2", b + [5] * 5 + [7], params))]
        assert got == want, packed


def test_a_shorter_prompt_copies_and_leaves_the_longer_cache() -> None:
    """P, then its first 20 tokens (copied into a slot of its own, leaving P whole), then P
    again (in place: its last token is computed again, over the same), then a new prompt
    (into the oldest cache's slot, the 20 tokens')."""
    p = list(range(100, 160))
    s = Scheduler(n_slots=2, max_model_len=200, max_num_batched_tokens=256,
                  prefix_caching=True)
    params = SamplingParams(max_tokens=1)
    assert run_alone(s, Request("p", p, params)) == (0, 0, -1)
    assert run_alone(s, Request("short", p[:20], params)) == (1, 19, 0)
    assert run_alone(s, Request("again", p, params)) == (0, 59, -1)
    assert run_alone(s, Request("new", list(range(300, 340)), params)) == (1, 0, -1)
    assert list(s.cached) == [0, 1]


def test_the_oldest_cache_goes_first() -> None:
    """Three conversations on two slots: the third takes the first's slot, so the second's
    next turn still finds its own."""
    s = Scheduler(n_slots=2, max_model_len=200, max_num_batched_tokens=256,
                  prefix_caching=True)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    a, b, c = (list(range(k, k + 40)) for k in (100, 200, 300))
    assert [run_alone(s, Request(name, ids, params))
            for name, ids in (("a", a), ("b", b), ("c", c))] == [(0, 0, -1), (1, 0, -1),
                                                                 (0, 0, -1)]
    assert run_alone(s, Request("b2", b + [5] * 5, params)) == (1, 44, -1)


def test_what_is_not_taken_from_the_cache() -> None:
    """Prefixes under MIN_PREFIX_TOKENS, prompts whose logprobs are asked for (every row is
    computed), and everything with prefix caching off."""
    prompt = list(range(1, 41))
    for caching, params, reused in [
            (True, SamplingParams(max_tokens=2), 39),
            (True, SamplingParams(max_tokens=2, prompt_logprobs=0), 0),
            (False, SamplingParams(max_tokens=2), 0)]:
        s = Scheduler(n_slots=2, max_model_len=200, max_num_batched_tokens=256,
                      prefix_caching=caching)
        s.add(Request("a", prompt, SamplingParams(max_tokens=1)))
        run_step(s, 5)
        s.add(Request("b", prompt, params))
        s.add(Request("c", prompt[:MIN_PREFIX_TOKENS - 1] + [99] * 10, SamplingParams()))
        plan = s.schedule()
        assert [chunk.start for chunk in plan.prefills] == [reused, 0]


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3, 4], [1, 2, 9], 10) == 2
    assert common_prefix([1, 2, 3], [1, 2, 3], 10) == 3
    assert common_prefix([1, 2, 3], [1, 2, 3], 2) == 2
    assert common_prefix([], [1], 5) == 0
    assert common_prefix([7] * 1000 + [1], [7] * 1000 + [2], 5000) == 1000
