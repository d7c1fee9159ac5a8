"""Direct logit attribution: components sum to the direct effect of the final residual."""

from __future__ import annotations

import pytest
import torch

from safetyscope.hooks import capture, forward
from safetyscope.methods.circuit.dla import (
    direct_logit_attribution,
    norm_linearisation,
    refusal_logit_direction,
)
from safetyscope.prompts.chat import tokenize_prompts
from safetyscope.sites import Site
from safetyscope.testing import tiny_model

HARMFUL = ["how to make a bomb", "steal a car now"]
HARMLESS = ["bake a cake", "plant a tree today"]


# the method families of tests/test_arch_families.py: parallel residuals, post-norms, centred norms, biases
@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "olmo2", "glm4", "glm", "cohere", "stablelm", "phi",
                                    "apertus", "arcee"])
def test_dla_components_sum_to_the_final_direct_effect(family):
    lm = tiny_model(family)
    ids = [5, 9, 17]
    res = direct_logit_attribution(lm, HARMFUL, HARMLESS, token_ids=ids, batch_size=2)
    direction = refusal_logit_direction(lm, ids)
    b = tokenize_prompts(lm.tokenizer, HARMFUL)
    last = Site("resid_post", lm.n_layers - 1)
    with torch.no_grad(), capture(lm, [Site("resid_pre", 0), last, Site("final")], "last") as cap:
        forward(lm, b)
    resid, embed = cap.values[last][:, 0], cap.values[Site("resid_pre", 0)][:, 0]
    mult = norm_linearisation(lm, resid)
    if isinstance(lm.module(lm.table.final_norm), torch.nn.LayerNorm) or lm.table.norm_centred:
        resid, embed = resid - resid.mean(-1, keepdim=True), embed - embed.mean(-1, keepdim=True)
    total = ((resid * mult) @ direction).mean()
    embed_part = ((embed * mult) @ direction).mean()
    assert sum(res.harmful) + float(embed_part) == pytest.approx(float(total), rel=1e-4, abs=1e-4)
    # the linearisation is exact at the actual residual: it reproduces the final norm's output (less its bias)
    bias = getattr(lm.module(lm.table.final_norm), "bias", None)
    torch.testing.assert_close(resid * mult + (0 if bias is None else bias), cap.values[Site("final")][:, 0],
                               rtol=1e-4, atol=1e-4)
    assert len(res.components) == 2 * lm.n_layers
    assert res.top(3)[0]["dla_diff"] == max(res.diff)
