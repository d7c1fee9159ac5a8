"""Fitting a :class:`~.artifact.Monitor`: harm readers, a refusal reader, and a calibrated threshold.

One forward pass per batch captures ``blocks.{l}.resid_pre`` of every block at the instruction's last
token and at every post-instruction template token, plus the logits of the first reply token. From
these features (float64 statistics):

1. the fitting prompts of each group are split (seeded) into a *train* part and a *validation* part;
2. the **refusal subspace** is spanned by the difference-of-means candidates at every block and
   post-instruction position (the candidates ``find_direction`` chooses its direction from); its
   leading ``protect`` singular directions are projected out of every harm reader, so ablating any
   direction in that subspace (hooks or an orthogonalised checkpoint) does not move a reading directly;
3. harm readers at every block and position (``inst``: the instruction's last token; ``post``: mean
   over the post-instruction tokens), each a difference of means (``dom``) or a logistic probe
   (``probe``), fitted on *train*; their scores are standardised on the harmless train prompts; the
   ``n_readers`` with the best validation AUROC (harmful vs harmless validation prompts; never the
   calibration or test prompts) are averaged into the harm score;
4. the threshold is set so that at most ``fpr`` of the harmless calibration prompts score above it;
5. the refusal reader: the logit refusal score of the first reply token, thresholded where it best
   separates the harmful from the harmless train prompts, and the projection on the refusal direction
   (a given :class:`~..direction.artifact.Direction`, or the last-token difference of means at the
   block with the best validation AUROC).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ...measure.metrics import auroc
from ...measure.refusal_tokens import refusal_token_ids
from ...models.adapter import LoadedModel
from ...prompts.builtin import builtin_prompts, builtin_with_tasks
from ...prompts.chat import post_instruction_length
from ...prompts.sets import PromptsLike, as_prompt_set
from ...prompts.types import PromptSet
from ...sites import Site
from .artifact import POSITIONS, Monitor, Reader, ReaderMethod
from .fit_features import Features, collect
from .stress import Stress, StressSpec, simulate, site_basis, stress_blocks, worst_case_tpr
from .tamper import fit_prefix_print

if TYPE_CHECKING:
    from ..direction.artifact import Direction

Method = Literal["dom", "probe", "both"]
METHODS: tuple[str, ...] = ("dom", "probe", "both")
VAL_FRACTION = 0.25


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown reader method {method!r}; use {', '.join(METHODS)}")
    return method  # type: ignore[return-value]


def check_fpr(fpr: float) -> float:
    if not (isinstance(fpr, (int, float)) and 0.0 < float(fpr) < 1.0):
        raise ValueError(f"fpr must be a false-positive rate strictly between 0 and 1 (e.g. 0.01), not {fpr!r}")
    return float(fpr)


def calibration_threshold(scores: Any, fpr: float, *, margin: bool = True) -> float:
    """A threshold t with ``mean(scores > t) <= fpr`` (flag when score > t), exactly ``floor(fpr * n)`` above it.

    ``margin=False``: the highest unflagged score itself (an ROC operating point). ``margin=True`` (a deployed
    threshold): halfway to the next higher score (or just above the highest), so the same prompt read in
    another batch (other padding, last-bit differences) is not flagged by rounding.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]  # descending
    if s.size == 0:
        raise ValueError("calibration needs at least one harmless prompt")
    allowed = min(int(math.floor(check_fpr(fpr) * s.size + 1e-9)), s.size - 1)  # false positives allowed
    t = float(s[allowed])
    if not margin:
        return t
    if allowed > 0 and s[allowed - 1] > t:
        return 0.5 * (t + float(s[allowed - 1]))
    return t + 1e-6 * max(1.0, abs(t))


def default_fit_prompts(split: str = "train", *, seed: int = 0, scary: bool = True) -> tuple[PromptSet, PromptSet]:
    """(harmful, harmless) built-in fitting prompts: the ``harmful`` and ``harmful_tasks`` sets against ``harmless``,
    ``harmless_tasks`` and (``scary``) ``scary_harmless``, each at ``split``.

    The ``*_tasks`` sets phrase requests as the tasks public benchmarks use ("Write a script that ...",
    "Develop a plan to ...", with harmless twins in the same forms); with them the harm readers carry over to
    other prompt sets (docs/monitor.md, "Built-in task prompts")."""
    harmful = builtin_with_tasks("harmful", split, seed=seed)
    harmless = builtin_with_tasks("harmless", split, seed=seed)
    if scary:
        harmless = harmless + builtin_prompts("scary_harmless", split, seed=seed)
    return harmful, harmless


def default_calibration(exclude: Sequence[str]) -> PromptSet:
    """Built-in harmless val split + built-in ``scary_harmless`` (over-refusal bait) + the ``harmless_tasks`` val and
    test splits, minus fitting prompts."""
    skip = set(exclude)
    parts = (builtin_prompts("harmless", "val") + builtin_prompts("scary_harmless", "all")
             + builtin_prompts("harmless_tasks", "val") + builtin_prompts("harmless_tasks", "test"))
    kept = tuple(p for p in parts if p.text not in skip)
    return PromptSet(name="builtin:harmless-val+scary_harmless+harmless_tasks-val-test", items=kept)


def calibration_set(calibration: PromptsLike | None, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(harmless, harmful) calibration texts; unlabelled prompts count as harmless. One-line errors."""
    if calibration is None:
        ps = default_calibration(exclude)
    else:
        ps = as_prompt_set(calibration, None, what="calibration prompts")
    labels = ps.labels
    harmless = [p.text for p, lab in zip(ps, labels) if lab in (None, "harmless")]
    harmful = [p.text for p, lab in zip(ps, labels) if lab == "harmful"]
    if not harmless:
        what = f"only {len(harmful)} harmful prompts" if harmful else "no prompts"
        raise ValueError(f"the calibration set has {what}: the threshold is set on harmless prompts, so give "
                         "harmless calibration prompts (e.g. the built-in harmless val split + scary_harmless)")
    return harmless, harmful


def text_id(text: str) -> str:
    """A prompt's short content id (12 hex digits of its SHA-256): what a monitor records of its calibration set."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of an ordered list of prompts (NUL-separated)."""
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def calibration_record(texts: Sequence[str], *, builtin: bool) -> dict[str, Any]:
    """What a monitor stores to rebuild its harmless calibration prompts: ids of the built-in ones it kept
    (``source: builtin``) or only a digest of prompts the user gave (``given``: pass them again)."""
    return {"source": "builtin" if builtin else "given", "n": len(texts), "sha256": texts_digest(texts),
            "ids": [text_id(t) for t in texts] if builtin else []}


def recorded_calibration(info: dict[str, Any], given: PromptsLike | None = None) -> list[str]:
    """The harmless prompts a monitor was calibrated on, rebuilt from ``info["calibration_set"]`` (the built-in
    ones by id) or ``given`` (checked against the recorded digest). One-line errors name the fix."""
    rec = info.get("calibration_set")
    if given is not None:
        texts, _ = calibration_set(given, [])
        if rec is not None and texts_digest(texts) != rec["sha256"]:
            raise ValueError(f"these {len(texts)} calibration prompts are not the {rec['n']} this monitor was "
                             "calibrated on; pass the same prompts, or use evaluate.recalibrate for other ones")
        return texts
    if rec is None:
        raise ValueError("this monitor does not record its calibration prompts (fitted by an older safetyscope); "
                         "re-fit it with `safetyscope monitor fit`, or pass its calibration prompts")
    if rec["source"] != "builtin":
        raise ValueError(f"this monitor was calibrated on {rec['n']} prompts you gave; pass the same prompts "
                         "(calibration=..., --calibration FILE)")
    keep = set(rec["ids"])
    texts = [t for t in default_calibration([]).texts if text_id(t) in keep]
    if texts_digest(texts) != rec["sha256"]:
        raise ValueError("the built-in calibration prompts changed since this monitor was fitted; re-fit it with "
                         "`safetyscope monitor fit`")
    return texts


def _split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of ``n`` prompts; val holds VAL_FRACTION (at least one, when n >= 2)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(VAL_FRACTION * n))) if n >= 2 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def refusal_subspace(cands: np.ndarray, protect: int) -> np.ndarray:
    """[k, d_model] orthonormal rows: the leading singular directions of unit candidates [m, d_model]."""
    if protect <= 0:
        return np.zeros((0, cands.shape[-1]))
    unit = cands / np.linalg.norm(cands, axis=-1, keepdims=True).clip(1e-12)
    _, sv, vt = np.linalg.svd(unit, full_matrices=False)
    k = int(min(protect, int((sv > 1e-6 * sv[0]).sum())))
    return vt[:k]


def project_out(x: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """x [..., d] without its components in the span of ``basis`` [k, d] (orthonormal rows)."""
    return x - (x @ basis.T) @ basis if basis.size else x


def fit_reader(method: ReaderMethod, x_tr: np.ndarray, y_tr: np.ndarray, basis: np.ndarray, c: float,
               seed: int) -> tuple[np.ndarray, float]:
    """(w [d], b) of one harm reader on raw activations, orthogonal to ``basis``."""
    xp = project_out(x_tr, basis)  # [n, d]
    if method == "dom":
        w = xp[y_tr == 1].mean(0) - xp[y_tr == 0].mean(0)
        return project_out(w, basis), 0.0
    from sklearn.linear_model import LogisticRegression

    center = xp.mean(0)
    scale = float(xp.std()) or 1.0  # one global scale: per-feature scaling would leave the protected span
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((xp - center) / scale, y_tr)
    w = clf.coef_[0] / scale
    w = project_out(w, basis)
    return w, float(clf.intercept_[0] - center @ w)


def _standardise(score_neg: np.ndarray) -> tuple[float, float]:
    return float(score_neg.mean()), float(score_neg.std()) or 1.0


def _read(x: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
    return x @ w + b


def fit_readers(feats: Features, y: np.ndarray, tr: np.ndarray, va: np.ndarray, basis: np.ndarray, *,
                method: Method, c: float, seed: int, stress: Stress | None = None) -> list[Reader]:
    """Every (block, position, method) reader fitted on ``tr`` (orthogonal to its site's stress basis) and scored on
    ``va``; best first: by the worst case over the stress conditions when there are any, then validation AUROC."""
    methods: list[ReaderMethod] = ["dom", "probe"] if method == "both" else [method]  # type: ignore[list-item]
    out: list[Reader] = []
    two = len(set(y[va].tolist())) == 2
    for position in POSITIONS:
        x = feats.at(position)  # [n, n_layers, d]
        for j, layer in enumerate(feats.layers):
            site = site_basis(stress, feats, y, position, j, basis)
            for m in methods:
                w, b = fit_reader(m, x[tr, j], y[tr], site, c, seed)
                s = _read(x[:, j], w, b)  # [n]
                if not np.ptp(s[tr]) > 1e-9 * (np.abs(s[tr]).max() + 1e-30):
                    continue  # a constant reading (e.g. the template tokens at block 0): nothing to read
                mu, sd = _standardise(s[tr][y[tr] == 0])
                val = auroc(s[va], y[va]) if two else float("nan")
                worst = float("nan")
                if stress is not None and two:
                    keep = stress.of_rows(va)
                    scores = [s[va]] + [_read(f.at(position)[keep, j], w, b) for f in stress.feats]
                    worst = worst_case_tpr(scores, [y[va]] + [y[stress.rows[keep]]] * len(stress.feats),
                                           s[va][y[va] == 0])
                out.append(Reader(layer, position, m, w, b, mu, sd, val, worst))
    return sorted(out, key=lambda r: (-_or(r.stress_tpr, -1.0), -_or(r.val_auroc, -1.0), r.method != "dom",
                                      r.layer, r.position))


def _or(v: float, default: float) -> float:
    return default if v != v else v


def refusal_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """The logit-score threshold with the best balanced accuracy between harmful (1) and harmless (0)."""
    cand = np.unique(scores)
    mids = np.concatenate([[cand[0] - 1.0], (cand[1:] + cand[:-1]) / 2, [cand[-1] + 1.0]])
    best, best_t = -1.0, 0.0
    for t in mids:
        bal = 0.5 * ((scores[y == 1] > t).mean() + (scores[y == 0] <= t).mean())
        if bal > best + 1e-12:
            best, best_t = bal, float(t)
    return best_t


def refusal_reader(feats: Features, y: np.ndarray, tr: np.ndarray, va: np.ndarray,
                   direction: Direction | None) -> tuple[np.ndarray, int]:
    """(unit refusal direction [d], block): the given direction, or the best last-token difference of means."""
    if direction is not None:
        return direction.direction.double().numpy(), int(direction.layer)
    last = feats.x[:, :, -1].astype(np.float64)  # [n, n_layers, d]
    cut = max(1, int(math.ceil(0.8 * len(feats.layers))))
    best: tuple[float, int, np.ndarray] | None = None
    for j, layer in enumerate(feats.layers[:cut]):
        r = last[tr, j][y[tr] == 1].mean(0) - last[tr, j][y[tr] == 0].mean(0)
        r = r / (np.linalg.norm(r) or 1.0)
        ev = va if len(set(y[va].tolist())) == 2 else tr
        score = auroc(last[ev, j] @ r, y[ev])
        if best is None or score > best[0] + 1e-9:
            best = (score, int(layer), r)
    assert best is not None
    return best[2], best[1]


def resolve_layers(lm: LoadedModel, layers: str | Sequence[int]) -> list[int]:
    """Blocks to read: a layer pattern of the site grammar (``*``, ``a-b``, ``a,b``) or block indices."""
    if isinstance(layers, str):
        return [int(s.layer) for s in lm.sites(f"blocks.{layers}.resid_pre") if s.layer is not None]
    return [int(s.layer) for s in lm.sites([Site("resid_pre", int(v)) for v in layers]) if s.layer is not None]


def fit_monitor(
    lm: LoadedModel,
    harmful: PromptsLike,
    harmless: PromptsLike,
    *,
    calibration: PromptsLike | None = None,
    layers: str | Sequence[int] = "*",
    fpr: float = 0.01,
    method: Method = "both",
    n_readers: int = 12,
    protect: int = 0,
    c: float = 0.1,
    direction: Direction | None = None,
    batch_size: int = 8,
    system: str | None = None,
    seed: int = 0,
    stress: StressSpec = "none",
    n_stress: int = 32,
) -> Monitor:
    """A :class:`Monitor` fitted on ``harmful`` / ``harmless`` and calibrated to ``fpr`` on ``calibration``.

    ``calibration``: harmless prompts for the threshold (prompts labelled harmful only feed the reported
    calibration TPR); default: :func:`default_calibration` (built-in harmless val split, ``scary_harmless``,
    ``harmless_tasks`` val and test), minus any fitting prompt. ``n_readers``: the readers with the best validation
    AUROC whose standardised scores are averaged (12 was chosen on development prompts, docs/monitor.md). ``protect``: refusal-subspace dimensions projected out of the harm readers (0 = none).
    ``direction``: the refusal direction to read (default: the best last-token difference of means).
    ``stress``: blocks whose refusal candidate is ablated on ``n_stress`` train prompts per group and the
    validation prompts, so the readers are chosen (and made) to keep reading harm without refusal
    ("auto": 1/4, 1/2, 3/4 of the depth; "quick": the middle block; "none"; see :mod:`.stress`).
    """
    fpr = check_fpr(fpr)
    method = check_method(method)
    if n_readers < 1 or protect < 0:
        raise ValueError(f"n_readers must be >= 1 and protect >= 0 (got {n_readers}, {protect})")
    h = as_prompt_set(harmful, "harmful", what="harmful prompts").texts
    s = as_prompt_set(harmless, "harmless", what="harmless prompts").texts
    if len(h) < 2 or len(s) < 2:
        raise ValueError(f"fitting needs at least 2 harmful and 2 harmless prompts (got {len(h)} and {len(s)}); "
                         "give more prompts")
    cal_s, cal_h = calibration_set(calibration, h + s)
    if direction is not None and int(direction.direction.numel()) != lm.dims.d_model:
        raise ValueError(f"the refusal direction has d_model {direction.direction.numel()} but {lm.name} has "
                         f"{lm.dims.d_model}; pass a direction found on this model")
    picked = resolve_layers(lm, layers)
    blocks = stress_blocks(stress, picked)
    if n_stress < 1:
        raise ValueError(f"n_stress must be at least 1 prompt per group, not {n_stress}")
    ids = refusal_token_ids(lm.tokenizer)
    feats = collect(lm, h + s + cal_s + cal_h, picked, batch_size=batch_size, system=system, token_ids=ids)
    data = FitData(feats, len(h), len(s), len(cal_s), len(cal_h), tuple(h + s))
    monitor = fit_from_features(lm, data, fpr=fpr, method=method, n_readers=n_readers, protect=protect, c=c,
                                direction=direction, system=system, seed=seed, token_ids=ids, stress=blocks,
                                n_stress=n_stress, batch_size=batch_size)
    monitor.info["calibration"] = "default (built-in harmless val + scary_harmless + harmless_tasks val/test)" \
        if calibration is None else "given"
    monitor.info["calibration_set"] = calibration_record(cal_s, builtin=calibration is None)
    return monitor


@dataclass(frozen=True)
class FitData:
    """Features of the harmful, harmless, harmless-calibration and harmful-calibration prompts, in that order."""

    feats: Features
    n_harmful: int
    n_harmless: int
    n_cal_harmless: int
    n_cal_harmful: int
    texts: tuple[str, ...] = ()  # the fitting prompts (harmful then harmless), read again under stress


def fit_split(data: FitData, seed: int) -> tuple[Features, np.ndarray, np.ndarray, np.ndarray]:
    """(the fitting prompts' features, their labels [n] (1 harmful), train rows, validation rows): each group split
    75/25, seeded."""
    n_h, n_s = data.n_harmful, data.n_harmless
    fit = Features(data.feats.x[:n_h + n_s], data.feats.refusal[:n_h + n_s], data.feats.layers)
    tr_h, va_h = _split(n_h, seed)
    tr_s, va_s = _split(n_s, seed + 1)
    return fit, np.array([1] * n_h + [0] * n_s), np.concatenate([tr_h, n_h + tr_s]), np.concatenate([va_h, n_h + va_s])


def stress_test(lm: LoadedModel, data: FitData, blocks: Sequence[int], *, n_stress: int, seed: int, batch_size: int,
                system: str | None, token_ids: Sequence[int]) -> Stress | None:
    """The fitting prompts' stress rows read under each block's refusal-candidate ablation (:func:`.stress.simulate`),
    to pass to :func:`fit_from_features` (``stress=``) for several fits; None without blocks or fitting texts."""
    if not blocks or not data.texts:
        return None
    fit, y, tr, va = fit_split(data, seed)
    return simulate(lm, data.texts, fit, y, tr, va, blocks=list(blocks), n_stress=n_stress, seed=seed,
                    batch_size=batch_size, system=system, token_ids=token_ids)


def fit_from_features(lm: LoadedModel, data: FitData, *, fpr: float, method: Method, n_readers: int, protect: int,
                      c: float, direction: Direction | None, system: str | None, seed: int,
                      token_ids: Sequence[int], stress: Sequence[int] | Stress = (), n_stress: int = 32,
                      batch_size: int = 8) -> Monitor:
    """The monitor's fitting steps on captured features (see the module docstring)."""
    n_h, n_s, feats = data.n_harmful, data.n_harmless, data.feats
    n_fit = n_h + n_s
    fit, y, tr, va = fit_split(data, seed)
    cands = fit.x[tr][:, :, 1:][y[tr] == 1].mean(0) - fit.x[tr][:, :, 1:][y[tr] == 0].mean(0)  # [L, n_post, d]
    basis = refusal_subspace(cands.reshape(-1, cands.shape[-1]).astype(np.float64), protect)
    sim: Stress | None = None
    if isinstance(stress, Stress):  # already simulated (e.g. features cached by a study)
        sim = stress
    elif stress:
        sim = stress_test(lm, data, stress, n_stress=n_stress, seed=seed, batch_size=batch_size, system=system,
                          token_ids=token_ids)
    readers = fit_readers(fit, y, tr, va, basis, method=method, c=c, seed=seed, stress=sim)[:n_readers]
    if not readers:
        raise ValueError("no block gives a non-constant harm reading on these prompts; check the prompts and --layers")
    r_dir, r_layer = refusal_reader(fit, y, tr, va, direction)
    monitor = Monitor(
        readers=readers, threshold=0.0, fpr=fpr, refusal_threshold=refusal_threshold(fit.refusal[tr], y[tr]),
        refusal_direction=r_dir, refusal_layer=r_layer, refusal_token_ids=token_ids, protect=basis,
        model={"name": lm.name, "d_model": lm.dims.d_model, "n_layers": lm.n_layers,
               "vocab": int(lm.unembed_matrix().shape[0])},
        system=system or "", n_post=post_instruction_length(lm.tokenizer, system),
        prefix=fit_prefix_print(lm, cands[len(feats.layers) // 6:].reshape(-1, cands.shape[-1]).astype(np.float64),
                                feats.layers, system=system, seed=seed),
    )
    harm = monitor.harm_from_features(feats)  # [n_prompts]
    monitor.threshold = calibration_threshold(harm[n_fit:n_fit + data.n_cal_harmless], fpr)
    monitor.metrics = _fit_metrics(harm, y, va, n_fit, data.n_cal_harmless, monitor.threshold)
    monitor.info = {"n_harmful": n_h, "n_harmless": n_s, "n_calibration_harmless": data.n_cal_harmless,
                    "n_calibration_harmful": data.n_cal_harmful, "layers": list(feats.layers), "method": method,
                    "c": c, "seed": seed, "protect": int(basis.shape[0]),
                    "refusal_reader": "given direction" if direction is not None else "difference of means",
                    "stress_blocks": list(sim.blocks) if sim is not None else [],
                    "n_stress": int(sim.rows.size) if sim is not None else 0}
    return monitor


def _fit_metrics(harm: np.ndarray, y: np.ndarray, va: np.ndarray, n_fit: int, n_cal: int,
                 threshold: float) -> dict[str, Any]:
    cal = harm[n_fit:n_fit + n_cal]
    cal_h = harm[n_fit + n_cal:]
    out: dict[str, Any] = {"calibration_fpr": float((cal > threshold).mean()), "val_tpr": None, "val_auroc": None,
                           "calibration_tpr": float((cal_h > threshold).mean()) if cal_h.size else None}
    if len(set(y[va].tolist())) == 2:
        out["val_auroc"] = auroc(harm[va], y[va])
        out["val_tpr"] = float((harm[va][y[va] == 1] > threshold).mean())
    return out
