"""lab.attacks: a poisoning device's update, as the simulator applies it before encoding."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.errors import ConfigError
from hfedmoe.names import ExpertId, expert_key, gate_key
from hfedmoe.update import SparseUpdate
from lab.attacks import Attack, parse_attack

E = ExpertId(0, 1)


def _update() -> SparseUpdate:
    deltas = {expert_key(0, 1, "w_in"): torch.tensor([1.0, -2.0]),
              gate_key(0, "weight"): torch.tensor([0.5])}
    return SparseUpdate("run", 0, "d", 7, deltas, usage={E: 0.5}, updated=frozenset({E}))


@pytest.mark.parametrize(("spec", "multiplier"), [("scale:10", 10.0), ("sign-flip:10", -10.0),
                                                  ("sign-flip", -1.0)])
def test_an_attack_multiplies_every_delta_and_nothing_else(spec, multiplier):
    attack = parse_attack(spec, [3])
    up = _update()

    poisoned = attack.apply(up)

    for key, delta in up.deltas.items():
        torch.testing.assert_close(poisoned.deltas[key], multiplier * delta)
    assert (poisoned.num_examples, poisoned.updated, poisoned.usage) == (7, up.updated, up.usage)
    assert attack.hits(3) and not attack.hits(0)


@pytest.mark.parametrize("spec", ["boost:10", "scale:x", "scale:0", "scale:-3", "scale:inf"])
def test_a_bad_attack_is_refused(spec):
    with pytest.raises(ConfigError):
        parse_attack(spec, [0])


def test_an_attack_needs_devices():
    with pytest.raises(ConfigError):
        Attack("scale", 10.0, frozenset())
