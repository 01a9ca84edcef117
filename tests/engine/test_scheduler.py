"""Scheduler invariants with fake requests and no model: slots are never leaked, shared or
over-committed, budgets hold, and everything returns to zero when idle."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import Scheduler

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
