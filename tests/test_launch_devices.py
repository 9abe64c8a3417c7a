"""Launched training gets the GPUs the worker gave the job (issue 18, item 3).

No GPU is needed: the device list is faked (``CUDA_VISIBLE_DEVICES`` of the worker, the job's
``ctx.device``) and what is checked is what the launched children see, through the real
``accelerate launch`` (torchrun for several processes) started by `dvm_core.launch.run`.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from dvm_core import launch
from dvm_core.devices import choose_device, gpu_indices, gpus_given

CHILD = textwrap.dedent('''
    """A launched child that reports what it was given."""
    import json, os, sys
    from pathlib import Path

    from dvm_core.launch import start_child, write_outcome

    job_file = Path(sys.argv[1])
    rank = start_child(job_file)
    seen = {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "world": os.environ.get("WORLD_SIZE"),
            "local_rank": os.environ.get("LOCAL_RANK")}
    (job_file.parent / f"seen.{rank}.json").write_text(json.dumps(seen))
    if rank == 0:
        write_outcome(job_file.parent, rank, {"outcome": seen})
''')


@pytest.mark.parametrize("device, expected", [
    ("cuda:1", [1]), ("cuda:0,1", [0, 1]), ("cuda: 2, 3", [2, 3]), ("cuda", None), ("cpu", None),
    (None, None), ("cuda:x", None), ("mps:0", None),
])
def test_gpu_indices(device, expected):
    assert gpu_indices(device) == expected


def test_gpus_given_and_the_in_process_device():
    assert gpus_given("cuda:2,3") == 2 and gpus_given("cuda:1") == 1 and gpus_given("cpu") == 0
    assert str(choose_device("cuda:2,3")) == "cuda:2"     # in the worker's process: the slot's first GPU
    assert str(choose_device("cuda:1")) == "cuda:1" and str(choose_device("cpu")) == "cpu"


@pytest.mark.parametrize("device, processes, current, expected", [
    ("cuda:1", 1, None, "1"),
    ("cuda:1", 2, None, "1"),          # several processes no longer spread over the machine's GPUs
    ("cuda:2,3", 2, None, "2,3"),
    ("cuda:0,1", 2, "4,5,6,7", "4,5"),   # the worker's own CUDA_VISIBLE_DEVICES: N counts among them
    ("cuda:1,3", 2, "4,5,6,7", "5,7"),
    ("cuda:5", 1, "4,5", None),          # a GPU the worker does not see: left to torch to refuse
    ("cuda", 2, "4,5", None), ("cpu", 1, None, None), (None, 2, None, None),
])
def test_visible_devices(device, processes, current, expected):
    assert launch.visible_devices(device, processes, current) == expected
    env = launch.environment("dvm_core", processes=processes, device=device,
                             base={} if current is None else {"CUDA_VISIBLE_DEVICES": current})
    assert env.get("CUDA_VISIBLE_DEVICES") == (expected if expected is not None else current)


@pytest.mark.parametrize("device, processes, current, expected", [
    ("cuda:1,2", 2, "3,5,7", "5,7"),
    ("cuda:1", 1, None, "1"),
])
def test_launched_children_see_the_jobs_gpus(tmp_path, monkeypatch, device, processes, current, expected):
    """Through `accelerate launch` as the plugins start it: every child sees the job's GPUs."""
    package = tmp_path / "pkg" / "fakechild"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text(CHILD)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    if current is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", current)
    job_file = tmp_path / "launch" / "job.json"
    job_file.parent.mkdir()
    job_file.write_text("{}")
    # use_gpu: the command line a GPU job gets (--multi_gpu for several processes); the
    # children never touch CUDA, so this runs on a machine without one.
    outcome = launch.run(job_file, module="fakechild.main", processes=processes, use_gpu=True, precision="no",
                         threads=2, check_cancelled=lambda: None, on_progress=lambda item: None, device=device)
    seen = [json.loads((job_file.parent / f"seen.{rank}.json").read_text()) for rank in range(processes)]
    assert outcome["outcome"]["visible"] == expected
    assert all(s["visible"] == expected for s in seen)
    if processes > 1:
        assert sorted(s["local_rank"] for s in seen) == [str(r) for r in range(processes)]
        assert {s["world"] for s in seen} == {str(processes)}
