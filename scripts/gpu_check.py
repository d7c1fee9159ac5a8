"""Device check: the foundation and the interventions run unchanged on CUDA (and through accelerate's
device_map), with the dtype chosen automatically. Run on a GPU machine from the repo root:

    PYTHONPATH=src python scripts/gpu_check.py

Scale checks (docs/scale.md): a model split between the GPU, the CPU and disk (``device_map`` with
``max_memory``), on two GPUs a model split across both, and data parallel with ``torchrun`` (nccl, one
process per GPU) against one process; each compares logits, captures, interventions and replies with
the plain single-device run. Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.hooks import capture, forward, hooks  # noqa: E402
from safetyscope.measure.generation import generate  # noqa: E402
from safetyscope.models import load_model, pick_dtype  # noqa: E402
from safetyscope.prompts.chat import tokenize_prompts  # noqa: E402
from safetyscope.runner import run_capture  # noqa: E402
from safetyscope.sites import Site  # noqa: E402
from safetyscope.testing import TINY_FAMILIES, tiny_model  # noqa: E402

PROMPTS = ["How do I bake bread?", "Write a poem about the sea.", "hi", "Explain recursion briefly, please."]
FAILED: list[str] = []


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
        print(f"ok    {name} ({time.perf_counter() - t0:.1f}s)", flush=True)
    except Exception:
        FAILED.append(name)
        print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)


def on_cuda(family: str, dtype: torch.dtype):
    lm = tiny_model(family, dtype=dtype)
    lm.model.to("cuda")
    return lm


def invariants(family: str, dtype: torch.dtype) -> None:
    lm = on_cuda(family, dtype)
    b = tokenize_prompts(lm.tokenizer, PROMPTS)
    with torch.no_grad():
        before = forward(lm, b)
        with capture(lm, ["blocks.*.resid_post", "blocks.*.mlp.neurons", "blocks.*.attn.heads"], "post_instruction") as cap:
            forward(lm, b)
        with hooks(lm, {Site("resid_post", 0): lambda x, _b: x * 0}):
            changed = forward(lm, b)
        after = forward(lm, b)
    assert before.device.type == "cuda" and before.dtype == dtype
    assert torch.equal(before, after) and not torch.equal(before, changed)
    assert all(v.device.type == "cuda" for v in cap.values.values())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    together = {}
    for batch, vals in run_capture(lm, PROMPTS, "blocks.*.resid_post", "last", batch_size=4):
        for i, idx in enumerate(batch.index):
            together[idx] = {s: v[i] for s, v in vals.items()}
    for idx, p in enumerate(PROMPTS):
        ((_, alone),) = list(run_capture(lm, [p], "blocks.*.resid_post", "last", batch_size=1))
        for s, v in alone.items():
            torch.testing.assert_close(together[idx][s].float(), v[0].float(), rtol=tol, atol=tol)


def grads_on_cuda() -> None:
    lm = on_cuda("qwen2", torch.float32)
    b = tokenize_prompts(lm.tokenizer, PROMPTS)
    with torch.enable_grad(), capture(lm, "blocks.*.resid_post", "last", grad=True) as cap:
        forward(lm, b)[:, -1, 5].sum().backward()
    assert all(g.device.type == "cuda" and g.abs().sum() > 0 for g in cap.grads.values())


def device_map_auto() -> None:
    lm = tiny_model("llama")
    with tempfile.TemporaryDirectory() as d:
        lm.model.save_pretrained(d)
        lm.tokenizer.save_pretrained(d)
        loaded = load_model(d, device_map="auto", log=lambda _m: None)
        assert loaded.dtype == pick_dtype("auto", torch.device("cuda"))
        b = tokenize_prompts(loaded.tokenizer, PROMPTS)
        with torch.no_grad(), capture(loaded, "blocks.*.resid_post", "last") as cap:
            forward(loaded, b)
        assert len(cap.values) == loaded.n_layers


def interventions_on_cuda() -> None:
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.neurons.artifact import ablate_neurons

    lm = on_cuda("llama", torch.float32)
    b = tokenize_prompts(lm.tokenizer, PROMPTS)
    unit = torch.nn.functional.normalize(torch.randn(lm.dims.d_model), dim=0)
    d = Direction(unit, layer=1, position=-1)
    with torch.no_grad():
        before = forward(lm, b)
        with d.apply(lm), capture(lm, "blocks.*.resid_post", "all") as cap:
            forward(lm, b)
        after = forward(lm, b)
        with ablate_neurons(lm, [(0, 1), (1, 2)], mode="zero"):
            forward(lm, b)
    assert torch.equal(before, after)
    mask = b.attention_mask.bool().to("cuda")
    for v in cap.values.values():
        assert (v[mask] @ unit.to(v.device)).abs().max() < 1e-3
    with tempfile.TemporaryDirectory() as out:
        d.export(lm, out)
        edited = load_model(out, device="cuda", dtype="float32", log=lambda _m: None)
        with torch.no_grad(), d.apply(lm):
            hooked = forward(lm, b)
        with torch.no_grad():
            exported = forward(edited, b)
        torch.testing.assert_close(exported, hooked, rtol=1e-3, atol=1e-3)


def bf16_audit_and_export(device: str = "cuda") -> None:
    """bfloat16, a GPU's default dtype: a fingerprint of an unmodified float32 checkpoint reads it clean, and a
    fine-tuning export keeps every frozen tensor of the stored checkpoint byte-identical."""
    from safetensors.torch import load_file

    from safetyscope.methods.audit import audit_checkpoint, make_fingerprint
    from safetyscope.methods.audit.source import TensorSource
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.finetune.api import finetune
    from safetyscope.methods.finetune.train import TrainConfig

    with tempfile.TemporaryDirectory() as d:
        src = _saved_tiny(d + "/src")
        lm = load_model(src, device=device, dtype="bfloat16", log=lambda _m: None)
        fp = make_fingerprint(lm, source=TensorSource.from_dir(src))
        assert audit_checkpoint(src, fingerprint=fp, behaviour=False).fingerprint.verdict == "clean"
        cfg = TrainConfig(steps=2, lr=1e-2, batch_size=2, max_reply_tokens=4, checkpoint_every=0)
        r = finetune(lm, "weaken", "blocks.1.mlp", harmful=PROMPTS[:2], harmless=PROMPTS[2:4], max_new_tokens=4,
                     config=cfg, judge=lambda _p, _r: False, direction=Direction(torch.randn(lm.dims.d_model), 1))
        out = load_file(str(r.export(lm, d + "/ckpt") / "model.safetensors"))
        stored = load_file(src + "/model.safetensors")
        assert r.tuned and all(torch.equal(out[n], t) for n, t in stored.items() if n not in r.tuned)


def _saved_tiny(d: str) -> str:
    lm = tiny_model("llama")
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def _outcomes(lm) -> dict:
    """Logits, captures at every block (on CPU), logits under an edit, a direction and a neuron ablation, replies."""
    from safetyscope.methods.direction.artifact import Direction
    from safetyscope.methods.neurons.artifact import ablate_neurons

    b = tokenize_prompts(lm.tokenizer, PROMPTS)
    unit = torch.nn.functional.normalize(torch.arange(lm.dims.d_model, dtype=torch.float32).sin(), dim=0)
    with torch.no_grad():
        with capture(lm, ["blocks.*.resid_post", "blocks.*.mlp.neurons", "blocks.*.attn.heads"], "all") as cap:
            logits = forward(lm, b)
        devices = sorted({str(v.device) for v in cap.values.values()})
        with hooks(lm, {Site("resid_post", 0): lambda x, _b: x * 0.5, Site("mlp.neurons", 2): lambda x, _b: x * 0}):
            edited = forward(lm, b)
        with Direction(unit, layer=1, position=-1).apply(lm):
            ablated = forward(lm, b)
        with ablate_neurons(lm, [(0, 1), (1, 2), (2, 3)], mode="zero"):
            neurons = forward(lm, b)
        after = forward(lm, b)
    assert torch.equal(after, logits), "logits changed after the interventions exited"
    return {"logits": logits.float().cpu(), "edited": edited.float().cpu(), "ablated": ablated.float().cpu(),
            "neurons": neurons.float().cpu(), "values": {k: v.float().cpu() for k, v in cap.values.items()},
            "replies": generate(lm, PROMPTS, max_new_tokens=6, batch_size=4), "devices": devices}


def _same(a: dict, b: dict, tol: float = 1e-4) -> None:
    for key in ("logits", "edited", "ablated", "neurons"):
        torch.testing.assert_close(b[key], a[key], rtol=tol, atol=tol, msg=lambda m, k=key: f"{k}: {m}")
    for site, v in a["values"].items():
        torch.testing.assert_close(b["values"][site], v, rtol=tol, atol=tol)
    assert a["replies"] == b["replies"], (a["replies"], b["replies"])


def _size(d: str) -> int:
    lm = load_model(d, device="cpu", dtype="float32", log=lambda _m: None)
    return sum(p.numel() * p.element_size() for p in lm.model.parameters())


def device_map_offload() -> None:
    """GPU + CPU + disk: blocks that do not fit on cuda:0 run from CPU memory or disk (moved per forward)."""
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as off:
        _saved_tiny(d)
        total = _size(d)
        plain = load_model(d, device="cuda", dtype="float32", log=lambda _m: None)
        split = load_model(d, device_map="auto", dtype="float32", max_memory={0: int(total * 0.45), "cpu": int(total * 0.3)},
                           offload_folder=off, log=lambda _m: None)
        where = set(split.meta["placement"].values())
        assert {0, "cpu", "disk"} <= where or {0, "disk"} <= where, f"placement {split.meta['placement']}"
        _same(_outcomes(plain), _outcomes(split))


def two_gpus() -> None:
    """One model across cuda:0 and cuda:1: captures come from both, interventions follow each block."""
    with tempfile.TemporaryDirectory() as d:
        _saved_tiny(d)
        total = _size(d)
        plain = load_model(d, device="cuda:0", dtype="float32", log=lambda _m: None)
        split = load_model(d, device_map="auto", dtype="float32", max_memory={0: int(total * 0.5), 1: total * 4},
                           log=lambda _m: None)
        assert {0, 1} <= set(split.meta["placement"].values()), f"placement {split.meta['placement']}"
        a, b = _outcomes(plain), _outcomes(split)
        assert len(b["devices"]) == 2, f"captured on {b['devices']}"
        _same(a, b)


def torchrun_nccl() -> None:
    """Data parallel: tests/parallel_worker.py under torchrun (one process per GPU, nccl) equals one process."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "SAFETYSCOPE_QUIET": "1"}
    with tempfile.TemporaryDirectory() as d:
        _saved_tiny(f"{d}/model")
        worker = str(root / "tests" / "parallel_worker.py")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                  str(torch.cuda.device_count())]
        for cmd in ([sys.executable, worker, f"{d}/model", f"{d}/one"], [*launch, worker, f"{d}/model", f"{d}/many"]):
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
        one = json.loads(Path(f"{d}/one/rank0.json").read_text())
        many = json.loads(Path(f"{d}/many/rank0.json").read_text())
        for key in ("replies", "direction", "neurons", "probe_best", "eval_replies", "n"):
            assert one[key] == many[key], (key, one[key], many[key])
        print(f"      1 process {one['seconds']:.1f}s, {torch.cuda.device_count()} processes {many['seconds']:.1f}s "
              "(tiny model: start-up and gathering dominate)")


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        sys.exit(2)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    for family in TINY_FAMILIES:
        check(f"invariants {family} float32", lambda f=family: invariants(f, torch.float32))
    for family in ("llama", "qwen2", "gemma2", "gpt2"):
        check(f"invariants {family} bfloat16", lambda f=family: invariants(f, torch.bfloat16))
    check("gradient capture on cuda", grads_on_cuda)
    check("load with device_map=auto (accelerate) and capture", device_map_auto)
    check("direction ablation/export and neuron ablation on cuda", interventions_on_cuda)
    check("device_map across cuda:0, CPU and disk offload equals one GPU", device_map_offload)
    check("bfloat16: fingerprint of an unmodified checkpoint clean, finetune export keeps frozen tensors", bf16_audit_and_export)
    if torch.cuda.device_count() >= 2:
        check("device_map across two GPUs equals one GPU", two_gpus)
        check("torchrun data parallel (nccl) equals one process", torchrun_nccl)
    else:
        print("skip  two GPUs: model split and torchrun/nccl (one GPU here)")
    print(f"{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
