"""Study, not shipped: is there one block and position whose harm reading keeps a fixed threshold under attack?

For every block and both monitor positions (the instruction's last token, the post-instruction tokens
averaged), a difference-of-means reader fitted on the monitor's fitting prompts, its threshold set on the
calibration prompts (at most one of them above it, as the shipped rule at 1% FPR on 168 prompts), and read on
dev and test prompts clean and under the attack. Then, for a few blocks, how far the attack moves the
readings of harmful and of harmless prompts, in units of the harmless fitting prompts' spread.

Reads the features ``scripts/monitor_deficit_study.py`` cached (run that first, with the same attack).
Usage: python scripts/monitor_block_shift_study.py [FEATURE_DIR]   (default runs/mon20/heldout)
"""

from __future__ import annotations

import sys

import numpy as np

GROUPS = ("dev_h", "dev_s", "test_h", "test_s")


def load(root: str, name: str) -> np.ndarray:
    return np.load(f"{root}/feats_{name}.npz")["x"]  # [n, blocks, 1 + k_post, d_model]


def at(x: np.ndarray, pos: str) -> np.ndarray:  # -> [n, blocks, d_model]
    return x[:, :, 0] if pos == "inst" else x[:, :, 1:].mean(2)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/mon20/heldout"
    fit_h = np.concatenate([load(root, "fit_h"), load(root, "tasks_h")])
    fit_s = np.concatenate([load(root, k) for k in ("fit_s", "tasks_s", "scary")])
    cal = np.concatenate([load(root, "cal"), load(root, "tasks_cal")])
    clean = {k: load(root, k) for k in GROUPS}
    hit = {k: load(root, f"{k}_attacked") for k in GROUPS}
    print("pos block | dev: AUROC TPR FPR attacked-AUROC attacked-TPR | test: the same")
    for pos in ("inst", "post"):
        h, s, c = at(fit_h, pos), at(fit_s, pos), at(cal, pos)
        ev, ea = {k: at(v, pos) for k, v in clean.items()}, {k: at(v, pos) for k, v in hit.items()}
        for b in range(h.shape[1]):
            w = h[:, b].astype(np.float64).mean(0) - s[:, b].astype(np.float64).mean(0)  # [d_model]
            w /= max(float(np.linalg.norm(w)), 1e-12)
            cs = np.sort(c[:, b] @ w)
            thr = (cs[-2] + cs[-1]) / 2  # one calibration prompt above: 1% of 168
            row = []
            for sp in ("dev", "test"):
                th, ts, ta, tsa = (e[f"{sp}_{g}"][:, b] @ w for e, g in ((ev, "h"), (ev, "s"), (ea, "h"), (ea, "s")))
                row += [auroc(th, ts), (th > thr).mean(), (ts > thr).mean(), auroc(ta, tsa), (ta > thr).mean()]
            print(pos, b, " ".join(f"{v:.3f}" for v in row))
        for b in (15, 20, 22):
            w = h[:, b].astype(np.float64).mean(0) - s[:, b].astype(np.float64).mean(0)
            w /= max(float(np.linalg.norm(w)), 1e-12)
            sd = float((s[:, b] @ w).std())
            moved = {k: float(((ea[k][:, b] - ev[k][:, b]) @ w).mean()) / sd for k in GROUPS}
            print(f"{pos} block {b}: mean shift under attack / harmless sd: "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in moved.items()))


if __name__ == "__main__":
    main()
