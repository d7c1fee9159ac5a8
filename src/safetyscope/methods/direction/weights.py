"""Weight orthogonalisation: a copy of the model whose embeddings and residual writers no longer write along
a direction (the weight form of zero directional ablation; see :mod:`.artifact`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...artifacts.base import ArtifactError

if TYPE_CHECKING:
    from ...models.adapter import LoadedModel


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype projections are computed in: the tensor's own when float32/64, else float32."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


# ---- weight editing -------------------------------------------------------------------------------
def _orth_rows(weight: torch.Tensor, r: torch.Tensor, w: float) -> None:
    """In place: weight [n, d_model] <- weight - w (weight r) r^T (each row loses its r component)."""
    dt = compute_dtype(weight)
    wf, rf = weight.data.to(dt), r.to(device=weight.device, dtype=dt)
    weight.data.copy_((wf - w * torch.outer(wf @ rf, rf)).to(weight.dtype))


def _orth_cols(weight: torch.Tensor, r: torch.Tensor, w: float) -> None:
    """In place: weight [d_model, n] <- weight - w r (r^T weight) (the output loses its r component)."""
    dt = compute_dtype(weight)
    wf, rf = weight.data.to(dt), r.to(device=weight.device, dtype=dt)
    weight.data.copy_((wf - w * torch.outer(rf, rf @ wf)).to(weight.dtype))


def _orth_bias(bias: torch.Tensor, r: torch.Tensor, w: float) -> None:
    """In place: bias [d_model] <- bias - w (bias . r) r."""
    dt = compute_dtype(bias)
    bf, rf = bias.data.to(dt), r.to(device=bias.device, dtype=dt)
    bias.data.copy_((bf - w * (bf @ rf) * rf).to(bias.dtype))


def _untie_output_embedding(model: Any) -> None:
    """Give the unembedding its own copy when it shares the embedding matrix (edits must not reach it)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        return
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []


def orthogonalized_copy(
    lm: LoadedModel,
    direction: torch.Tensor,
    layer_weights: torch.Tensor | None = None,
    embed_weight: float = 1.0,
    norm_preserving: bool = False,
) -> Any:
    """A deep copy of ``lm.model`` whose embeddings and residual writers no longer write along ``direction``.

    Edits every ``nn.Embedding`` of width d_model (token and positional embeddings; they sum into
    block 0's input) and, for block ``l`` with weight ``layer_weights[l]``, each module of the
    table's ``writers`` (weight and bias). A tied unembedding is untied first.
    """
    table = lm.table
    if norm_preserving:
        raise ArtifactError("norm-preserving ablation is non-linear and cannot be written into weights; "
                            "use it through hooks (apply) or export a standard direction")
    if table.post_norms:
        raise ArtifactError(f"the {table.family} architecture normalises attention/MLP outputs (post_norms), so weight "
                            "orthogonalisation would not equal the ablation; use the hooks (apply) instead")
    if not table.writers:
        raise ArtifactError(f"the {table.family} architecture table lists no residual writers; add `writers` to it")
    d_model = lm.dims.d_model
    r = direction.detach().to(torch.float64).flatten()
    r = r / r.norm()
    weights = [1.0] * lm.n_layers if layer_weights is None else [float(v) for v in layer_weights]
    model = copy.deepcopy(lm.model)
    _untie_output_embedding(model)
    with torch.no_grad():
        if embed_weight != 0.0:
            for module in model.modules():
                if isinstance(module, nn.Embedding) and module.embedding_dim == d_model:
                    _orth_rows(module.weight, r, embed_weight)  # [vocab, d_model]
        for layer, w in enumerate(weights):
            if w == 0.0:
                continue
            for template in table.writers:
                module = model.get_submodule(table.expand(template, layer))
                weight = module.weight
                if table.conv1d:  # Conv1D: [in, d_model]
                    if weight.shape[-1] != d_model:
                        raise ArtifactError(f"writer {template} does not output d_model; fix the architecture table")
                    _orth_rows(weight, r, w)
                else:  # Linear: [d_model, in]
                    if weight.shape[0] != d_model:
                        raise ArtifactError(f"writer {template} does not output d_model; fix the architecture table")
                    _orth_cols(weight, r, w)
                bias = getattr(module, "bias", None)
                if bias is not None:  # [d_model]
                    _orth_bias(bias, r, w)
    return model
