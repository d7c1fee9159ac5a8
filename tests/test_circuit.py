"""Stage assignment follows the evidence, not depth."""

from __future__ import annotations

from safetyscope.methods.circuit.stages import Evidence, assign_stages, layer_of


def test_stages_follow_the_evidence():
    n = 12
    acc = [0.5, 0.55, 0.6, 0.9, 0.97, 0.98, 0.98, 0.98, 0.97, 0.97, 0.96, 0.96]
    ev = Evidence(
        n_layers=n,
        probe_acc=acc,
        probe_control=[0.5] * n,
        neuron_layer_score=[0.1, 0.1, 0.2, 0.3, 0.5, 0.9, 1.0, 0.8, 0.3, 0.2, 0.1, 0.1],
        top_neurons=["L6.N3", "L5.N10", "L1.N2", "L7.N8"],
        patch_effects={"blocks.8.attn.out": 0.6, "blocks.9.mlp.out": 0.3, "blocks.2.resid_post": 0.99, "blocks.1.mlp.out": 0.01},
        direction_layer=7,
        dla={"blocks.11.mlp.out": 1.5, "blocks.10.attn.out": 0.7, "blocks.3.mlp.out": -0.2},
    )
    stages = {s.name: s for s in assign_stages(ev)}
    assert list(stages) == ["detection", "evaluation", "decision", "production"]
    assert stages["detection"].layers == (3, 4)  # first halfway (0.9 at 3), first near-best (0.97 at 4)
    assert stages["evaluation"].layers == (5, 7)  # within 70% of the peak at 6
    assert stages["evaluation"].components[:2] == ["L6.N3", "L5.N10"]  # L1.N2 lies outside the span
    assert stages["decision"].components[0] == "blocks.8.attn.out"  # resid cells are excluded
    assert stages["decision"].layers == (7, 9)  # 8 and 9 from patching, 7 from the direction; 1 is too weak
    assert stages["production"].components[0] == "blocks.11.mlp.out"
    assert "blocks.3.mlp.out" not in stages["production"].components
    assert all(s.evidence for s in stages.values())


def test_missing_evidence_drops_the_stage():
    stages = assign_stages(Evidence(n_layers=4, dla={"blocks.3.mlp.out": 0.5}))
    assert [s.name for s in stages] == ["production"]
    assert layer_of("blocks.12.attn.heads") == 12 and layer_of("L3.N7") == 3 and layer_of("embed") is None
