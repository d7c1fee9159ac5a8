"""Capture side by side: safetyscope against TransformerLens, nnsight, output_hidden_states and a per-layer loop.

    make bench-peers                                   # builds the peers venv, runs default + small
    PYTHONPATH=src $PEERS_VENV/bin/python benchmarks/peers_capture.py --model default
    PYTHONPATH=src $PEERS_VENV/bin/python benchmarks/peers_capture.py --model tiny --prompts 4 --repeats 1

Runs inside the *peers* venv (transformer-lens and nnsight installed next to the same torch wheel,
never in safetyscope's own venv) with safetyscope imported from ``src`` (PYTHONPATH=src). A peer
that is not installed is reported as skipped, with the reason.

Sites: every block's residual stream after the block (``blocks.*.resid_post``) and its MLP neurons
(the down-projection's input, ``blocks.*.mlp.neurons``), at the last token and at every position,
for the same left-padded chat-formatted batches. Each tool gets the batches exactly as they are
(input_ids, attention_mask, position_ids) and keeps what it captured (its way: a dict, TL's
ActivationCache, nnsight's saved proxies); "last" keeps [:, -1] only.

- plain            ``forward(lm, batch, last_only=True)``: the model's forward pass, last-token logits only, with
                   safetyscope's shared-prefix reuse (the chat template's opening runs once; safetyscope.prefix)
- safetyscope      ``capture(lm, sites, positions)`` around that forward pass (``last`` keeps the reuse;
                   ``all`` reads the prefix positions, so it runs every token)
- plain_full, safetyscope_full   the same under ``prefix_reuse(False)``: every token runs, the work the peers do
- hidden_states    ``output_hidden_states=True`` (residual stream only: no neurons)
- naive_loop       one forward pass per block, a torch hook on that block (resid + neurons)
- transformer_lens ``TransformerBridge.boot_transformers(local dir)``, ``run_with_cache(names_filter=)``
- nnsight          ``TransformersModel(local dir)``, ``trace`` + ``.save()``

TransformerLens and nnsight load their own copy of the weights from the same local directory
(TransformerLens forces eager attention: that is its default, kept). Times: interleaved rounds after
one warm-up each, min and median per prompt; peak memory: each tool once more in a fresh
subprocess (peak RSS growth during a second, warm run, over the RSS after the first). Equality: every
tool's activations against safetyscope's, over the real (non-pad) positions, max |diff| / max |ref|.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SAFETYSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from safetyscope.hooks import capture, forward  # noqa: E402
from safetyscope.models import load_model  # noqa: E402
from safetyscope.models.adapter import LoadedModel  # noqa: E402
from safetyscope.positions import Batch  # noqa: E402
from safetyscope.prefix import prefix_reuse  # noqa: E402
from safetyscope.prompts import builtin_prompts  # noqa: E402
from safetyscope.prompts.chat import tokenize_prompts  # noqa: E402
from safetyscope.testing import interleaved_times  # noqa: E402

TOOLS = ("plain", "safetyscope", "plain_full", "safetyscope_full", "hidden_states", "naive_loop", "transformer_lens",
         "nnsight")
YARDSTICKS = ("plain", "plain_full", "safetyscope")  # not checked against safetyscope (no activations, or the reference)
SITES = ["blocks.*.resid_post", "blocks.*.mlp.neurons"]
Acts = dict[tuple[str, int], torch.Tensor]  # (kind, layer) -> [batch, k, d]
Runner = Callable[[], list[Acts]]


def module_at(root: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def keep(t: torch.Tensor, positions: str) -> torch.Tensor:
    """[batch, pos, d] -> [batch, 1, d] (last: left padding puts every row's last token at -1) or all."""
    return t[:, -1:].detach() if positions == "last" else t.detach()


def model_dir_of(name: str, tmp: Path) -> str:
    """A local HF directory for ``name``: an embedded alias's converted cache, a tiny random model, a path."""
    if name == "tiny":
        from safetyscope.testing import tiny_model

        lm = tiny_model("qwen2")
        lm.model.save_pretrained(tmp / "tiny")
        lm.tokenizer.save_pretrained(tmp / "tiny")
        return str(tmp / "tiny")
    if Path(name).is_dir():
        return name
    from safetyscope.models.embedded import ensure_embedded

    return str(ensure_embedded(name))


def texts_of(n: int) -> list[str]:
    """n prompts: half harmful, half harmless (the built-in train split)."""
    return builtin_prompts("harmful", "train").texts[: n // 2] + builtin_prompts("harmless", "train").texts[: n - n // 2]


def make_batches(lm: LoadedModel, n: int, batch_size: int) -> list[Batch]:
    texts = texts_of(n)
    return [tokenize_prompts(lm.tokenizer, texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)]


def inputs(b: Batch) -> dict[str, torch.Tensor]:
    return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "position_ids": b.position_ids}


# ---- the tools -------------------------------------------------------------------------------------
def plain_runner(lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    def run() -> list[Acts]:
        with torch.inference_mode():
            for b in batches:
                forward(lm, b, last_only=True)
        return []

    return run


def safetyscope_runner(lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    def run() -> list[Acts]:
        out = []
        with torch.inference_mode(), capture(lm, SITES, positions) as cap:
            for b in batches:
                forward(lm, b, last_only=True)
                out.append({("resid" if s.kind == "resid_post" else "neurons", s.layer): v
                            for s, v in cap.values.items()})
                cap.values.clear()
        return out

    return run


def full(runner: Callable[[LoadedModel, list[Batch], str], Runner]) -> Callable[[LoadedModel, list[Batch], str], Runner]:
    """``runner`` with shared-prefix reuse off: every token runs."""

    def make(lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
        run = runner(lm, batches, positions)

        def run_full() -> list[Acts]:
            with prefix_reuse(False):
                return run()

        return run_full

    return make


def hidden_states_runner(lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    def run() -> list[Acts]:
        out = []
        with torch.inference_mode():
            for b in batches:
                hs = lm.model(**inputs(b), use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states
                # hs[0] is the embedding output; hs[-1] is the *final norm's* output, not block n-1's
                out.append({("resid", i): keep(h, positions) for i, h in enumerate(hs[1:-1])})
        return out

    return run


def naive_loop_runner(lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    """The seed approach: for each block, one full forward pass with plain torch hooks on that block."""
    table = lm.table

    def run() -> list[Acts]:
        out = []
        with torch.inference_mode():
            for b in batches:
                acts: Acts = {}
                for layer in range(lm.n_layers):
                    block = module_at(lm.model, table.block_path(layer))
                    down = module_at(lm.model, table.expand(table.mlp_out_proj, layer))
                    h1 = block.register_forward_hook(
                        lambda _m, _a, o, layer=layer, acts=acts: acts.__setitem__(
                            ("resid", layer), keep(o[0] if isinstance(o, tuple) else o, positions)))
                    h2 = down.register_forward_pre_hook(
                        lambda _m, a, layer=layer, acts=acts: acts.__setitem__(("neurons", layer), keep(a[0], positions)))
                    try:
                        lm.model(**inputs(b), use_cache=False, logits_to_keep=1)
                    finally:
                        h1.remove()
                        h2.remove()
                out.append(acts)
        return out

    return run


def transformer_lens_runner(model_dir: str, lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu", dtype=torch.float32, tokenizer=lm.tokenizer)
    names = {f"blocks.{i}.hook_resid_post": ("resid", i) for i in range(lm.n_layers)}
    names.update({f"blocks.{i}.mlp.hook_post": ("neurons", i) for i in range(lm.n_layers)})

    def run() -> list[Acts]:
        out = []
        with torch.inference_mode():
            for b in batches:
                _, cache = bridge.run_with_cache(b.input_ids, attention_mask=b.attention_mask,
                                                 position_ids=b.position_ids, names_filter=list(names))
                out.append({key: keep(cache[name], positions) for name, key in names.items()})
        return out

    return run


def nnsight_runner(model_dir: str, lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    from nnsight import TransformersModel

    model = TransformersModel(model_dir, task="text-generation", device_map="cpu", dtype=torch.float32,
                              dispatch=True)
    table = lm.table

    def run() -> list[Acts]:
        out = []
        with torch.inference_mode():
            for b in batches:
                saved: list[tuple[tuple[str, int], Any]] = []
                with model.trace(**inputs(b), use_cache=False, logits_to_keep=1):
                    for i in range(lm.n_layers):  # in execution order: the MLP's input, then the block's output
                        x = module_at(model, table.expand(table.mlp_out_proj, i)).input
                        saved.append((("neurons", i), (x[:, -1:] if positions == "last" else x).save()))
                        h = module_at(model, table.block_path(i)).output
                        saved.append((("resid", i), (h[:, -1:] if positions == "last" else h).save()))
                out.append({key: torch.as_tensor(v).detach() for key, v in saved})
        return out

    return run


def build(tool: str, model_dir: str, lm: LoadedModel, batches: list[Batch], positions: str) -> Runner:
    local = {"plain": plain_runner, "safetyscope": safetyscope_runner, "plain_full": full(plain_runner),
             "safetyscope_full": full(safetyscope_runner), "hidden_states": hidden_states_runner,
             "naive_loop": naive_loop_runner}
    if tool in local:
        return local[tool](lm, batches, positions)
    peer = {"transformer_lens": transformer_lens_runner, "nnsight": nnsight_runner}[tool]
    return peer(model_dir, lm, batches, positions)


def peer_missing(tool: str) -> str | None:
    """Why a peer cannot run here (None: it can)."""
    import importlib.util

    module = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}.get(tool)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} is not installed in {sys.prefix} (make bench-peers builds the peers venv)"
    return None


# ---- measurement -----------------------------------------------------------------------------------
def compare(ref: list[Acts], got: list[Acts], batches: list[Batch], positions: str) -> dict[str, Any]:
    """Max |got - ref| over the real positions of every site both hold, relative to max |ref|."""
    worst, scale, n_sites, missing = 0.0, 0.0, 0, 0
    for r, g, b in zip(ref, got, batches):
        mask = b.attention_mask[:, -1:] if positions == "last" else b.attention_mask  # [batch, k]
        for key, rv in r.items():
            if key not in g:
                missing += 1
                continue
            gv = g[key].to(rv.dtype).reshape(rv.shape)
            m = mask.bool().view(*mask.shape, *([1] * (rv.dim() - 2)))
            worst = max(worst, float(((gv - rv).abs() * m).max()))
            scale = max(scale, float((rv.abs() * m).max()))
            n_sites += 1
    return {"max_abs_diff": worst, "rel_diff": worst / max(scale, 1e-30), "sites_compared": n_sites // max(len(ref), 1),
            "sites_missing": missing // max(len(ref), 1)}


def peak_memory(tool: str, args: argparse.Namespace, model_dir: str, positions: str) -> float | None:
    """Peak RSS growth (MiB) of one warm run of ``tool`` in a fresh process (loaded, run once, then measured)."""
    cmd = [sys.executable, __file__, "--memory-probe", tool, "--model", model_dir, "--positions", positions,
           "--prompts", str(args.prompts), "--batch-size", str(args.batch_size),
           "--loop-prompts", str(args.loop_prompts)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if res.returncode == 0 and lines else None


def memory_probe(args: argparse.Namespace) -> None:
    lm = load_model(args.model)
    batches = (make_batches(lm, args.prompts, args.batch_size) if args.memory_probe != "naive_loop"
               else [tokenize_prompts(lm.tokenizer, texts_of(args.loop_prompts))])
    run = build(args.memory_probe, args.model, lm, batches, args.positions)
    run()  # warm-up: lazily loaded (mmapped) weights and allocator pools are resident before the measured run
    before = rss_mib()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    run()
    print(json.dumps({"peak_mib": peak_rss_mib() - before}))


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """VmHWM: the peak RSS since the last reset (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(args: argparse.Namespace, model_dir: str, positions: str) -> dict[str, Any]:
    lm = load_model(model_dir)
    batches = make_batches(lm, args.prompts, args.batch_size)
    skipped = {t: why for t in TOOLS if (why := peer_missing(t))}
    loop_batches = [tokenize_prompts(lm.tokenizer, texts_of(args.loop_prompts))]
    runners = {t: build(t, model_dir, lm, loop_batches if t == "naive_loop" else batches, positions)
               for t in TOOLS if t not in skipped}
    ref = runners["safetyscope"]()
    ref_loop = safetyscope_runner(lm, loop_batches, positions)()
    checks = {t: compare(ref_loop if t == "naive_loop" else ref, fn(), loop_batches if t == "naive_loop" else batches,
                         positions) for t, fn in runners.items() if t not in YARDSTICKS}  # + warm-up
    times, _ = interleaved_times({t: fn for t, fn in runners.items() if t != "naive_loop"}, args.repeats, warmup=False)
    t0 = time.perf_counter()
    runners["naive_loop"]()
    times["naive_loop"] = [(time.perf_counter() - t0) * args.prompts / args.loop_prompts]  # scaled to --prompts
    n = sum(b.input_ids.shape[0] for b in batches)
    return {"model": lm.name, "model_dir": model_dir, "n_layers": lm.n_layers, "positions": positions,
            "prompts": n, "batch_size": args.batch_size, "tokens_per_row": [b.input_ids.shape[1] for b in batches],
            "repeats": args.repeats, "threads": torch.get_num_threads(), "skipped": skipped,
            "times": {t: {"min": min(v) / n, "median": statistics.median(v) / n} for t, v in times.items()},
            "checks": checks, "peak_mib": {}}


def report(res: dict[str, Any], tol: float) -> None:
    t = res["times"]
    plain, ss = t["plain"]["median"], t["safetyscope"]["median"]
    print(f"\n== {res['model']} ({res['n_layers']} blocks), positions={res['positions']}, {res['prompts']} prompts, "
          f"batch {res['batch_size']}, {res['repeats']} interleaved rounds, {res['threads']} threads")
    print(f"{'tool':18s} {'min s/prompt':>12s} {'med s/prompt':>12s} {'/plain':>7s} {'/safetyscope':>12s} "
          f"{'peak MiB':>9s} {'rel diff':>9s} {'equal':>6s}")
    for tool in TOOLS:
        if tool in res["skipped"]:
            print(f"{tool:18s} skipped: {res['skipped'][tool]}")
            continue
        c = res["checks"].get(tool)
        mem = res["peak_mib"].get(tool)
        eq = "-" if c is None else ("yes" if c["rel_diff"] <= tol and not c["sites_missing"] else "NO")
        mem_s = "-" if mem is None else f"{mem:.0f}"
        diff_s = "-" if c is None else f"{c['rel_diff']:.1e}"
        print(f"{tool:18s} {t[tool]['min']:12.4f} {t[tool]['median']:12.4f} {t[tool]['median'] / plain:7.2f} "
              f"{t[tool]['median'] / ss:12.2f} {mem_s:>9s} {diff_s:>9s} {eq:>6s}"
              + ("" if c is None or not c["sites_missing"] else f"  ({c['sites_missing']} sites not captured)"))
    print(f"safetyscope / plain forward: {ss / plain:.3f} (target <= 1.10; both with prefix reuse)")
    ss_full, plain_full = t["safetyscope_full"]["median"], t["plain_full"]["median"]
    print(f"safetyscope / plain_full forward: {ss / plain_full:.3f}; safetyscope_full / plain_full: "
          f"{ss_full / plain_full:.3f} (every token, as the peers)")
    for peer in ("transformer_lens", "nnsight"):
        if peer in t:
            print(f"{peer} / safetyscope: {t[peer]['median'] / ss:.2f} (target >= 1.00); {peer} / safetyscope_full: "
                  f"{t[peer]['median'] / ss_full:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="alias, local HF dir or 'tiny' (repeatable; default: default)")
    ap.add_argument("--positions", default="last,all", help="last, all or both (comma-separated)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loop-prompts", type=int, default=2, help="prompts for the slow per-block loop (timed once)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |diff| / max |ref| counted as equal")
    ap.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                    help="torch threads (default: 2, or 1 on one core); 1 leaves a core to another job")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        args.model = args.model[0]
        memory_probe(args)
        return
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model or ["default"]:
            model_dir = model_dir_of(name, Path(tmp))
            for positions in args.positions.split(","):
                res = bench(args, model_dir, positions)
                report(res, args.tol)
                results.append(res)
            for res in results if args.memory else []:  # after every timing: a fresh process per tool
                if res["model_dir"] == model_dir:
                    res["peak_mib"] = {t: peak_memory(t, args, model_dir, res["positions"])
                                       for t in TOOLS if t not in res["skipped"]}
                    report(res, args.tol)
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
