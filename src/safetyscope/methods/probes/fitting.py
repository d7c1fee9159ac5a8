"""Linear probes, layer by layer: where is harmfulness (or the refusal decision) linearly readable?

1. :func:`collect_features` runs one forward pass per batch that captures the chosen site of every
   layer (``run_capture``) at the chosen position (several selected positions are averaged) and
   keeps features ``[n_prompts, n_layers, width]`` float32, in memory or in a ``.npy`` memory map.
2. :func:`fit_on_features` scores, per layer, ``Pipeline(StandardScaler, LogisticRegression)`` with
   stratified, seeded k-fold cross-validation (the same folds for every layer):

   - regularisation: by default (``c=None``) C is picked from ``cs`` by ``LogisticRegressionCV``
     (log-loss, stratified seeded inner folds) inside every training fold, so the reported scores
     stay out-of-sample (nested CV) and C adapts to the regime: on the default model (width 896,
     256 prompts) it picks 0.01-0.1, where scikit-learn's 1.0 transfers worse to held-out prompts,
     while a clean planted signal gets a large C. A fixed ``c`` (e.g. ``DEFAULT_C`` = 1.0) is about
     4x faster;
   - **control**: the same procedure on shuffled labels (``n_controls`` seeds); *selectivity* =
     accuracy - control accuracy, so "readable" means above the control, not above a fixed number;
   - optional random-direction baseline: a 1-D probe on the projection onto a random unit direction;
   - the difference-of-means (DoM) direction of each training fold, scored by AUROC (no fitting);
   - a final probe on all training prompts per layer (the :class:`Probe` artifact), the cosine between
     its direction in the original, unscaled space (w / scale) and the DoM direction, and held-out
     accuracy / AUROC on a separate test set when one is given.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...models.adapter import LoadedModel
from ...positions import PositionSpec, parse_positions
from ...runner import run_capture
from ...sites import BLOCK_KINDS, Site
from .artifact import Probe

DEFAULT_C = 1.0  # scikit-learn's default, for a fixed-C (faster) run
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


# ---- features -------------------------------------------------------------------------------------
@dataclass
class Features:
    """Per-prompt activations of one site kind at every probed layer."""

    x: np.ndarray  # [n_prompts, n_layers, width] float32 (a read-only np.memmap when spilled)
    layers: list[int]
    site: str = "resid_post"
    position: str = "last"

    def __post_init__(self) -> None:
        if self.x.ndim != 3 or self.x.shape[1] != len(self.layers):
            raise ValueError(f"features must be [n_prompts, {len(self.layers)} layers, width], got {self.x.shape}")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def layer(self, j: int) -> np.ndarray:
        """[n_prompts, width] float64 copy of the j-th probed layer (j indexes ``layers``)."""
        return np.asarray(self.x[:, j, :], dtype=np.float64)


def probe_sites(lm: LoadedModel, site: str, layers: str | Sequence[int] = "*") -> list[Site]:
    """The ``site`` kind at each of ``layers`` (a layer pattern of the site grammar: ``*``, ``a-b``, ``a,b``;
    or block indices), validated against the model."""
    if site not in BLOCK_KINDS:
        raise ValueError(f"probes read block sites; got {site!r}, use one of {', '.join(BLOCK_KINDS)}")
    if not isinstance(layers, str):
        return lm.sites([Site(site, int(layer)) for layer in layers])
    return lm.sites(f"blocks.{layers}.{site}")  # a wildcard pattern of the grammar, parsed by sites.py


def _position_name(position: PositionSpec) -> str:
    spec = parse_positions(position)
    return spec if isinstance(spec, str) else ",".join(str(p) for p in spec)


def collect_features(
    lm: LoadedModel,
    prompts: Sequence[str],
    site: str = "resid_post",
    position: PositionSpec = "last",
    *,
    layers: str = "*",
    batch_size: int = 8,
    system: str | None = None,
    spill: str | Path | None = None,
    description: str = "capturing",
) -> Features:
    """Features of ``prompts`` at ``blocks.{layers}.{site}``, every layer from the same forward pass.

    ``spill``: build the array in a ``.npy`` file (written under a temporary name, renamed when
    complete) and return it memory-mapped, for prompt sets too large for memory.
    """
    sites = probe_sites(lm, site, layers)
    if parse_positions(position) == "all":
        raise ValueError("probes need one vector per prompt; use --positions last, mean, post_instruction or -1,-2")
    shape = (len(prompts), len(sites), int(np.prod(lm.site_shape(sites[0]))))
    tmp = None
    if spill is not None:
        path = Path(spill)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        x: np.ndarray = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    else:
        x = np.empty(shape, dtype=np.float32)
    try:
        for batch, values in run_capture(
            lm, prompts, sites, position, batch_size=batch_size, system=system, description=description
        ):
            rows = list(batch.index)
            for j, s in enumerate(sites):
                x[rows, j] = values[s].float().mean(1).flatten(1).numpy()  # [batch, k, *shape] -> [batch, width]
        if tmp is not None:
            assert isinstance(x, np.memmap)
            x.flush()
            del x
            os.replace(tmp, path)
            x = np.load(path, mmap_mode="r")
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return Features(x, [int(s.layer) for s in sites if s.layer is not None], site, _position_name(position))


def load_features(path: str | Path, layers: Sequence[int], site: str, position: str, n_prompts: int) -> Features | None:
    """Features spilled earlier by :func:`collect_features` (memory-mapped), or None if absent or stale."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        x = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return None
    if x.ndim != 3 or x.shape[:2] != (n_prompts, len(layers)):
        return None
    return Features(x, list(layers), site, position)


# ---- fitting --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeConfig:
    folds: int = 5
    seed: int = 0
    c: float | None = None  # None: chosen from ``cs`` by inner CV inside every training fold
    cs: tuple[float, ...] = DEFAULT_CS
    inner_folds: int = 3
    n_controls: int = 3  # shuffled-label controls (seeds)
    n_random: int = 0  # random-direction baselines
    max_iter: int = 2000
    n_jobs: int = 1  # layers fitted in parallel (joblib)


@dataclass(frozen=True)
class LayerResult:
    layer: int
    accuracy: float  # mean over CV folds
    accuracy_std: float
    auroc: float
    auroc_std: float
    control_accuracy: float  # shuffled labels: mean over seeds of the CV mean
    control_accuracy_std: float  # std over seeds
    control_auroc: float
    control_auroc_std: float
    selectivity: float  # accuracy - control_accuracy
    dom_auroc: float  # CV AUROC of the training folds' difference-of-means direction
    cosine_dom: float  # cos(final probe direction w / scale, difference of means)
    c: float  # C of the final probe
    random_accuracy: float | None = None
    random_auroc: float | None = None
    test_accuracy: float | None = None
    test_auroc: float | None = None
    test_dom_auroc: float | None = None


def cv_folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, shuffled, seeded (train, test) index pairs; the same seed gives the same folds."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(int)
    counts = np.bincount(y, minlength=2)
    if folds < 2:
        raise ValueError(f"cross-validation needs --folds >= 2, got {folds}")
    if counts.min() < folds:
        raise ValueError(
            f"only {counts.min()} prompt(s) in the smaller class ({counts[1]} positive, {counts[0]} negative) "
            f"for {folds} folds; use fewer --folds or more prompts"
        )
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def make_probe(cfg: ProbeConfig, seed: int = 0) -> Any:
    """The scikit-learn pipeline fitted per layer and fold."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg.c is not None:
        return make_pipeline(StandardScaler(), LogisticRegression(C=cfg.c, max_iter=cfg.max_iter))
    inner = StratifiedKFold(cfg.inner_folds, shuffle=True, random_state=seed)
    lr = LogisticRegressionCV(Cs=list(cfg.cs), cv=inner, scoring="neg_log_loss", max_iter=cfg.max_iter)
    return make_pipeline(StandardScaler(), lr)


def _chosen_c(pipe: Any) -> float:
    lr = pipe[-1]
    return float(np.ravel(lr.C_)[0]) if hasattr(lr, "C_") else float(lr.C)


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def _dom(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x[y == 1].mean(0) - x[y == 0].mean(0)  # [width]


def _cv(x: np.ndarray, y: np.ndarray, splits: list, cfg: ProbeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-fold (accuracy, AUROC, DoM AUROC)."""
    acc, auc, dom = [], [], []
    for k, (tr, te) in enumerate(splits):
        pipe = make_probe(cfg, cfg.seed + k).fit(x[tr], y[tr])
        s = pipe.decision_function(x[te])
        acc.append(float(((s > 0).astype(int) == y[te]).mean()))
        auc.append(_auroc(y[te], s))
        dom.append(_auroc(y[te], x[te] @ _dom(x[tr], y[tr])))
    return np.array(acc), np.array(auc), np.array(dom)


def _fit_layer(
    layer: int, x: np.ndarray, y: np.ndarray, cfg: ProbeConfig, x_test: np.ndarray | None, y_test: np.ndarray | None
) -> tuple[LayerResult, dict[str, np.ndarray]]:
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (ConvergenceWarning, FutureWarning, UserWarning))
        acc, auc, dom_auc = _cv(x, y, cv_folds(y, cfg.folds, cfg.seed), cfg)
        ctrl = []
        for k in range(cfg.n_controls):  # the same permutations at every layer
            y_perm = np.random.default_rng([cfg.seed, 1, k]).permutation(y)
            a, u, _ = _cv(x, y_perm, cv_folds(y_perm, cfg.folds, cfg.seed + 1 + k), cfg)
            ctrl.append((a.mean(), u.mean()))
        rand = []
        for k in range(cfg.n_random):
            u_dir: np.ndarray = np.random.default_rng([cfg.seed, 2, k]).standard_normal((x.shape[1], 1))
            a, u, _ = _cv(x @ (u_dir / np.linalg.norm(u_dir)), y, cv_folds(y, cfg.folds, cfg.seed), cfg)
            rand.append((a.mean(), u.mean()))
        pipe = make_probe(cfg, cfg.seed).fit(x, y)
    scaler, lr = pipe[0], pipe[-1]
    w = lr.coef_[0] / scaler.scale_  # original-space direction [width]
    dom = _dom(x, y)
    cos = float(w @ dom / (np.linalg.norm(w) * np.linalg.norm(dom) + 1e-12))
    c_arr = np.array(ctrl) if ctrl else np.full((1, 2), np.nan)
    extra: dict[str, float | None] = {}
    if rand:
        m = np.asarray(rand).mean(axis=0)
        extra.update(random_accuracy=float(m[0]), random_auroc=float(m[1]))
    if x_test is not None and y_test is not None:
        s = pipe.decision_function(x_test)
        extra.update(test_accuracy=float(((s > 0).astype(int) == y_test).mean()), test_auroc=_auroc(y_test, s),
                     test_dom_auroc=_auroc(y_test, x_test @ dom))
    res = LayerResult(
        layer=layer,
        accuracy=float(acc.mean()), accuracy_std=float(acc.std()),
        auroc=float(np.nanmean(auc)), auroc_std=float(np.nanstd(auc)),
        control_accuracy=float(c_arr[:, 0].mean()), control_accuracy_std=float(c_arr[:, 0].std()),
        control_auroc=float(c_arr[:, 1].mean()), control_auroc_std=float(c_arr[:, 1].std()),
        selectivity=float(acc.mean() - c_arr[:, 0].mean()),
        dom_auroc=float(np.nanmean(dom_auc)), cosine_dom=cos, c=_chosen_c(pipe), **extra,  # type: ignore[arg-type]
    )
    state = {"weight": lr.coef_[0], "bias": np.array(lr.intercept_[0]), "mean": scaler.mean_,
             "scale": scaler.scale_, "dom": dom}
    return res, state


@dataclass(frozen=True)
class ProbeResult:
    layers: tuple[LayerResult, ...]
    probe: Probe
    label: str
    n_positive: int
    n_negative: int
    config: ProbeConfig
    n_test: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def best_layer(self) -> int:
        return self.probe.best_layer

    def row(self, layer: int) -> LayerResult:
        return next(r for r in self.layers if r.layer == layer)

    def summary(self) -> dict[str, Any]:
        best = self.row(self.best_layer)
        return {
            "label": self.label, "site": self.probe.site, "position": self.probe.position,
            "n_positive": self.n_positive, "n_negative": self.n_negative, "n_test": self.n_test,
            "chance": max(self.n_positive, self.n_negative) / (self.n_positive + self.n_negative),
            "config": {**asdict(self.config), "c": "auto (inner CV)" if self.config.c is None else self.config.c},
            "best_layer": best.layer, "best": asdict(best), **self.info,
            "layers": [asdict(r) for r in self.layers],
        }


def fit_on_features(
    train: Features,
    y: Sequence[int] | np.ndarray,
    cfg: ProbeConfig | None = None,
    *,
    test: Features | None = None,
    y_test: Sequence[int] | np.ndarray | None = None,
    label: str = "harmful",
) -> ProbeResult:
    """Cross-validated probes at every layer of ``train`` (labels ``y``: 1 = ``label``), controls,
    cosine with the difference of means, the final probes as an artifact, held-out scores on ``test``."""
    from joblib import Parallel, delayed
    from sklearn import config_context
    from threadpoolctl import threadpool_limits

    cfg = cfg or ProbeConfig()
    y_arr = np.asarray(y).astype(int).ravel()
    if len(y_arr) != len(train):
        raise ValueError(f"{len(train)} feature rows but {len(y_arr)} labels")
    cv_folds(y_arr, cfg.folds, cfg.seed)  # fail early, before any fitting, when a class is too small
    smallest = int(min(y_arr.sum(), len(y_arr) - y_arr.sum()))
    if cfg.c is None and smallest - -(-smallest // cfg.folds) < cfg.inner_folds:
        raise ValueError(
            f"choosing C by inner CV needs {cfg.inner_folds} prompts of each class in every training fold, "
            f"but the smaller class has {smallest}; give a fixed --c (e.g. 1.0) or more prompts"
        )
    yt = None
    if test is not None:
        if y_test is None or test.layers != train.layers or test.x.shape[2] != train.x.shape[2]:
            raise ValueError("the test features need labels and the same layers and site as the training features")
        yt = np.asarray(y_test).astype(int).ravel()
    args = (
        (layer, train.layer(j), y_arr, cfg, None if test is None else test.layer(j), yt)
        for j, layer in enumerate(train.layers)
    )
    # Small problems: a multi-threaded BLAS only adds synchronisation (about 8x slower on 2 cores).
    with threadpool_limits(limits=1, user_api="blas"), config_context(assume_finite=True, skip_parameter_validation=True):
        if cfg.n_jobs == 1:
            out = [_fit_layer(*a) for a in args]
        else:
            out = Parallel(n_jobs=cfg.n_jobs)(delayed(_fit_layer)(*a) for a in args)
    rows = [r for r, _ in out]
    stack = {k: np.stack([s[k] for _, s in out]) for k in ("weight", "bias", "mean", "scale", "dom")}
    metrics: dict[str, list[Any]] = {k: [getattr(r, k) for r in rows] for k in ("accuracy", "auroc", "control_accuracy", "selectivity")}
    if yt is not None:
        metrics.update(test_accuracy=[r.test_accuracy for r in rows], test_auroc=[r.test_auroc for r in rows])
    probe = Probe(
        site=train.site, position=train.position, layers=train.layers, weight=stack["weight"], bias=stack["bias"],
        scaler_mean=stack["mean"], scaler_scale=stack["scale"], dom=stack["dom"], label=label, metrics=metrics,
        info={"n_positive": int(y_arr.sum()), "n_negative": int(len(y_arr) - y_arr.sum()), "folds": cfg.folds,
              "seed": cfg.seed, "c": cfg.c},
    )
    return ProbeResult(tuple(rows), probe, label, int(y_arr.sum()), int(len(y_arr) - y_arr.sum()), cfg,
                       0 if yt is None else len(yt))



# ---- labels ---------------------------------------------------------------------------------------
def refusal_labels(
    lm: LoadedModel,
    prompts: Sequence[str],
    judge: str | Any = "score",
    *,
    threshold: float = 0.0,
    batch_size: int = 8,
    system: str | None = None,
    max_new_tokens: int = 48,
) -> tuple[np.ndarray, list[float]]:
    """(refused [n] bool, score per prompt) for ``--label refusal``.

    ``judge``: ``"score"`` (logit refusal score > ``threshold``; one forward pass, no generation),
    ``"phrase"`` (greedy generation + :class:`PhraseJudge`), ``"module:function"`` or a callable
    ``(prompt, reply) -> bool | float`` (generation + that judge).
    """
    from ...measure.generation import generate, refusal_scores
    from ...measure.judges import PhraseJudge, as_judge, load_judge

    if isinstance(judge, str) and judge == "score":
        scores = refusal_scores(lm, prompts, batch_size=batch_size, system=system)
        return (scores > threshold).numpy(), [float(v) for v in scores]
    if isinstance(judge, str):
        fn = PhraseJudge() if judge == "phrase" else load_judge(judge)
    else:
        fn = as_judge(judge)
    replies = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, system=system)
    refused = np.array([bool(fn(p, r)) for p, r in zip(prompts, replies)])
    return refused, [float(v) for v in refused]
