"""Device check: the foundation and the interventions run unchanged on CUDA (and through accelerate's
device_map), with the dtype chosen automatically. Run on a GPU machine from the repo root:

    PYTHONPATH=src python scripts/gpu_check.py

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")

from safetyscope.hooks import capture, forward, hooks  # noqa: E402
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
    print(f"{len(FAILED)} failed" + (": " + ", ".join(FAILED) if FAILED else ""))
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
