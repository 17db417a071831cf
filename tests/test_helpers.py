"""helpers.torchrun: two launches at once both run, each rank's output comes back on its own, and a failure
names the failing rank's own error."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import torchrun

MEET = """
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
mine, other = sys.argv[1:]
open(mine, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(other) and time.monotonic() < deadline:  # until the other launch is running too
    time.sleep(0.05)
dist.barrier()
print(f"rank {dist.get_rank()} of {dist.get_world_size()}, met: {os.path.exists(other)}")
dist.destroy_process_group()
"""

RANK_1_FAILS = """
import torch.distributed as dist
dist.init_process_group("gloo")
print("rank", dist.get_rank(), "started")
if dist.get_rank() == 1:
    raise ValueError("rank 1 refuses: no such shard")
dist.barrier()
"""


def test_two_launches_at_once_both_run(tmp_path):
    """A fixed rendezvous port fails the second launch (address already in use) while the first runs."""
    script = tmp_path / "meet.py"
    script.write_text(MEET)
    a, b = (str(tmp_path / name) for name in ("a", "b"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with ThreadPoolExecutor(2) as pool:
        launches = [pool.submit(torchrun, [script, *args], 2, tmp_path, env, 120) for args in ((a, b), (b, a))]
    for launch in launches:
        assert launch.result().stdout == ["rank 0 of 2, met: True\n", "rank 1 of 2, met: True\n"]


def test_a_failure_names_the_failing_ranks_own_error(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(RANK_1_FAILS)
    with pytest.raises(AssertionError) as failure:
        torchrun([script], 2, tmp_path, dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    rank_1 = str(failure.value).split("--- rank 1 stderr ---")[1].split("--- torchrun stderr ---")[0]
    assert "ValueError: rank 1 refuses: no such shard" in rank_1
