from __future__ import annotations

from parallel.block_manager import BlockManager
from parallel.config import SchedulerConfig
from parallel.request import Request, RequestStatus
from parallel.sampling_params import SamplingParams
from parallel.scheduler import Scheduler, StepResult


def _sched(tokens: int = 16, seqs: int = 4, blocks: int = 32, bs: int = 4) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens), BlockManager(blocks, bs), 128)


def _step(s: Scheduler, token: int = 7):
    out = s.schedule()
    return out, s.update(out, StepResult({x.request_id: (token,) for x in out.scheduled if x.sample}))


def test_chunked_prefill_then_decode():
    s = _sched(tokens=8)
    s.add(Request("a", list(range(20)), SamplingParams(max_tokens=3)))
    sizes = []
    while s.has_unfinished():
        out, _ = _step(s)
        sizes.append([len(x.token_ids) for x in out.scheduled])
    assert sizes == [[8], [8], [4], [1], [1]]
    assert s.block_manager.num_used_blocks == 0


def test_budget_shared_running_first_and_max_num_seqs():
    s = _sched(tokens=10, seqs=2)
    for i in range(3):
        s.add(Request(f"r{i}", list(range(6)), SamplingParams(max_tokens=5)))
    out, _ = _step(s)
    assert [(x.request_id, len(x.token_ids)) for x in out.scheduled] == [("r0", 6), ("r1", 4)]
    out, _ = _step(s)
    assert [(x.request_id, len(x.token_ids)) for x in out.scheduled] == [("r0", 1), ("r1", 2)]
    assert len(s.running) == 2 and len(s.waiting) == 1


def test_preemption_when_blocks_run_out_keeps_outputs():
    s = _sched(tokens=64, seqs=4, blocks=4, bs=4)
    s.add(Request("a", list(range(7)), SamplingParams(max_tokens=10)))
    s.add(Request("b", list(range(7)), SamplingParams(max_tokens=10)))
    _step(s)  # both prefilled: 2 blocks each, pool full
    _step(s)  # tokens 8 fit, both decode
    out, _ = _step(s)  # a needs a third block: b (the newest) is preempted
    assert out.num_preempted == 1 and [x.request_id for x in out.scheduled] == ["a"]
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_output_tokens == 2
    while s.has_unfinished():
        _step(s)
    assert b.num_output_tokens == 10  # resumed by recompute and finished


def test_finish_and_stop_conditions():
    s = _sched()
    s.add(Request("a", [1, 2, 3], SamplingParams(max_tokens=5), eos_token_ids=(2,)))
    _, changed = _step(s, token=2)
    assert changed[0][0].status == RequestStatus.FINISHED_STOPPED
    s.add(Request("b", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), eos_token_ids=(2,)))
    for _ in range(5):
        _step(s, token=2)
    assert not s.has_unfinished()
    out = s.schedule()
    assert out.finished_request_ids == frozenset({"b"})


def test_abort_waiting_and_running():
    s = _sched(tokens=4, seqs=1)
    s.add(Request("a", [1, 2], SamplingParams()))
    s.add(Request("b", [1, 2], SamplingParams()))
    _step(s)
    assert s.finish("b", RequestStatus.FINISHED_ABORTED).status == RequestStatus.FINISHED_ABORTED
    assert s.finish("a", RequestStatus.FINISHED_ABORTED) is not None
    assert s.finish("a", RequestStatus.FINISHED_ABORTED) is None
    assert not s.has_unfinished() and s.block_manager.num_used_blocks == 0
