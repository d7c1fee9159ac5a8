"""`safetyscope finetune weaken|harden MODEL`: train only the refusal circuit's components (or a baseline).

A thin shell over :func:`safetyscope.methods.finetune.api.finetune`: parse the settings, call the
library, print and write ``OUT/finetune/<mode>/`` (summary.json, the targets, the resumable state and,
with ``--export``, ``checkpoint/``: a normal Hugging Face checkpoint that ``eval --intervention``,
``direction find`` and ``audit`` accept). A rerun with the same settings resumes from the last state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import typer

from .common import PromptSettings, emit, user_errors
from .settings import command, opt


@dataclass
class FinetuneSettings(PromptSettings):
    select: str = opt("", "Components to train, comma-separated: blocks.14.mlp, blocks.15.attn, blocks.15.attn.heads[3,7], blocks.12-18.mlp.neurons[set] (with --neuron-set), L22.N2106.", flag="--components")
    circuit: str = opt("", "A `safetyscope map` output directory: train the attention, MLP and neuron components of its stages (added to --components).")
    neuron_set: str = opt("", "Neuron set artifact directory (from `safetyscope neurons find`): the neurons [set] components name.")
    direction: str = opt("", "Refusal direction artifact (from `safetyscope direction find`); empty = found on the training prompts when weakening or --robust needs one.")
    scary: str = opt("", "harden: benign-but-scary prompts kept answered (JSONL/CSV/TXT); empty = the built-in scary_harmless train split.")
    tasks: bool = opt(False, "With the built-in sets: draw the training prompts from the built-in harmful + harmful_tasks and harmless + harmless_tasks splits (imperative write / create / develop requests, benign ones that look harmful among them) instead of harmful and harmless alone; files given by --harmful / --harmless are used as they are.")
    method: str = opt("components", "What to train: components (the selection), full (every parameter), lora (rank --lora-rank on every projection) or random (components of the same kinds and sizes at random places, disjoint from the selection: as many parameters).")
    steps: int = opt(40, "Optimizer steps.")
    lr: float = opt(1e-4, "Adam learning rate (no weight decay: masked entries never move).")
    train_batch: int = opt(4, "Target examples per step (and as many retain examples).")
    retain_weight: float = opt(1.0, "Weight of the retain loss (harmless replies kept as they were).")
    retain_loss: str = opt("ce", "Retain loss: ce (cross-entropy on the harmless replies), kl (KL from the starting model's next-token distribution at every token of the harmless rows; does not sharpen the model on its own replies, so it costs less perplexity) mixed (kl, except cross-entropy on the benign prompts the starting model refused, whose answers were made under ablation: KL would hold them to the refusal) or kl-ablated (kl, with those rows held to the model under that ablation instead).")
    max_new_tokens: int = opt(32, "Length of the self-generated target replies (and the training cut unless --target-tokens).")
    target_tokens: int = opt(0, "Training cut of the target replies in tokens; 0 = --max-new-tokens (extended refusals are longer: e.g. 64).")
    refusal_style: str = opt("own", "harden: refusal targets as the model gives them (own); extended: the model's own sentence on the request, then its refusal (Abu Shairah et al. 2025); restate: every harmful and harmless reply opens with the model's neutral sentence on the request, so refusal is not decided at the first reply token.")
    robust: bool = opt(False, "harden: ablate the refusal direction at random blocks and positions while training, so refusal stops resting on it.")
    robust_p: float = opt(0.5, "--robust: probability that a block / a position (or, with --robust-scope rows, a whole example) is ablated at a step.")
    robust_scope: str = opt("sites", "--robust: what --robust-p draws: sites (random blocks and positions) or rows (each example either loses the direction at every block and position, as under the attack, or keeps it).")
    robust_retain: bool = opt(False, "--robust: ablate on the harmless (retain) examples too, so the model learns to tell them apart without the direction instead of refusing whatever lacks it.")
    robust_retain_p: float = opt(0.0, "--robust-retain: the harmless examples' own --robust-p (e.g. 1.0 on the harmful rows, 0.5 on the harmless ones, so the harmless rows show both conditions); 0 = --robust-p.")
    robust_rank: int = opt(1, "--robust: ablate a subspace of this many directions (the refusal direction plus the strongest harmful - harmless differences at every block and post-instruction position), so refusal cannot move to a nearby direction; 1 = the direction alone.")
    robust_keep_start: bool = opt(False, "--robust-rank > 1: keep the starting direction (the --direction artifact's) in the ablated subspace at every re-estimation, not only the newly estimated one.")
    robust_subspan: bool = opt(False, "--robust-rank > 1: each ablated example loses a random sub-span of the subspace (a random rotation of it, cut to a random dimension from 1 to the rank) instead of all of it, so the model cannot learn to refuse only when the whole subspace is missing.")
    robust_online: bool = opt(False, "--robust --robust-scope rows: at every step ablate the attack's current candidate at a random block (--search-layers, else all) and post-instruction position: the difference of running means of the harmful and harmless training rows that were not ablated, updated every step, instead of the estimated direction or subspace.")
    reestimate_every: int = opt(10, "--robust: re-estimate the direction on the model being trained every N steps (0 = never).")
    search_every: int = opt(0, "--robust: every N steps run the attack's own direction search on the model being trained and keep ablating what it finds, so refusal cannot settle where the attack will look (0 = off; one search costs about 30 plain forward passes of a training batch on the default model).")
    search_layers: str = opt("", "--search-every: candidate blocks of that search (a-b or a,b); empty = all.")
    checkpoint_every: int = opt(10, "Write the resumable training state every N steps (0 = never).")
    average_from: int = opt(0, "Return the mean of the trained tensors over the states after this many steps and every later one (tail averaging, which steadies a constant-rate run); 0 = the last state.")
    decay_from: int = opt(0, "After this many steps the learning rate falls linearly, to --lr / (steps - N + 1) at the last step, so the run settles instead of swinging; 0 = a constant rate.")
    lora_rank: int = opt(8, "Rank of the LoRA baseline (--method lora).")
    kv: bool = opt(True, "Head components also train their key/value heads (shared by the query heads of a GQA group).", flag="--kv/--no-kv")
    export: bool = opt(True, "Write the tuned model as a Hugging Face checkpoint to OUT/finetune/<mode>/checkpoint.", flag="--export/--no-export")
    judge: str = opt("", "Refusal judge for the targets: package.module:function; empty = the phrase judge.")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(no_args_is_help=True, help="Fine-tune the refusal circuit's components: weaken or harden refusal.")
    for mode, text in (("weaken", "Train the components to answer harmful prompts as the model does under directional ablation, keeping harmless replies."),
                       ("harden", "Train the components to refuse harmful prompts (optionally with the direction ablated: --robust), keeping harmless and scary-but-benign replies.")):
        def cmd(s: FinetuneSettings, mode: str = mode) -> None:
            with user_errors():
                run_finetune(s, mode)

        command(sub, mode, FinetuneSettings, text)(cmd)
    app.add_typer(sub, name="finetune", help="Targeted fine-tuning: weaken or harden refusal.")


def training_prompts(s: FinetuneSettings, mode: str) -> tuple[Any, Any, Any]:
    """(harmful, harmless, scary-but-benign or None) training prompts: the files given, else the built-in sets."""
    from ..prompts import builtin_prompts, builtin_with_tasks
    from ..prompts.sets import group_splits

    builtin = builtin_with_tasks if s.tasks else builtin_prompts
    out = []
    for kind, path in (("harmful", s.harmful), ("harmless", s.harmless)):
        ps = group_splits(path, kind, s.seed).fit if path else builtin(kind, s.split, seed=s.seed)
        out.append((ps.sample(s.n_prompts, seed=s.seed) if s.n_prompts else ps).require_nonempty(f"{kind} prompts"))
    scary = None
    if mode == "harden":
        ps = group_splits(s.scary, "harmless", s.seed).fit if s.scary else builtin_prompts("scary_harmless", s.split, seed=s.seed)
        scary = ps.sample(s.n_prompts, seed=s.seed) if s.n_prompts else ps
    return out[0], out[1], scary


def _components(s: FinetuneSettings) -> list[str] | None:
    from ..methods.finetune.api import map_components
    from ..sites import parse_components

    names = [c.name for c in parse_components(s.select)] if s.select.strip() else []
    if s.circuit:
        names += [n for n in map_components(s.circuit) if n not in names]
    if not names and s.method in ("components", "random"):
        raise ValueError("give what to train with --components or --circuit OUT, or use --method full / lora")
    return names or None


def run_finetune(s: FinetuneSettings, mode: str) -> dict[str, Any]:
    import sys

    from ..io import write_json
    from ..measure.judges import load_judge
    from ..methods.direction.artifact import Direction
    from ..methods.finetune.api import finetune
    from ..methods.finetune.train import TrainConfig
    from ..methods.neurons.artifact import NeuronSet
    from ..sites import parse_layers

    cfg = TrainConfig(steps=s.steps, lr=s.lr, batch_size=s.train_batch, retain_weight=s.retain_weight,
                      retain_loss=s.retain_loss,  # type: ignore[arg-type]  # checked by TrainConfig
                      max_reply_tokens=s.target_tokens or s.max_new_tokens, robust=s.robust, robust_p=s.robust_p,
                      robust_scope=s.robust_scope,  # type: ignore[arg-type]  # checked by TrainConfig
                      robust_retain=s.robust_retain, robust_retain_p=s.robust_retain_p or None,
                      robust_rank=s.robust_rank, robust_keep_start=s.robust_keep_start,
                      robust_subspan=s.robust_subspan, robust_online=s.robust_online,
                      reestimate_every=s.reestimate_every, search_every=s.search_every,
                      search_layers=parse_layers(s.search_layers) if s.search_layers.strip() else None,
                      checkpoint_every=s.checkpoint_every, average_from=s.average_from,
                      decay_from=s.decay_from, seed=s.seed)
    comps = _components(s)
    judge = load_judge(s.judge) if s.judge else None
    direction = Direction.load(s.direction) if s.direction else None
    neurons = NeuronSet.load(s.neuron_set) if s.neuron_set else None
    harmful, harmless, scary = training_prompts(s, mode)
    log = (lambda _m: None) if s.quiet or s.json else (lambda m: print(m, file=sys.stderr))
    lm = s.load_model()
    out = s.out / "finetune" / mode
    r = finetune(lm, mode, comps, method=s.method, harmful=harmful, harmless=harmless, scary=scary,  # type: ignore[arg-type]
                 neuron_set=neurons, direction=direction, config=cfg, judge=judge, max_new_tokens=s.max_new_tokens,
                 refusal_style=s.refusal_style,  # type: ignore[arg-type]  # checked by finetune()
                 kv=s.kv, lora_rank=s.lora_rank, batch_size=s.batch_size, system=s.system, out=out, log=log)
    result = r.summary()
    if r.direction is not None and not s.direction:
        r.direction.save(out / "direction")
        result["direction"] = str(out / "direction")
    if s.export:
        result["checkpoint"] = str(r.export(lm, out / "checkpoint"))
    write_json(out / "summary.json", result)
    emit(s, result, lambda: _print(result))
    return result


def _print(r: dict[str, Any]) -> None:
    print(f"{r['mode']} ({r['method']}): trainable parameters {r['n_trainable']:,} of {r['n_total']:,} "
          f"({r['fraction']:.3%})")
    print(f"targets: {r['data']}")
    print(f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f} in {r['steps']} steps"
          + (f" (resumed at step {r['resumed_from']})" if r["resumed_from"] else "")
          + f", {r['seconds']:.1f} s, peak memory +{r['peak_mib']:.0f} MiB")
    if r.get("checkpoint"):
        print(f"checkpoint: {r['checkpoint']}")
