"""The refusal direction as an artifact: directional ablation, activation addition, weight orthogonalisation.

Directional ablation (Arditi et al. 2024) removes the component along a unit vector ``r`` from
everything that is written into the residual stream, ``x <- x - w (x . r) r``. The hook set is chosen
so that the hooked model equals the weight-orthogonalised one (``export``) up to rounding:

* ``blocks.0.resid_pre`` with ``embed_weight``: the block-0 input is the sum of every embedding
  (token, and positional where the model has one), so projecting it equals orthogonalising each
  embedding matrix;
* ``blocks.{l}.attn.out`` and ``blocks.{l}.mlp.out`` with ``layer_weights[l]``: what block ``l``'s
  attention and MLP add to the residual, i.e. the output of the table's ``writers`` (o_proj /
  down_proj and their biases);
* for full ablation (every weight 1) also ``blocks.{l}.resid_pre`` of every block and the last
  block's output (the final norm's input). In exact arithmetic these are already free of ``r``
  (the projection is idempotent); re-projecting keeps the residual's component at rounding level,
  as Arditi et al. do.

With ``post_norms`` tables (Gemma 2/3, GLM-4, OLMo 2/3) ``attn.out``/``mlp.out`` are the post-norm outputs,
so the hooks are still exact there, but no weight edit reproduces them: ``export`` refuses.

``norm_preserving=True`` is a different, non-linear variant: wherever the residual stream is read
(``resid_pre`` of every block, ``resid_mid`` where the architecture has it, and the final norm's
input) the direction is projected out and the vector is rescaled to its original norm, so later
writes keep their relative size. It exists only as hooks.

``ablation="mean"`` (beyond the paper) sets the component along ``r`` to a per-block constant instead
of zero: ``x <- x + w_l (t_l - x . r) r`` at every block's input (``blocks.{l}.resid_pre``), where
``t_l`` (``targets``) is the mean projection of the *harmless* prompts there, at the candidate's
position. Zero ablation moves every prompt's component to 0, and harmless prompts' components are not
0 (on the default model they grow to a third of the harmful mean in late blocks), so zero ablation
perturbs harmless behaviour too; moving the component to the harmless mean leaves a typical harmless
prompt where it was, which lowers first-token KL on harmless prompts (on the default model's
validation prompts from 0.16 to 0.06 for the same direction, with the same judged bypass). The same
constant is used at every position (prompt, template, reply, or plain text), so the hooks need no
position bookkeeping. That is also its weakness: the harmless mean is taken at the candidate's
template position, and tokens whose natural component is far below it (e.g. reply tokens) are pushed
*up* to it, which can induce refusal of some harmless prompts (measured on 100 Alpaca prompts: 10% ->
10% judged refusal, with 3 newly refused and 3 no longer refused). Hence it is an option, not the default.
It exists only as hooks: a constant write along ``r`` needs output biases most architectures lack.

Activation addition (``add``) adds ``coeff * norm * r`` (``norm`` = the difference-of-means norm,
so ``coeff=1`` adds the raw difference of means) to ``blocks.{layer}.resid_pre`` at every position,
generated tokens included.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from ...artifacts.base import Artifact, ArtifactError, register
from ...hooks import EditFn, hooks
from ...io import atomic_dir, write_json
from ...positions import Batch
from ...prefix import pointwise_over, same_rows
from ...sites import Site
from .weights import compute_dtype, orthogonalized_copy

if TYPE_CHECKING:
    from ...models.adapter import LoadedModel

# A direction source: a fixed unit vector [d_model], or a function of the running batch returning
# one vector per row [batch, d_model] (used to score many candidates in one forward pass).
DirectionFn = Callable[["Batch | None"], torch.Tensor]
Ablation = Literal["zero", "mean"]
ABLATIONS: tuple[Ablation, ...] = ("zero", "mean")


def _constant(v: torch.Tensor) -> DirectionFn:
    def get(_batch: Batch | None) -> torch.Tensor:
        return v

    return same_rows(get)


def _along(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, r, x . r) in at least float32, r broadcastable to x and x . r as [batch, pos, 1].

    r: unit [d_model], or one direction per row [batch, d_model].
    """
    dt = compute_dtype(x)
    xf = x.to(dt)
    rf = r.to(device=x.device, dtype=dt)
    if rf.dim() == 2:  # one direction per row: [batch, d] -> [batch, 1, ..., d]
        rf = rf.view(rf.shape[0], *([1] * (x.dim() - 2)), rf.shape[1])
        return xf, rf, (xf * rf).sum(-1, keepdim=True)
    return xf, rf, (xf @ rf).unsqueeze(-1)


def project_out(x: torch.Tensor, r: torch.Tensor, weight: float = 1.0, norm_preserving: bool = False) -> torch.Tensor:
    """``x - weight * (x . r) r`` (optionally rescaled to ``||x||``), in at least float32.

    x: [batch, pos, d_model] (or any [..., d_model]); r: unit [d_model], or [batch, d_model] per row.
    """
    xf, rf, coef = _along(x, r)
    out = xf - weight * coef * rf
    if norm_preserving:
        old = xf.norm(dim=-1, keepdim=True)
        out = out * (old / out.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(xf.dtype).tiny))
    return out.to(x.dtype)


def set_component(x: torch.Tensor, r: torch.Tensor, target: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``x + weight * (target - x . r) r``: the component along unit ``r`` moved to ``target``.

    x: [batch, pos, d_model]; r: [d_model] or per row [batch, d_model]; target: scalar or per row [batch].
    """
    xf, rf, coef = _along(x, r)
    tf = torch.as_tensor(target, device=x.device, dtype=xf.dtype)
    if tf.dim() == 1:  # one target per row: [batch] -> [batch, 1, ..., 1]
        tf = tf.view(-1, *([1] * (x.dim() - 1)))
    return (xf + weight * (tf - coef) * rf).to(x.dtype)


def mean_ablation_edits(
    lm: LoadedModel,
    direction: torch.Tensor | DirectionFn,
    targets: torch.Tensor | Callable[[Batch | None], torch.Tensor],
    layer_weights: torch.Tensor | None = None,
) -> list[tuple[Site, EditFn]]:
    """Edits moving the component along ``direction`` to ``targets[l]`` at every ``blocks.{l}.resid_pre``.

    ``targets``: [n_layers], or a function of the running batch returning [batch, n_layers] (per-row
    candidates, as ``direction`` may return [batch, d_model]).
    """
    get = direction if callable(direction) else _constant(direction)
    tget = targets if callable(targets) else _constant(targets)
    n = lm.n_layers
    w = [1.0] * n if layer_weights is None else [float(v) for v in layer_weights]
    if len(w) != n:
        raise ArtifactError(f"layer weights have {len(w)} entries but the model has {n} blocks; re-tune on this model")

    def make(layer: int) -> EditFn:
        def edit(x: torch.Tensor, batch: Batch | None) -> torch.Tensor:  # x: [batch, pos, d_model]
            t = tget(batch)
            return set_component(x, get(batch), t[..., layer], w[layer])

        return pointwise_over(edit, get, tget)  # the same map at every position: shared-prefix reuse stays exact

    return [(Site("resid_pre", layer), make(layer)) for layer in range(n) if w[layer] != 0.0]


def ablation_sites(
    lm: LoadedModel, layer_weights: torch.Tensor | None = None, embed_weight: float = 1.0, norm_preserving: bool = False
) -> list[tuple[Site, float]]:
    """(site, weight) pairs of a directional ablation; see the module docstring for the choice."""
    n = lm.n_layers
    w = [1.0] * n if layer_weights is None else [float(v) for v in layer_weights]
    if len(w) != n:
        raise ArtifactError(f"layer weights have {len(w)} entries but the model has {n} blocks; re-tune on this model")
    last = Site("resid_post", n - 1)
    if norm_preserving:
        pairs = [(Site("resid_pre", 0), float(embed_weight))]
        pairs += [(Site("resid_pre", layer), w[layer]) for layer in range(1, n)]
        if "resid_mid" in lm.table.sites:
            pairs += [(Site("resid_mid", layer), w[layer]) for layer in range(n)]
        pairs.append((last, w[-1]))
    else:
        pairs = [(Site("resid_pre", 0), float(embed_weight))]
        for layer in range(n):
            pairs += [(Site("attn.out", layer), w[layer]), (Site("mlp.out", layer), w[layer])]
        if all(v == 1.0 for v in w) and embed_weight == 1.0:
            pairs += [(Site("resid_pre", layer), 1.0) for layer in range(1, n)] + [(last, 1.0)]
    return [(s, v) for s, v in pairs if v != 0.0]


def ablation_edits(
    lm: LoadedModel,
    direction: torch.Tensor | DirectionFn,
    layer_weights: torch.Tensor | None = None,
    embed_weight: float = 1.0,
    norm_preserving: bool = False,
) -> list[tuple[Site, EditFn]]:
    """Edit functions that ablate ``direction`` (a unit vector or a per-row :data:`DirectionFn`)."""
    get = direction if callable(direction) else _constant(direction)

    def make(weight: float) -> EditFn:
        def edit(x: torch.Tensor, batch: Batch | None) -> torch.Tensor:  # x: [batch, pos, d_model]
            return project_out(x, get(batch), weight, norm_preserving)

        return pointwise_over(edit, get)

    return [(site, make(w)) for site, w in ablation_sites(lm, layer_weights, embed_weight, norm_preserving)]


def addition_edit(vector: torch.Tensor | DirectionFn) -> EditFn:
    """Edit adding ``vector`` ([d_model], or per row [batch, d_model]) at every position."""
    get = vector if callable(vector) else _constant(vector)

    def edit(x: torch.Tensor, batch: Batch | None) -> torch.Tensor:  # x: [batch, pos, d_model]
        v = get(batch).to(device=x.device, dtype=compute_dtype(x))
        if v.dim() == 2:
            v = v.unsqueeze(1)  # [batch, 1, d_model]
        return (x.to(v.dtype) + v).to(x.dtype)

    return pointwise_over(edit, get)


@register
class Direction(Artifact):
    """A unit direction in the residual stream plus where it was found and how it scored.

    ``layer``/``position``: the block (its ``resid_pre``) and negative token offset of the candidate;
    ``norm``: the norm of the difference of means it was normalised from; ``scores``: its selection
    scores; ``layer_weights`` [n_layers] and ``embed_weight``: per-layer ablation strength (None =
    full ablation); ``norm_preserving``: use the norm-preserving hooks.
    """

    kind = "direction"

    def __init__(
        self,
        direction: torch.Tensor,
        layer: int,
        position: int = -1,
        *,
        norm: float = 1.0,
        token: str = "",
        scores: dict[str, Any] | None = None,
        layer_weights: torch.Tensor | None = None,
        embed_weight: float = 1.0,
        norm_preserving: bool = False,
        targets: torch.Tensor | None = None,
        ablation: Ablation | str = "zero",
        meta: dict[str, Any] | None = None,
    ):
        d = direction.detach().to("cpu", torch.float64).flatten()
        length = float(d.norm())
        if not length > 0 or not torch.isfinite(d).all():
            raise ArtifactError("the direction is zero or not finite; pick another candidate (layer/position)")
        self.direction = (d / length).float()  # [d_model] unit
        self.layer = int(layer)
        self.position = int(position)
        self.norm = float(norm)
        self.token = token
        self.scores = dict(scores or {})
        self.layer_weights = None if layer_weights is None else layer_weights.detach().to("cpu", torch.float32).flatten()
        self.embed_weight = float(embed_weight)
        self.norm_preserving = bool(norm_preserving)
        self.targets = None if targets is None else targets.detach().to("cpu", torch.float32).flatten()  # [n_layers]
        self.ablation = self._valid_ablation(ablation)
        self.meta = dict(meta or {})

    # ---- serialisation ----------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {
            "layer": self.layer,
            "position": self.position,
            "norm": self.norm,
            "token": self.token,
            "d_model": int(self.direction.numel()),
            "scores": self.scores,
            "embed_weight": self.embed_weight,
            "norm_preserving": self.norm_preserving,
            "weighted": self.layer_weights is not None,
            "ablation": self.ablation,
            "meta": self.meta,
        }
        tensors = {"direction": self.direction}
        if self.targets is not None:
            tensors["targets"] = self.targets
        if self.layer_weights is not None:
            tensors["layer_weights"] = self.layer_weights
        return meta, tensors

    @classmethod
    def from_state(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Direction:
        if "direction" not in tensors:
            raise ArtifactError("direction artifact without a 'direction' tensor; re-create it with `safetyscope direction find`")
        return cls(
            tensors["direction"],
            int(meta["layer"]),
            int(meta.get("position", -1)),
            norm=float(meta.get("norm", 1.0)),
            token=str(meta.get("token", "")),
            scores=meta.get("scores") or {},
            layer_weights=tensors.get("layer_weights"),
            embed_weight=float(meta.get("embed_weight", 1.0)),
            norm_preserving=bool(meta.get("norm_preserving", False)),
            targets=tensors.get("targets"),
            ablation=str(meta.get("ablation", "zero")),
            meta=meta.get("meta") or {},
        )

    def with_weights(
        self, layer_weights: torch.Tensor | None, embed_weight: float = 1.0, norm_preserving: bool | None = None
    ) -> Direction:
        """A copy with other per-layer weights (None = full ablation) and/or mode."""
        out = copy.copy(self)
        out.layer_weights = None if layer_weights is None else layer_weights.detach().to("cpu", torch.float32).flatten()
        out.embed_weight = float(embed_weight)
        if norm_preserving is not None:
            out.norm_preserving = bool(norm_preserving)
        return out

    def with_meta(self, **extra: Any) -> Direction:
        """A copy whose metadata has ``extra`` added (e.g. the prompt files it was fitted on)."""
        out = copy.copy(self)
        out.meta = {**self.meta, **extra}
        return out

    def with_ablation(self, ablation: Ablation | str) -> Direction:
        """A copy using ``ablation`` ("zero": Arditi et al.; "mean": to the harmless mean)."""
        out = copy.copy(self)
        out.ablation = self._valid_ablation(ablation)
        return out

    def _valid_ablation(self, ablation: Ablation | str) -> Ablation:
        if ablation not in ABLATIONS:
            raise ArtifactError(f"unknown ablation {ablation!r}; use {' or '.join(ABLATIONS)}")
        ablation = cast(Ablation, ablation)
        if ablation == "mean" and self.targets is None:
            raise ArtifactError("this direction has no harmless mean projections (targets) for mean ablation; "
                                "re-create it with `safetyscope direction find` or use --ablation zero")
        return ablation

    def _check(self, lm: LoadedModel) -> None:
        if int(self.direction.numel()) != lm.dims.d_model:
            raise ArtifactError(
                f"the direction has d_model {self.direction.numel()} but {lm.name} has {lm.dims.d_model}; "
                "use it with the model it was found on"
            )
        if not 0 <= self.layer < lm.n_layers:
            raise ArtifactError(f"direction layer {self.layer} is outside {lm.name}'s blocks 0-{lm.n_layers - 1}")
        if self.targets is not None and int(self.targets.numel()) != lm.n_layers:
            raise ArtifactError(f"the direction has targets for {self.targets.numel()} blocks but {lm.name} has "
                                f"{lm.n_layers}; use it with the model it was found on")

    # ---- interventions ----------------------------------------------------------------------
    def apply(self, lm: LoadedModel) -> Any:
        """Directional ablation as a context manager (hooks removed on exit)."""
        return hooks(lm, self.edits(lm))

    def edits(
        self,
        lm: LoadedModel,
        direction: torch.Tensor | DirectionFn | None = None,
        targets: torch.Tensor | Callable[[Batch | None], torch.Tensor] | None = None,
    ) -> list[tuple[Site, EditFn]]:
        """The (site, edit) pairs of this direction's ablation; ``direction`` / ``targets`` override the
        stored unit vector [d_model] and mean-ablation targets [n_layers] (e.g. with callables returning
        tensors that carry gradients, as ``methods.direction.refine`` does)."""
        self._check(lm)
        vec = self.direction if direction is None else direction
        if self.ablation == "mean":
            tgt = self.targets if targets is None else targets
            assert tgt is not None
            if self.norm_preserving:
                raise ArtifactError("mean ablation has no norm-preserving variant; drop --norm-preserving or use --ablation zero")
            return mean_ablation_edits(lm, vec, tgt, self.layer_weights)
        return ablation_edits(lm, vec, self.layer_weights, self.embed_weight, self.norm_preserving)

    def add(self, lm: LoadedModel, coeff: float = 1.0, layer: int | None = None) -> Any:
        """Activation addition of ``coeff * norm * r`` at ``blocks.{layer}.resid_pre`` (default: own layer)."""
        self._check(lm)
        where = self.layer if layer is None else int(layer)
        site = lm.sites(Site("resid_pre", where if where >= 0 else where + lm.n_layers))[0]
        return hooks(lm, [(site, addition_edit(self.direction * (coeff * self.norm)))])

    # ---- weight orthogonalisation -----------------------------------------------------------
    def export(self, lm: LoadedModel, out_dir: str | Path) -> Path:
        """Orthogonalise a deep copy of the weights and save it as a normal Hugging Face checkpoint."""
        self._check(lm)
        if self.ablation == "mean":
            raise ArtifactError("mean ablation writes a constant along the direction, which needs output biases the "
                                "attention/MLP projections lack; export the zero-ablation variant (--ablation zero)")
        model = orthogonalized_copy(lm, self.direction, self.layer_weights, self.embed_weight, self.norm_preserving)
        with atomic_dir(out_dir) as tmp:
            kwargs: dict[str, Any] = {}
            if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
                kwargs["safe_serialization"] = True
            model.save_pretrained(tmp, **kwargs)
            if lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            meta, _ = self.to_state()
            write_json(tmp / "safetyscope_direction.json", {"source_model": lm.name, **meta})
        return Path(out_dir)
