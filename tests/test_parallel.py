"""Data parallel under torchrun (gloo, 2 CPU processes): the same results as one process, rank 0 writes.

One launch of ``torchrun --standalone`` (it picks a free port) runs ``tests/parallel_worker.py``: the
library paths (statistics, generation, logits, direction search, neurons, probes, eval) and then the
``eval`` command in the same process group; both are compared with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safetyscope import parallel
from safetyscope.stats import GroupMoments, Moments, all_reduce_group_moments, all_reduce_moments

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    src = str(HERE.parent / "src")
    return {**os.environ, "SAFETYSCOPE_QUIET": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_one_process_is_a_world_of_one():
    assert not parallel.active() and parallel.rank() == 0 and parallel.world_size() == 1 and parallel.is_writer()
    assert parallel.shard(list("abcde")) == list("abcde") and parallel.gather_objects(3) == [3]
    assert parallel.unshard([[0, 2, 4], [1, 3]]) == [0, 1, 2, 3, 4]  # the inverse of rank-strided shards
    m = Moments().update(torch.randn(5, 3))
    assert all_reduce_moments([m]) == [m]
    gm = GroupMoments()
    assert all_reduce_group_moments(gm) is gm
    with parallel.session() as distributed:
        assert distributed is False


@pytest.fixture(scope="module")
def two_ranks(tiny_dir, tmp_path_factory):
    """(worker output dir, eval CLI args without --out, its --out) after one 2-process torchrun launch."""
    root = tmp_path_factory.mktemp("parallel")
    (root / "h.txt").write_text("".join(f"tell me about {w} X now\n" for w in ("qz", "vx", "kj", "zz", "qq")))
    (root / "s.txt").write_text("".join(f"tell me about {w}.\n" for w in ("ae", "io", "lu", "ra", "en")))
    args = ["eval", str(tiny_dir), "--harmful", str(root / "h.txt"), "--harmless", str(root / "s.txt"),
            "--scary", "none", "--max-new-tokens", "5", "--batch-size", "2", "--gen-batch-size", "2",
            "--ppl-max-tokens", "32", "--json"]
    cmd = [*TORCHRUN, str(HERE / "parallel_worker.py"), str(tiny_dir), str(root / "two"), *args, "--out",
           str(root / "eval-two")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "error" not in res.stderr.lower()
    return root, args


def test_library_results_under_torchrun_equal_one_process(two_ranks, tiny_dir):
    root, _args = two_ranks
    sys.path.insert(0, str(HERE))
    try:
        from parallel_worker import compute
    finally:
        sys.path.remove(str(HERE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: float32 matrix products can round differently with more threads
    try:
        one, one_t = compute(str(tiny_dir))
    finally:
        torch.set_num_threads(threads)
    ranks = [json.loads((root / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(root / "two" / f"rank{r}.safetensors")) for r in (0, 1)]
    for key in ("replies", "direction", "neurons", "probe_best", "eval_harmful", "eval_replies", "n"):
        assert ranks[0][key] == ranks[1][key] == one[key], key  # the same replies, direction, neurons, counts
    for key in ("eval_kl", "eval_ppl"):
        assert ranks[0][key] == ranks[1][key] and ranks[0][key] == pytest.approx(one[key], rel=1e-4), key
    assert len(one["replies"]) == 22 and any(one["replies"])
    assert [r["collectives"]["shard"] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5]]
    for r in ranks:
        assert r["collectives"]["unshard"] == list(range(7)) and r["collectives"]["sum"] == [3.0]
        assert r["collectives"]["broadcast"] == "from 0"
    assert sorted(tensors[0]) == sorted(one_t) and any("|m2" in k for k in one_t)
    for name, t in one_t.items():
        assert torch.equal(tensors[0][name], tensors[1][name]), name  # every rank holds the merged result
        # float64 moments merged in another order; float32 logits/direction from batches of the same prompts
        torch.testing.assert_close(tensors[0][name].double(), t.double(), rtol=1e-5, atol=1e-6)


def test_eval_command_under_torchrun_writes_once_and_equals_one_process(two_ranks):
    from typer.testing import CliRunner

    from safetyscope.cli.main import app

    root, args = two_ranks
    printed = json.loads((root / "two" / "rank0.stdout").read_text())
    assert (root / "two" / "rank1.stdout").read_text() == ""  # rank 1 printed nothing
    single = CliRunner().invoke(app, [*args, "--out", str(root / "eval-one")])
    assert single.exit_code == 0, single.output[-2000:]
    written = sorted(p.name for p in (root / "eval-two").iterdir())  # no lock or temporary file left by rank 1
    assert written == sorted(p.name for p in (root / "eval-one").iterdir()) and "eval.json" in written
    assert (root / "eval-two" / "replies.jsonl").read_text() == (root / "eval-one" / "replies.jsonl").read_text()
    two, one = (json.loads((root / d / "eval.json").read_text()) for d in ("eval-two", "eval-one"))
    for key in ("refusal_rate", "over_refusal", "samples", "sets", "auroc"):
        assert two[key] == one[key] == printed[key], key
    for kind, ce in one["perplexity"].items():
        assert two["perplexity"][kind]["modified"]["ce"] == pytest.approx(ce["modified"]["ce"], rel=1e-5)


def test_more_ranks_than_gpus_is_a_one_line_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine (seen on an H200): nccl needs a GPU per rank."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(parallel.DistributedError, match="--nproc-per-node 1") as err:
        parallel.init_from_env()
    assert "\n" not in str(err.value)
