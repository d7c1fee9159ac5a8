"""A checkpoint against its reference, matrix by matrix: what changed, and was a direction removed?

Per tensor, ``D = W' - W`` is classified as

* ``none``: bit-identical;
* ``noise``: ||D|| / ||W|| below a dtype-aware floor (4 x the unit roundoff of the coarser of the two
  stored dtypes: float16/bfloat16 round trips), or a flat singular spectrum (no direction stands out:
  sigma_1^2 / ||D||^2 under 3x what i.i.d. noise of that shape gives) with ||D|| / ||W|| <= 5% (8-bit
  round trips);
* ``low_rank`` (95% of ||D||^2 in at most min(16, min(m, n) / 4) singular values) or ``full_rank``.

Directional ablation written into the weights (``W' = (I - w r r^T) W`` for every matrix that writes
to the residual stream: the embedding's rows, attention and MLP output projections, per the
architecture table's ``embed`` and ``writers``) leaves ``D = -w r (r^T W)``: rank 1, its residual-side
singular vector is ``r``, and its other side is the matrix's own output along ``r``. Each residual
writer's change is tested for that structure with its own top singular vector (``self_explained``:
the share of ||D||^2 the projection explains; ``self_weight``: w). The removed direction shared by all
writers is the top eigenvector of ``sum_i D_i D_i^T`` (residual side), and each writer's removal weight
along it gives the per-layer kernel (heretic-style weights).

MLP neurons: a neuron whose weight slice (gate/up row, down column; the table's ``mlp_in`` and
``mlp_out_proj``) became zero or a constant multiple of itself is reported as a neuron edit.

Verdict: refusal tampering when at least ``min_removals`` residual writers each lost one direction
(and, when a refusal direction is known, the removed direction is close to it: |cos| >= ``min_cos``;
a removed direction unrelated to refusal is only "modified"), or when neurons were surgically zeroed
or scaled; modified when anything else changed beyond noise; clean otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...models.arch import ArchTable
from .source import AuditInputError, TensorRole, TensorSource, roles, writes_residual
from .types import DiffKind, LayerVerdict, MatrixDiff, NeuronEdit, Verdict, WeightAudit

_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class WeightConfig:
    min_removals: int = 3  # residual writers that must each lose one direction for the abliteration signature
    min_cos: float = 0.3  # |cos| of the removed direction with a known refusal direction to call it refusal tampering
    noise_rel: float = 0.05  # largest ||D||/||W|| a flat-spectrum change may have and still count as noise


def noise_floor(*dtypes: torch.dtype) -> float:
    """4 x the unit roundoff of the coarsest dtype (8-bit integers count as 2^-7)."""
    return 4.0 * max(_UNIT_ROUNDOFF.get(dt, 2.0**-7) for dt in dtypes)


def check_compatible(ck: TensorSource, ref: TensorSource) -> list[tuple[str, str]]:
    """[(checkpoint name, reference name)] of every tensor to compare; one-line errors for another model."""
    ck_type, ref_type = ck.config.get("model_type"), ref.config.get("model_type")
    if ck_type != ref_type:
        raise AuditInputError(f"{ck.label} is a {ck_type} model but the reference {ref.label} is {ref_type}; "
                              "audit it against the model it was derived from")
    pairs: list[tuple[str, str]] = []
    for name in sorted(set(ck.shapes) | set(ref.shapes)):
        a = name if name in ck.shapes else ck.tied_alias(name)
        b = name if name in ref.shapes else ref.tied_alias(name)
        if a is None or b is None:
            side = ck.label if a is None else ref.label
            raise AuditInputError(f"{side} lacks the tensor {name!r} that the other has; audit the checkpoint "
                                  "against the model it was derived from (same architecture and size)")
        if ck.shapes[a] != ref.shapes[b]:
            raise AuditInputError(f"{name} is {list(ck.shapes[a])} in {ck.label} but {list(ref.shapes[b])} in "
                                  f"{ref.label}: another model size; audit against the model it was derived from")
        pairs.append((a, b))
    return pairs


def _oriented(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The matrix with the residual (d_model) axis first: [d_model, other]."""
    return t.T if axis == 1 else t


def spectrum(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending = sigma^2, eigenvectors) of D D^T for D [a, b] (a is the side whose vectors we want)."""
    gram = (d @ d.T).double()  # [a, a]
    vals, vecs = torch.linalg.eigh(gram)
    return vals.flip(0).clamp_min(0.0), vecs.flip(1)


def classify(d: torch.Tensor, w_norm: float, floor: float, cfg: WeightConfig) -> tuple[DiffKind, dict[str, object]]:
    """Kind of a 2-D difference D [a, b] (a = the side whose singular vectors are kept) plus its spectrum."""
    d_norm = float(d.norm())
    rel = d_norm / max(w_norm, 1e-30)
    small = d if d.shape[0] <= d.shape[1] else d.T
    vals, vecs = spectrum(d if d.shape[0] <= 4 * d.shape[1] else small)
    total = float(vals.sum()) or 1e-300
    energy = torch.cumsum(vals, 0) / total
    rank = int((energy < 0.95).sum()) + 1
    m, n = d.shape
    iid_top = (m**0.5 + n**0.5) ** 2 / (m * n)  # sigma_1^2 / ||D||^2 of i.i.d. noise
    top_energy = float(vals[0]) / total
    info: dict[str, object] = {"rank": rank, "top_energy": top_energy, "vecs": vecs, "vals": vals,
                               "top_singular": tuple(float(v) ** 0.5 / max(w_norm, 1e-30) for v in vals[:4])}
    if rel <= floor or (top_energy < 3 * iid_top and rel <= cfg.noise_rel):
        return "noise", info
    return ("low_rank" if rank <= min(16, max(1, min(m, n) // 4)) else "full_rank"), info


def removal_fit(u: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(w, explained) of ``D ~ -w u (u^T W)`` for unit u [d_model], D and W [d_model, other]."""
    a = (u.to(d.dtype) @ d).double()  # [other]: u^T D
    b = (u.to(w.dtype) @ w).double()  # [other]: u^T W
    bb = float(b @ b)
    if bb <= 0:
        return 0.0, 0.0
    ab = float(a @ b)
    weight = -ab / bb
    d2 = float(d.double().pow(2).sum())
    resid = d2 + 2 * weight * ab + weight**2 * bb  # ||D + w u b||^2
    return weight, (1.0 - resid / d2) if d2 > 0 else 0.0


def neuron_edits(name: str, role: TensorRole, new: torch.Tensor, old: torch.Tensor) -> NeuronEdit | None:
    """Neurons (slices along ``role.neuron_axis``) zeroed or scaled by a constant while the rest is unchanged."""
    assert role.neuron_axis is not None and role.layer is not None
    n_new = new.movedim(role.neuron_axis, 0)  # [n_neurons, d_model]
    n_old = old.movedim(role.neuron_axis, 0)
    changed = (n_new != n_old).any(dim=1).nonzero().flatten()
    if changed.numel() == 0 or changed.numel() > n_new.shape[0] // 2:
        return None
    zeroed, scaled = [], []
    for i in changed.tolist():
        a, b = n_new[i].double(), n_old[i].double()
        nb = float(b.norm())
        if float(a.norm()) <= 1e-6 * nb:
            zeroed.append(i)
            continue
        c = float(a @ b) / max(nb**2, 1e-300)
        if float((a - c * b).norm()) <= 1e-3 * float(a.norm()):
            scaled.append((i, c))
        else:
            return None  # an arbitrary change of that neuron: not a surgical edit
    return NeuronEdit(name, role.layer, tuple(zeroed), tuple(scaled))


@dataclass
class _Pass:
    diffs: dict[str, MatrixDiff]
    gram: torch.Tensor | None  # [d_model, d_model] sum of residual-side D D^T
    neurons: list[NeuronEdit]
    resid_changed: list[tuple[str, str]]
    top_vectors: dict[str, torch.Tensor]  # residual writer -> top left singular vector of its D [d_model]


def _first_pass(ck: TensorSource, ref: TensorSource, pairs: list[tuple[str, str]], cfg: WeightConfig) -> _Pass:
    role_of = roles(ref.table, ref.dims, {b: ref.shapes[b] for _, b in pairs})
    out = _Pass({}, None, [], [], {})
    for a, b in pairs:
        role = role_of[b]
        new, old = ck.get(a), ref.get(b)
        floor = noise_floor(ck.dtypes[a], ref.dtypes[b])
        if torch.equal(new, old):
            out.diffs[a] = MatrixDiff(a, role.role, role.layer, "none", 0.0, floor)
            continue
        d = new - old
        w_norm = float(old.norm())
        if d.dim() != 2:
            rel = float(d.norm()) / max(w_norm, 1e-30)
            out.diffs[a] = MatrixDiff(a, role.role, role.layer, "noise" if rel <= floor else "full_rank", rel, floor)
            continue
        if role.neuron_axis is not None:
            edit = neuron_edits(a, role, new, old)
            if edit is not None:
                out.neurons.append(edit)
        d_o, w_o = _oriented(d, role.resid_axis), _oriented(old, role.resid_axis)
        kind, info = classify(d_o, w_norm, floor, cfg)
        extra: dict[str, float] = {}
        if writes_residual(role) and kind not in ("noise",) and d_o.shape[0] <= 4 * d_o.shape[1]:
            u1 = info["vecs"][:, 0].float()  # type: ignore[index]
            sw, se = removal_fit(u1, d_o, w_o)
            extra = {"self_weight": sw, "self_explained": se}
            out.top_vectors[a] = u1
            gram = (d_o @ d_o.T).double()
            out.gram = gram if out.gram is None else out.gram + gram
            out.resid_changed.append((a, b))
        out.diffs[a] = MatrixDiff(
            a, role.role, role.layer, kind, float(d.norm()) / max(w_norm, 1e-30), floor, rank=int(info["rank"]),  # type: ignore[call-overload]
            top_singular=info["top_singular"], top_energy=float(info["top_energy"]), **extra,  # type: ignore[arg-type]
        )
    return out


def _global_direction(ck: TensorSource, ref: TensorSource, p: _Pass) -> tuple[torch.Tensor | None, float | None]:
    """The top residual-side direction of all writers' changes, its share of the change, and per-writer fits."""
    if p.gram is None:
        return None, None
    vals, vecs = torch.linalg.eigh(p.gram)
    r = vecs[:, -1].float()  # [d_model]
    concentration = float(vals[-1] / vals.clamp_min(0).sum().clamp_min(1e-300))
    role_of = roles(ref.table, ref.dims, {b: ref.shapes[b] for _, b in p.resid_changed})
    for a, b in p.resid_changed:
        role = role_of[b]
        new, old = ck.get(a), ref.get(b)
        d_o, w_o = _oriented(new - old, role.resid_axis), _oriented(old, role.resid_axis)
        gw, ge = removal_fit(r, d_o, w_o)
        m = p.diffs[a]
        u1_cos = abs(float(p.top_vectors[a] @ r))
        p.diffs[a] = MatrixDiff(**{**m.__dict__, "global_weight": gw, "global_explained": ge, "cos_global": u1_cos})
    return r, concentration


def _cos_reference(r: torch.Tensor | None, refusal: torch.Tensor | None) -> float | None:
    """max |cos| of r [d_model] with the refusal direction(s) [d_model] or [k, d_model]."""
    if r is None or refusal is None:
        return None
    ref = refusal.detach().to(torch.float64).reshape(-1, r.numel())
    ref = ref / ref.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return float((ref @ r.double()).abs().max())


def _layer_verdicts(diffs: dict[str, MatrixDiff], neurons: list[NeuronEdit], table: ArchTable, n_layers: int,
                    signature: bool, tamper: bool) -> tuple[LayerVerdict, ...]:
    out = []
    by_layer: dict[int, list[MatrixDiff]] = {}
    for m in diffs.values():
        if m.layer is not None:
            by_layer.setdefault(m.layer, []).append(m)
    for layer in range(n_layers):
        ms = by_layer.get(layer, [])
        ev: list[str] = []
        block = table.block_path(layer) + "."
        weights = {m.name: round(m.global_weight, 4) for m in ms if m.global_weight is not None}
        removed = [m for m in ms if m.removal]
        edits = [e for e in neurons if e.layer == layer]
        changed = [m for m in ms if m.kind in ("low_rank", "full_rank")]
        verdict: Verdict = "clean"
        if changed:
            verdict = "modified"
            ev.append(f"{len(changed)} matrices changed beyond noise")
        if removed:
            ev.append("direction removed from " + ", ".join(
                f"{m.name.removeprefix(block)} (w={m.self_weight:.2f})" for m in removed))
            if signature and tamper:
                verdict = "tampering"
        if edits:
            n_z, n_s = sum(len(e.zeroed) for e in edits), sum(len(e.scaled) for e in edits)
            ev.append(f"{n_z} neuron(s) zeroed, {n_s} scaled")
            verdict = "tampering"
        out.append(LayerVerdict(layer, verdict, weights, tuple(ev)))
    return tuple(out)


def audit_weights(ck: TensorSource, ref: TensorSource, refusal: torch.Tensor | None = None,
                  cfg: WeightConfig | None = None) -> WeightAudit:
    """Compare every tensor of ``ck`` with ``ref``; ``refusal``: known refusal direction(s) [d_model] or [k, d_model]."""
    cfg = cfg or WeightConfig()
    t0 = time.perf_counter()
    pairs = check_compatible(ck, ref)
    p = _first_pass(ck, ref, pairs, cfg)
    r, concentration = _global_direction(ck, ref, p)
    surgical = {e.name for e in p.neurons}
    removals = [m for m in p.diffs.values() if m.removal and m.name not in surgical]
    aligned = [m for m in removals if (m.cos_global or 0.0) >= 0.9]
    cos_ref = _cos_reference(r, refusal)
    signature = len(removals) >= cfg.min_removals
    related = cos_ref is None or cos_ref >= cfg.min_cos
    ev: list[str] = []
    counts = {k: sum(m.kind == k for m in p.diffs.values()) for k in ("none", "noise", "low_rank", "full_rank")}
    if signature:
        ev.append(f"{len(removals)} residual writers each lost one output direction ({len(aligned)} the same one; "
                  f"{concentration:.0%} of the residual-side change lies along it): the abliteration signature")
    elif removals:
        ev.append(f"{len(removals)} residual writer(s) lost one output direction (fewer than {cfg.min_removals}: "
                  "not the abliteration signature)")
    if cos_ref is not None and r is not None:
        ev.append(f"|cos| of the removed direction with the refusal direction: {cos_ref:.3f}")
    n_neurons = sum(len(e.zeroed) + len(e.scaled) for e in p.neurons)
    if n_neurons:
        ev.append(f"{n_neurons} MLP neuron(s) zeroed or scaled in {len({e.layer for e in p.neurons})} layer(s)")
    verdict: Verdict = "clean"
    if counts["low_rank"] or counts["full_rank"]:
        verdict = "modified"
        ev.append(f"{counts['low_rank']} low-rank and {counts['full_rank']} full-rank changes, {counts['noise']} "
                  "at noise level")
    elif counts["noise"]:
        ev.append(f"{counts['noise']} tensors differ at noise level only (dtype or quantisation round trip)")
    else:
        ev.append(f"all {counts['none']} tensors are identical to the reference")
    if (signature and related) or n_neurons:
        verdict = "tampering"
    elif signature:
        ev.append(f"the removed direction is unrelated to refusal (|cos| < {cfg.min_cos}): modified, not refusal tampering")
    layers = _layer_verdicts(p.diffs, p.neurons, ref.table, ref.dims.n_layers, signature, related)
    return WeightAudit(
        checkpoint=ck.label, reference=ref.label, verdict=verdict, evidence=tuple(ev),
        matrices=tuple(p.diffs.values()), layers=layers, neurons=tuple(p.neurons), direction=r,
        concentration=concentration, n_removal=len(removals), n_aligned=len(aligned), cos_reference=cos_ref,
        counts=counts, seconds=time.perf_counter() - t0,
    )
