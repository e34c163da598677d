# ruff: noqa: E501 - the markdown table rows below are long by nature
"""Print docs/ERRORS.md from the case table of tests/test_reliability.py (the docs cannot drift from the tests).

python tools/error_table.py > docs/ERRORS.md
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

HEADER = """# Errors: each bad input, the error it raises, and the test that proves it

Every case below is run by `tests/test_reliability.py::test_every_bad_input_raises_and_the_buffer_stays_usable`
on gloo worlds of 1, 2 and 3 ranks: the call must raise the listed exception with a message containing the
listed text, and the same Buffer must then complete a normal-mode round and a low-latency round that match the
executable spec bit for bit. The table is generated from the test (`python tools/error_table.py`), and
`tests/test_docs.py` fails if it is out of date.

| # | case (test id) | what is wrong | raises | message contains |
|---|---|---|---|---|
"""

FOOTER = """
## Across ranks and peers

| case | raises | test |
|---|---|---|
| ranks pass different `hidden` to `dispatch` | `CollectiveMismatchError` on every rank, naming each rank's value | `test_collective_mismatch_raises_on_every_rank[hidden]` |
| one rank calls `combine` while another calls cached `dispatch` | `CollectiveMismatchError` ("ranks called different operations") | `...[op]` |
| different `num_max_dispatch_tokens_per_rank` in `low_latency_dispatch` | `CollectiveMismatchError` | `...[tokens_cap]` |
| different `num_worst_tokens` | `CollectiveMismatchError` | `...[num_worst_tokens]` |
| different `num_experts` in `low_latency_dispatch` | `CollectiveMismatchError` | `...[experts]` |
| tensors on the Buffer's device on some ranks only (a kernel backend would take its peer-memory path on some ranks and its fallback on others) | `CollectiveMismatchError` naming `on_buffer_device` | `...[device]` |
| one rank's `Buffer(...)` rejects its arguments (`num_nvl_bytes=-1`, say; not `group`: a rank without a process group cannot reach its peers) | that rank raises its own error; every other rank `CollectiveMismatchError` ("rank(s) [2] rejected their arguments") at once | `test_buffers_created_apart_fail_on_every_rank[bad_bytes-*]` |
| ranks create their `Buffer` with different backends (`"auto"` or `DEEP_EP_BACKEND` picked differently), `low_latency_mode`, `explicitly_destroy`, `low_latency_quant`, `num_nvl_bytes` or `num_rdma_bytes` | `CollectiveMismatchError` on every rank, naming each rank's value (backends by name) | `test_buffers_created_apart_fail_on_every_rank[*]` |
| a bad `DEEP_EP_COMM_TIMEOUT` or `NVSHMEM_QP_DEPTH` on one rank | that rank `ValueError` naming the variable and its value; every other rank `CollectiveMismatchError` at once | `test_a_bad_env_value_fails_every_rank_at_once[*]` |
| a sparse tensor or a lazy conjugate view (`t.conj()` of a complex tensor) as an argument on one rank | that rank `TypeError` naming the argument, before any transfer; every other rank `CollectiveMismatchError` | `test_a_sparse_or_conjugate_view_argument_is_refused_before_any_transfer[*]` |
| `Buffer(...)` on a group where a wait already timed out | `CommTimeoutError` ("no Buffer is made on it: make a new process group") before any collective; a Buffer on a new group works | `test_no_buffer_is_made_on_a_group_whose_wait_timed_out` |
| a peer exits in the middle of `dispatch` / `combine` | `CommTimeoutError` naming the operation ("a peer went away") | `test_dead_peer_raises_timeout_naming_the_op[exit-*]` |
| a peer stalls in the middle of `dispatch` / `combine` | `CommTimeoutError` naming the operation after `buffer.comm_timeout` s | `test_dead_peer_raises_timeout_naming_the_op[stall-*]` |
| random shapes with one random corruption (hypothesis) | only `ValueError`/`TypeError`, the same on every rank; otherwise results equal the spec | `test_fuzzed_arguments_give_documented_errors_or_exact_results` |
| the error-path fuzzer (`tests/fuzz_errors.py`, 155 corruptions of every call's arguments on one rank or all, `reference` and `cuda_sim`, after random valid rounds with async calls left pending) | every rank raises (for the local calls `get_dispatch_layout`, `get_local_buffer_tensor`, `clean_low_latency_buffer` and `get_next_low_latency_combine_buffer`, the spoiled ranks only), the spoiled one naming the argument (for arguments that must match, every rank's `CollectiveMismatchError` names the field); the next round equals the spec bit for bit | `tests/test_fuzz_errors.py` (a fixed slice); the script for more seeds |

After a `CollectiveMismatchError` the Buffer is usable (tested). After a `CommTimeoutError` the peer is gone or
late: over the host board the next calls pair again; after a timed-out wait on the process group, the group itself
may be unusable, every Buffer on it (and any made on it later) refuses its calls, and the job should make a new
group.
"""


def render() -> str:
    from test_reliability import CASES

    rows = []
    for number, (name, what, _, exc, fragment) in enumerate(CASES, start=1):
        rows.append(f"| {number} | `{name}` | {what} | `{exc.__name__}` | {fragment.replace('|', '/')} |")
    return HEADER + "\n".join(rows) + "\n" + FOOTER


if __name__ == "__main__":
    sys.stdout.write(render())
