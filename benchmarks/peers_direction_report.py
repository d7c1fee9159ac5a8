"""The report of benchmarks/peers_direction.py: the Pareto plot, the tables, and which safetyscope points
dominate which heretic checkpoints on the held-out test split (both coordinates measured by the same code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices, in order, of the points no other point beats on both (x, y) (lower is better on both):
    safetyscope's own ``pareto_front`` (the plot runs in safetyscope's venv, never in heretic's)."""
    from safetyscope.methods.direction.tune import pareto_front

    return sorted(pareto_front(points))


def plot_and_print(out: Path, trials: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = json.loads((out / "measure.json").read_text()) if (out / "measure.json").is_file() else {"rows": {}}
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 5))
    if trials:
        pts = [(t["kl_divergence"], t["refusals"] / t["n_bad_prompts"]) for t in trials]
        front = set(pareto(pts))
        a.scatter([p[0] for p in pts], [p[1] for p in pts], c=["C3" if i in front else "C7" for i in range(len(pts))])
        for t, (x, y) in zip(trials, pts):
            a.annotate(str(t["index"]), (x, y), fontsize=8)
        base = trials[0]["base_refusals"] / trials[0]["n_bad_prompts"]
        a.axhline(base, color="k", lw=0.8, ls="--", label="unmodified")
        a.legend()
    a.set(xscale="symlog", xlabel="first-token KL (harmless val)", ylabel="refusals / bad prompts (heretic counter)",
          title=f"heretic's own metrics, every trial ({len(trials)}; red = Pareto)")
    tune = "safetyscope tune trial "
    for name, row in meas["rows"].items():
        colour = ("k" if name == "unmodified" else "C3" if name.startswith("heretic")
                  else "C2" if name.startswith("ablate-llm") else "C0")
        b.scatter(row["kl"]["first_token"], row["refusal"], c=colour, s=14 if name.startswith(tune) else 36)
        label = "t" + name.removeprefix(tune).lstrip("0") if name.startswith(tune) else name  # tune points: t<trial>
        b.annotate(label or "t0", (row["kl"]["first_token"], row["refusal"]), fontsize=7 if name.startswith(tune) else 8)
    b.set_xscale("symlog", linthresh=1e-3)
    b.set(xlabel="first-token KL (harmless test)",
          ylabel="refusal rate (phrase judge, harmful test)",
          title="the same safetyscope measurement, held-out test split\n(t<N>: safetyscope tune's Pareto points on val)")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    print_table(trials, meas, out)


def print_table(trials: list[dict[str, Any]], meas: dict[str, Any], out: Path) -> None:
    print("heretic trials (its optuna journal; its refusal counter and first-token KL on the val split):")
    for t in trials:
        print(f"  trial {t['index']:>3}: refusals {t['refusals']:>2}/{t['n_bad_prompts']}  KL {t['kl_divergence']:.4f}")
    print(f"held-out test split, one safetyscope measurement (max_new_tokens {meas.get('max_new_tokens')}):")
    print(f"  {'intervention':28s} {'refusal (judge)':>15s} {'heretic counter':>15s} "
          f"{'LLM refused/complied/broken':>28s} {'KL first':>9s} {'KL reply':>9s}")
    for name, row in meas["rows"].items():
        hc, llm = row.get("heretic_counter"), row.get("llm")
        rcb = "-" if llm is None else f"{llm['refused']:.3f}/{llm['complied']:.3f}/{llm['broken']:.3f}"
        print(f"  {name:28s} {row['refusal']:15.3f} {'-' if hc is None else f'{hc:.3f}':>15s} {rcb:>28s} "
              f"{row['kl']['first_token']:9.4f} {row['kl'].get('reply_tokens', float('nan')):9.4f}")
    for line in dominance(meas["rows"]):
        print(line)
    for line in wall_time(out, trials):
        print(line)
    for f in ("heretic.json", "safetyscope.json"):
        if (out / f).is_file():
            print(f"{f}: {(out / f).read_text()}")
    print(f"plot: {out / 'pareto.png'}")


def wall_time(out: Path, trials: list[dict[str, Any]]) -> list[str]:
    """heretic's best trial (fewest val refusals, then lowest KL: its own metrics) and when it was scored, against
    safetyscope's find + refine wall time, each with the plain forward pass timed in its phase."""
    paths = [out / "heretic.json", out / "safetyscope.json"]
    if not trials or not all(p.is_file() for p in paths):
        return []
    h, s = (json.loads(p.read_text()) for p in paths)
    ends = h.get("timings", {}).get("score_end_s", [])
    if len(ends) < len(trials):
        return []
    k = min(range(len(trials)), key=lambda i: (trials[i]["refusals"], trials[i]["kl_divergence"]))
    ours = float(s["find"]["wall_s"]) + float(s["refine"]["wall_s"])
    return [f"wall time: heretic's best trial ({trials[k]['index']}: {trials[k]['refusals']}/{trials[k]['n_bad_prompts']} "
            f"val refusals, KL {trials[k]['kl_divergence']:.4f}) was scored {ends[k]:.0f} s into its run; safetyscope "
            f"find + refine took {ours:.0f} s ({ours / ends[k]:.2f}x); plain forward pass of 8 prompts: "
            f"{h.get('plain_forward_s', float('nan')):.3f} s (heretic phase), "
            f"{s.get('plain_forward_s', float('nan')):.3f} s (safetyscope phase)"]


def dominated_by(rows: dict[str, Any], peer: str = "heretic", ours: str = "safetyscope") -> dict[str, list[str]]:
    """For each measured ``peer`` row, the ``ours`` rows with refusal <= and first-token KL <= it, one of them
    strictly lower (the issue's "lower judged refusal at lower KL"), on the same held-out prompts."""
    def point(name: str) -> tuple[float, float]:
        return rows[name]["refusal"], rows[name]["kl"]["first_token"]

    return {p: [o for o in rows if o.startswith(ours) and all(a <= b for a, b in zip(point(o), point(p)))
                and point(o) != point(p)] for p in rows if p.startswith(peer)}


PEERS = ("heretic", "ablate-llm")  # the row-name prefixes of peer checkpoints


def dominance(rows: dict[str, Any]) -> list[str]:
    """One line per peer row (heretic, ablate-llm): which safetyscope rows dominate it on the test split, or
    that none does."""
    return [f"  {p}: " + (f"dominated by {', '.join(by)}" if by else "not dominated by any safetyscope row")
            for peer in PEERS for p, by in dominated_by(rows, peer).items()]
