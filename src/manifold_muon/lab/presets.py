"""The lab's experiment allocations beyond the paper's and the plan's, registered through the
library's public :func:`~manifold_muon.register_manifold` and :func:`~manifold_muon.register_preset`,
as a user registers their own.

They test where DGram attention's failure comes from: a scale cap on its column norms (hard at
1 or 2, or soft, decaying toward 1), ordinary weight decay toward 0, and controls that change
one thing from the paper's allocations.
"""
from __future__ import annotations

from ..optim.allocation import ATTENTION, MLP, register_preset, muon_rule, split_preset
from ..optim.manifolds import DGram, register_manifold

__all__ = ["EXPERIMENT_MANIFOLDS", "EXPERIMENT_PRESETS"]

#: DGram with its column norms (its singular values) capped: hard at 1 (the Stiefel scale) or
#: 2, or soft: the part above 1 decays at the paper's weight decay, 0.1.
EXPERIMENT_MANIFOLDS = (DGram(name="dgram-capped", cap=1.0), DGram(name="dgram-cap2", cap=2.0),
                        DGram(name="dgram-decay", cap=1.0, cap_decay=0.1))
for _manifold in EXPERIMENT_MANIFOLDS:
    register_manifold(_manifold)

_PAPER_WD = 0.1


def _muon(attention: str, mlp: str, *, attention_wd=None, mlp_wd=None):
    return split_preset(muon_rule(ATTENTION, attention, attention_wd), muon_rule(MLP, mlp, mlp_wd))


EXPERIMENT_PRESETS = {
    # scale control: DGram with column norms, hence sigma_max, capped (hard at 1 or 2, or soft)
    "all-dgram-capped": _muon("dgram-capped", "dgram-capped"),
    "hetero-inv-capped": _muon("dgram-capped", "stiefel"),
    "all-dgram-cap2": _muon("dgram-cap2", "dgram-cap2"),
    "hetero-inv-cap2": _muon("dgram-cap2", "stiefel"),
    "all-dgram-decay": _muon("dgram-decay", "dgram-decay"),
    "hetero-inv-decay": _muon("dgram-decay", "stiefel"),
    # plain DGram with unconstrained Muon's weight decay toward 0: is DGram attention's failure
    # only a missing weight decay?
    "all-dgram-wd": _muon("dgram", "dgram", attention_wd=_PAPER_WD, mlp_wd=_PAPER_WD),
    "hetero-inv-wd": _muon("dgram", "stiefel", attention_wd=_PAPER_WD),
    # hetero with the same decay on its DGram MLP: the fair rival of all-dgram-wd
    "hetero-wd": _muon("stiefel", "dgram", mlp_wd=_PAPER_WD),
    # hetero with a plain Muon MLP: attention's geometry is its only difference from unconstrained
    "hetero-muon": _muon("stiefel", "none"),
    # the converse control: unconstrained Muon without its weight decay
    "unconstrained-no-wd": _muon("none", "none", attention_wd=0.0, mlp_wd=0.0),
}
for _name, _rules in EXPERIMENT_PRESETS.items():
    register_preset(_name, _rules)
