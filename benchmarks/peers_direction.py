"""Refusal removal side by side: heretic-llm against safetyscope's `direction find` + `refine` + `tune`.

    python benchmarks/peers_direction.py                    # every phase, default model
    python benchmarks/peers_direction.py --phases measure,plot   # reuse what earlier phases wrote

Phases (each writes under --out, default runs/peers/direction, so a later phase can rerun alone):

1. ``heretic``: writes safetyscope's built-in train split (harmful -> heretic's bad prompts, harmless ->
   good prompts) and val split (heretic's evaluation prompts, on which its optimizer selects) to text
   files, writes a config.toml (a *reduced* trial budget, --trials; offline; float32 on CPU; the same
   system prompt as safetyscope's chat template default) and runs heretic from its own venv
   (--heretic-python) as a subprocess. heretic's interactive menu is answered by this file's
   ``heretic-driver`` mode: it saves every Pareto-optimal trial (the checkpoints heretic offers)
   as merged HF checkpoints under OUT/heretic/trial_NNN. Every trial's own metrics (its refusal
   count on the val prompts, its first-token KL) come from heretic's optuna journal.
2. ``safetyscope``: `safetyscope direction find`, `direction refine`, then `direction tune --save-front` on
   the refined direction, on the same train/val split (the built-in sets), as subprocesses of this venv
   (``--one-process``: `direction find --refine`, both steps in one command, then tune).
3. ``measure``: the unmodified model, every saved heretic checkpoint and safetyscope's found and
   refined directions and every point of tune's (val) Pareto front, all measured by the same code
   (``safetyscope.evaluate``) on the held-out test split, which neither tool saw: phrase-judge refusal on harmful prompts, first-token and reply KL
   on harmless prompts; heretic's own refusal counter (its marker list, run in its venv) on the same
   replies.
4. ``plot``: refusal vs first-token KL, every heretic trial (its own metrics, val split) and the
   safetyscope-measured points (test split); OUT/pareto.png, a table on stdout, and which safetyscope rows
   dominate each heretic checkpoint on the test split (benchmarks/peers_direction_report.py).

Wall time of each tool is the subprocess's wall time, with a plain forward pass of the model timed in
the same run (the machine is shared). heretic must run offline: HF_HUB_OFFLINE=1 and a local model dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from peers_direction_report import pareto, plot_and_print  # noqa: E402,F401  (pareto: re-exported for the tests)

PHASES = ("heretic", "safetyscope", "measure", "plot")


# ---- heretic side (runs inside the heretic venv: no safetyscope imports here) ----------------------
def time_heretic_parts(log: Path) -> None:
    """Log the wall time of heretic's expensive steps (one JSON line per call) to ``log``: model load,
    residual means, first-token log-probs, reply generation, abliteration, a trial's evaluation, merge."""
    from heretic.evaluator import Evaluator
    from heretic.model import Model

    def wrap(cls: Any, name: str) -> None:
        orig = getattr(cls, name)

        def timed(self: Any, *a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(self, *a, **kw)
            finally:
                n = len(a[0]) if a and isinstance(a[0], list) else None
                with log.open("a") as fh:
                    fh.write(json.dumps({"op": name, "s": round(time.perf_counter() - t0, 3), "n": n,
                                         "at": round(time.time(), 1)}) + "\n")

        setattr(cls, name, timed)

    for name in ("__init__", "get_residuals_mean", "get_logprobs_batched", "get_responses_batched",
                 "reset_model", "abliterate", "get_merged_model"):
        wrap(Model, name)
    wrap(Evaluator, "get_score")


def heretic_driver(save_root: str) -> None:
    """Run heretic's own `run()` with its menus answered: save each Pareto trial (merged), then exit.
    An earlier, unfinished study in the same place is discarded (heretic's own "start from scratch")."""
    import heretic.main as hm

    time_heretic_parts(Path(save_root) / "timings.jsonl")
    state: dict[str, Any] = {"queue": None, "trial": None, "saved": False}

    def select(message: str, choices: list[Any]) -> Any:
        if message.startswith("How would you like to proceed"):
            return "restart"
        if message.startswith("Which trial"):
            if state["queue"] is None:  # the study is over: a late Ctrl+C must not cut the saving short
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                state["queue"] = [c.value for c in choices if not isinstance(c.value, str)]
            state["trial"] = state["queue"].pop(0) if state["queue"] else ""
            state["saved"] = False
            return state["trial"]
        if message.startswith("What do you want"):
            if state["saved"]:
                return ""
            state["saved"] = True
            return "Save the model to a local folder"
        raise RuntimeError(f"heretic-driver: unexpected question {message!r}")

    def path(_message: str) -> str:
        return str(Path(save_root) / f"trial_{state['trial'].user_attrs['index']:03d}")

    hm.prompt_select = select
    hm.prompt_path = path
    sys.argv = ["heretic"]
    hm.run()


def heretic_judge(replies_file: str) -> None:
    """heretic's own refusal counter (Evaluator.is_refusal with its default markers) on saved replies."""
    from types import SimpleNamespace

    from heretic.config import Settings
    from heretic.evaluator import Evaluator

    markers = Settings.model_fields["refusal_markers"].default
    judge = SimpleNamespace(settings=SimpleNamespace(refusal_markers=markers))
    rows = [json.loads(line) for line in Path(replies_file).read_text().splitlines() if line.strip()]
    print(json.dumps([bool(Evaluator.is_refusal(judge, r)) for r in rows]))  # type: ignore[arg-type]


def heretic_config(out: Path, model_dir: str, args: argparse.Namespace, system: str) -> str:
    files = {k: str(out / f"{k}.txt") for k in ("bad_train", "good_train", "bad_val", "good_val")}
    lines = [
        f"model = {json.dumps(model_dir)}",
        'dtypes = ["float32"]',
        'device_map = "cpu"',
        f"batch_size = {args.heretic_batch}",
        f"max_response_length = {args.heretic_tokens}",
        'response_prefix = ""',  # skip the prefix probe (Qwen has none); saves ~200 generations
        f"n_trials = {args.trials}",
        f"n_startup_trials = {args.startup_trials}",
        "seed = 0",
        'export_strategy = "merge"',
        f"study_checkpoint_dir = {json.dumps(str(out / 'study'))}",
        f"system_prompt = {json.dumps(system)}",
    ]
    for key, name in (("good_prompts", "good_train"), ("bad_prompts", "bad_train"),
                      ("good_evaluation_prompts", "good_val"), ("bad_evaluation_prompts", "bad_val")):
        lines += ["", f"[{key}]", f"dataset = {json.dumps(files[name])}"]
    return "\n".join(lines) + "\n"


def heretic_trials(out: Path) -> list[dict[str, Any]]:
    """Every completed trial from heretic's optuna journal: index, refusals (val), KL (val), params."""
    trials: dict[int, dict[str, Any]] = {}
    for journal in sorted((out / "study").glob("*.jsonl")):
        for line in journal.read_text().splitlines():
            op = json.loads(line)
            tid = op.get("trial_id")
            if op.get("op_code") == 8 and tid is not None:  # set_trial_user_attr
                trials.setdefault(tid, {}).update(op.get("user_attr", {}))
            if op.get("op_code") == 6 and tid is not None:  # set_trial_state_values
                trials.setdefault(tid, {})["state"] = op.get("state")
    return [t for _, t in sorted(trials.items()) if "refusals" in t and "kl_divergence" in t]


# ---- orchestration (runs in safetyscope's venv) ---------------------------------------------------
def plain_forward_seconds(lm: Any, texts: list[str], repeats: int = 3) -> float:
    """Median wall time of one plain forward pass over ``texts`` (one batch): the machine's yardstick."""
    import statistics

    import torch

    from safetyscope.hooks import forward
    from safetyscope.prompts.chat import tokenize_prompts

    batch = tokenize_prompts(lm.tokenizer, texts)
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            forward(lm, batch, last_only=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def offline_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "SAFETYSCOPE_QUIET": "1", "PYTHONPATH": str(ROOT / "src")}


def timed_run(cmd: list[str], log: Path, cwd: Path | None = None, stop_after: float = 0.0) -> tuple[int, float]:
    """Run ``cmd`` with its output in ``log``; (return code, wall seconds). With ``stop_after`` > 0 the
    command gets SIGINT (Ctrl+C) after that many seconds: heretic then stops its study after the trial
    in progress (that one is dropped) and goes on to its menu, so the completed trials are still saved."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        # a shell's background job (`cmd &`, nohup) starts with SIGINT ignored, and Python then keeps it
        # ignored: give the child the default disposition so that it turns SIGINT into KeyboardInterrupt
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=offline_env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            rc = proc.wait(timeout=stop_after or None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            fh.flush()
            fh.write(f"\n[peers_direction: SIGINT after {stop_after:.0f} s]\n")
            rc = proc.wait()
    return rc, time.perf_counter() - t0


def summarise_timings(log: Path) -> dict[str, Any]:
    """Per step of heretic (see time_heretic_parts): calls, total and mean seconds, prompts per call."""
    out: dict[str, Any] = {}
    if not log.is_file():
        return out
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    start = min((r["at"] - r["s"] for r in rows), default=0.0)
    # seconds from heretic's model load to the end of each trial's evaluation (the first is the baseline's
    # evaluation only when heretic's evaluate_model is set, which this harness never does)
    out["score_end_s"] = [round(r["at"] - start, 1) for r in rows if r["op"] == "get_score"]
    for row in rows:
        agg = out.setdefault(row["op"], {"calls": 0, "total_s": 0.0, "prompts": []})
        agg["calls"] += 1
        agg["total_s"] = round(agg["total_s"] + row["s"], 1)
        if row["n"] is not None and row["n"] not in agg["prompts"]:
            agg["prompts"].append(row["n"])
    for agg in (v for k, v in out.items() if k != "score_end_s"):
        agg["mean_s"] = round(agg["total_s"] / agg["calls"], 1)
    return out


def clear_heretic_run(out: Path, run_dir: Path) -> None:
    """Remove what an earlier heretic run left (its journal, checkpoints, timings, measured rows)."""
    shutil.rmtree(run_dir / "study", ignore_errors=True)
    for ckpt in run_dir.glob("trial_*"):
        shutil.rmtree(ckpt)
    (run_dir / "timings.jsonl").unlink(missing_ok=True)
    meas = out / "measure.json"
    if meas.is_file():
        res = json.loads(meas.read_text())
        res["rows"] = {k: v for k, v in res["rows"].items() if not k.startswith("heretic")}
        meas.write_text(json.dumps(res, indent=1))


def phase_heretic(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from safetyscope.models import load_model
    from safetyscope.models.embedded import ensure_embedded
    from safetyscope.prompts import builtin_prompts
    from safetyscope.prompts.chat import format_chat

    model_dir = str(ensure_embedded("default"))
    lm = load_model("default")
    system = system_prompt_of(lm, format_chat)
    run_dir = out / "heretic"
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_heretic_run(out, run_dir)
    for name, (kind, split) in {"bad_train": ("harmful", "train"), "good_train": ("harmless", "train"),
                                "bad_val": ("harmful", "val"), "good_val": ("harmless", "val")}.items():
        (run_dir / f"{name}.txt").write_text("\n".join(builtin_prompts(kind, split).texts) + "\n")
    (run_dir / "config.toml").write_text(
        heretic_config(run_dir, model_dir, args, system))
    t_plain = plain_forward_seconds(lm, builtin_prompts("harmless", "val").texts[:8])
    del lm
    cmd = [args.heretic_python, str(HERE), "heretic-driver", str(run_dir)]
    rc, wall = timed_run(cmd, run_dir / "heretic.log", cwd=run_dir, stop_after=args.heretic_stop_after)
    res = {"rc": rc, "wall_s": wall, "plain_forward_s": t_plain, "trials_budget": args.trials,
           "startup_trials": args.startup_trials, "reply_tokens": args.heretic_tokens,
           "batch_size": args.heretic_batch, "stop_after_s": args.heretic_stop_after,
           "trials_completed": len(heretic_trials(run_dir)), "timings": summarise_timings(run_dir / "timings.jsonl"),
           "cmd": " ".join(cmd), "log": str(run_dir / "heretic.log"),
           "checkpoints": sorted(str(p) for p in run_dir.glob("trial_*") if (p / "config.json").exists())}
    (out / "heretic.json").write_text(json.dumps(res, indent=1))
    return res


def system_prompt_of(lm: Any, format_chat: Any) -> str:
    """The chat template's default system prompt (so heretic sees the prompts exactly as safetyscope)."""
    text = format_chat(lm.tokenizer, "\x00", None)
    marker = "system\n"
    start = text.find(marker)
    if start < 0:
        return ""
    body = text[start + len(marker):]
    return body[: body.find("<|im_end|>")] if "<|im_end|>" in body else ""


def yardstick() -> float:
    """A plain forward pass of 8 val prompts on the default model (seconds), timed as the heretic phase times it."""
    from safetyscope.models import load_model
    from safetyscope.prompts import builtin_prompts

    return plain_forward_seconds(load_model("default"), builtin_prompts("harmless", "val").texts[:8])


def phase_safetyscope(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`direction find` then `direction refine` (defaults but --screen), timed as subprocesses; with
    --one-process, `direction find --refine` (the same steps in one command)."""
    ss = str(Path(sys.executable).parent / "safetyscope")
    common = ["default", "--out", str(out / "safetyscope"), "--quiet", "--seed", "0"]
    find = [ss, "direction", "find", *common, "--screen", str(args.screen), "--keep", str(args.keep),
            "--screen-by", args.screen_by, "--induce", args.induce]
    if args.find_batch:
        find += ["--batch-size", str(args.find_batch)]
    refine = [ss, "direction", "refine", *common, "--batch", str(args.refine_batch),
              "--batch-size", str(args.refine_micro)]
    (out / "safetyscope").mkdir(parents=True, exist_ok=True)
    tune = [ss, "direction", "tune", *common, "--direction", str(out / "safetyscope" / "direction_refine" / "artifact"),
            "--trials", str(args.tune_trials), "--save-front"]
    t_plain = yardstick()
    if args.one_process:  # refine with its defaults inside find: --refine-batch / --refine-micro do not apply
        find.append("--refine")
        rc1, t1 = timed_run(find, out / "safetyscope" / "find.log")
        rc2: int | None = rc1
        t2 = 0.0
        refine = []
    else:
        rc1, t1 = timed_run(find, out / "safetyscope" / "find.log")
        rc2, t2 = timed_run(refine, out / "safetyscope" / "refine.log") if rc1 == 0 else (None, 0.0)
    rc3, t3 = (timed_run(tune, out / "safetyscope" / "tune.log") if rc2 == 0 and args.tune_trials > 0
               else (None, 0.0))
    res = {"plain_forward_s": t_plain,
           "find": {"cmd": " ".join(find[1:]), "rc": rc1, "wall_s": t1, "includes_refine": args.one_process},
           "refine": {"cmd": " ".join(refine[1:]), "rc": rc2, "wall_s": t2},
           "tune": {"cmd": " ".join(tune[1:]), "rc": rc3, "wall_s": t3},
           "artifacts": {"safetyscope find": str(out / "safetyscope" / "direction" / "artifact"),
                         "safetyscope refine": str(out / "safetyscope" / "direction_refine" / "artifact"),
                         "safetyscope tune front": str(out / "safetyscope" / "direction_tune" / "front")}}
    (out / "safetyscope.json").write_text(json.dumps(res, indent=1))
    return res


def interventions(out: Path, extra: list[str] | None = None) -> dict[str, Path]:
    """name -> artifact or checkpoint directory, for everything earlier phases left, and each
    ``NAME=DIR`` of ``extra`` (--artifact: an artifact made elsewhere, measured the same way)."""
    found: dict[str, Path] = {}
    for item in extra or []:
        name, sep, where = item.partition("=")
        if not sep or not name or not Path(where).is_dir():
            raise SystemExit(f"--artifact {item!r}: give NAME=DIR with an artifact or checkpoint directory")
        found[name] = Path(where)
    for ckpt in sorted((out / "heretic").glob("trial_*")):
        if (ckpt / "config.json").is_file():
            found[f"heretic {ckpt.name.replace('_', ' ')}"] = ckpt
    for name, sub in (("safetyscope find", "direction"), ("safetyscope refine", "direction_refine")):
        if (out / "safetyscope" / sub / "artifact" / "artifact.json").is_file():
            found[name] = out / "safetyscope" / sub / "artifact"
    for point in sorted((out / "safetyscope" / "direction_tune" / "front").glob("trial_*")):
        if (point / "artifact.json").is_file():  # every point of refine + tune's Pareto front (val), as heretic's
            found[f"safetyscope tune {point.name.replace('_', ' ')}"] = point
    return found


def measure_one(lm: Any, intervention: Any, harmful: list[str], harmless: list[str], ref: dict[str, Any],
                args: argparse.Namespace) -> dict[str, Any]:
    """Phrase-judged refusal on the held-out harmful prompts; first-token KL (and, with --reply-kl, the KL
    over the unmodified model's own replies) on the held-out harmless prompts."""
    from safetyscope.measure import PhraseJudge, generate_with_logits, reply_kl
    from safetyscope.measure.capability import decode_reply
    from safetyscope.measure.compare import enter, first_token_kl

    judge = PhraseJudge()
    t0 = time.perf_counter()
    with enter(lm, intervention):
        ids, _ = generate_with_logits(lm, harmful, max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
    replies = [decode_reply(lm, r) for r in ids]
    refused = [bool(judge(p, r)) for p, r in zip(harmful, replies)]
    kl = {"first_token": float(first_token_kl(lm, harmless, intervention, reference=ref["logits"],
                                              batch_size=args.batch).mean())}
    if args.reply_kl:
        kl["reply_tokens"] = reply_kl(lm, harmless, intervention, replies=ref["replies"],
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch).reply_tokens
    return {"refusal": sum(refused) / len(refused), "n_harmful": len(refused), "kl": kl, "replies": replies,
            "judge": refused, "seconds": time.perf_counter() - t0}


def phase_measure(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Measure every intervention not yet in OUT/measure.json (rows are written as they finish)."""
    from safetyscope.artifacts import load_artifact
    from safetyscope.measure import generate_with_logits
    from safetyscope.measure.compare import logits_under
    from safetyscope.models import load_model
    from safetyscope.prompts import builtin_prompts

    lm = load_model("default")
    harmful = builtin_prompts("harmful", "test").texts
    harmless = builtin_prompts("harmless", "test").texts
    path = out / "measure.json"
    res = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "plain_forward_s": []}
    res.update({"test_split": {"harmful": len(harmful), "harmless": len(harmless)}, "max_new_tokens": args.max_new_tokens})
    res["plain_forward_s"].append(plain_forward_seconds(lm, harmless[:8]))
    ref = {"logits": logits_under(lm, harmless, None, batch_size=args.batch), "replies": None}
    if args.reply_kl:
        ref["replies"] = generate_with_logits(lm, harmless, max_new_tokens=args.max_new_tokens,
                                              batch_size=args.gen_batch)[0]
    todo: dict[str, Path | None] = {"unmodified": None, **interventions(out, args.artifact)}
    for name, where in todo.items():
        if name in res["rows"]:
            continue
        print(f"measuring {name} ({where})", file=sys.stderr)
        row = measure_one(lm, None if where is None else load_artifact(where), harmful, harmless, ref, args)
        row["heretic_counter"] = heretic_counts(args, out, name, row["replies"])
        res["rows"][name] = {"path": str(where), **row}
        path.write_text(json.dumps(res, indent=1))
    if args.llm_judge != "none":
        llm_judge_rows(res, harmful, args.llm_judge, path)
    return res


def llm_judge_rows(res: dict[str, Any], harmful: list[str], spec: str, path: Path) -> None:
    """Each measured row's harmful replies judged again by safetyscope's LLM judge (``spec``; empty: its default,
    the ``large`` alias when installed): the shares refused / complied / broken, as ``row["llm"]``."""
    from safetyscope.measure.llm_judge import load_llm_judge

    judge = None  # loaded at the first row left to judge
    for row in [r for r in res["rows"].values() if "llm" not in r]:
        judge = judge or load_llm_judge(spec)
        t0, cats = time.perf_counter(), judge.categorize(harmful, row["replies"])
        row["llm"] = {"judge": judge.name, "categories": cats, "seconds": time.perf_counter() - t0,
                      **{c: sum(x == c for x in cats) / len(cats) for c in ("refused", "complied", "broken")}}
        path.write_text(json.dumps(res, indent=1))


def heretic_counts(args: argparse.Namespace, out: Path, name: str, replies: list[str]) -> float | None:
    """Fraction of ``replies`` heretic's own refusal counter calls refusals (None: heretic not runnable)."""
    f = out / "replies" / (name.replace(" ", "_") + ".jsonl")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("".join(json.dumps(r) + "\n" for r in replies))
    try:
        res = subprocess.run([args.heretic_python, str(HERE), "heretic-judge", str(f)], capture_output=True,
                             text=True, env=offline_env(), timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    verdicts = json.loads(res.stdout.strip().splitlines()[-1])
    return sum(verdicts) / max(len(verdicts), 1)


def phase_plot(out: Path) -> None:
    """OUT/pareto.png and the tables on stdout (benchmarks/peers_direction_report.py)."""
    plot_and_print(out, heretic_trials(out / "heretic"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "heretic-driver":
        heretic_driver(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "heretic-judge":
        heretic_judge(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "peers" / "direction")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--heretic-python", default=os.environ.get("HERETIC_PYTHON", str(ROOT / ".venv-heretic" / "bin" / "python")))
    ap.add_argument("--trials", type=int, default=5, help="heretic's trial budget (its default is 200)")
    ap.add_argument("--startup-trials", type=int, default=3, help="heretic's random trials (its default is 60)")
    ap.add_argument("--heretic-tokens", type=int, default=40,
                    help="heretic's reply length for its refusal count (its default is 100)")
    ap.add_argument("--heretic-batch", type=int, default=32)
    ap.add_argument("--heretic-stop-after", type=float, default=0.0,
                    help="Ctrl+C heretic after this many seconds (0 = never): it keeps the trials completed by then")
    ap.add_argument("--screen", type=int, default=8, help="direction find --screen (prompts per group, first pass)")
    ap.add_argument("--keep", type=int, default=16, help="direction find --keep")
    ap.add_argument("--screen-by", default="forward", choices=("forward", "gradient"), help="direction find --screen-by")
    ap.add_argument("--induce", default="all", choices=("all", "lazy"), help="direction find --induce")
    ap.add_argument("--find-batch", type=int, default=0, help="direction find --batch-size (0 = its default)")
    ap.add_argument("--one-process", action="store_true",
                    help="run `direction find --refine` (find and refine in one command) instead of two commands")
    ap.add_argument("--refine-batch", type=int, default=16, help="direction refine --batch (prompts per group per step)")
    ap.add_argument("--refine-micro", type=int, default=32,
                    help="direction refine --batch-size (rows per forward pass; the same steps, only speed)")
    ap.add_argument("--tune-trials", type=int, default=24,
                    help="direction tune --trials on the refined direction; every Pareto point is measured (0 = skip)")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="reply length judged in the measure phase")
    ap.add_argument("--gen-batch", type=int, default=64)
    ap.add_argument("--artifact", action="append", default=[], metavar="NAME=DIR",
                    help="also measure this artifact or checkpoint (repeatable)")
    ap.add_argument("--reply-kl", action="store_true", help="also the KL over whole replies (slow on CPU)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--llm-judge", default="", metavar="MODEL",
                    help="also judge every row's replies with safetyscope's LLM judge on this model (empty: its "
                         "default, the large alias when installed; none: skip)")
    args = ap.parse_args()
    args.out = args.out.resolve()  # heretic runs in its own directory: it reads the prompt files by absolute path
    if os.sep in args.heretic_python:  # a path (not a name on PATH): absolute, for the same reason
        args.heretic_python = os.path.abspath(args.heretic_python)
    args.out.mkdir(parents=True, exist_ok=True)
    phases = [p for p in args.phases.split(",") if p]
    if "heretic" in phases:
        print(json.dumps(phase_heretic(args, args.out), indent=1))
    if "safetyscope" in phases:
        print(json.dumps(phase_safetyscope(args, args.out), indent=1))
    if "measure" in phases:
        phase_measure(args, args.out)
    if "plot" in phases:
        phase_plot(args.out)


if __name__ == "__main__":
    main()
