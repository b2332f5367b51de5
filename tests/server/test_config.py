"""The server's config: round settings that make no sense are a ConfigError at load."""

from __future__ import annotations

import pytest

from hfedmoe.config import load_config
from hfedmoe.errors import ConfigError
from server.config import ServerConfig


@pytest.mark.parametrize(("override", "match"), [
    ("rounds.seed=-1", r"rounds.seed must be >= 0, got -1"),
    ("rounds.fraction=0", r"rounds.fraction \(the share of online devices chosen each round\) "
                          r"must be in \(0, 1\], got 0"),
    ("rounds.fraction=1.5", r"rounds.fraction .* must be in \(0, 1\], got 1.5"),
    ("rounds.fraction=-0.2", r"rounds.fraction .* got -0.2"),
    ("rounds.over_select=-1", r"rounds.over_select must be >= 0, got -1"),
])
def test_a_round_setting_that_makes_no_sense_is_a_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ServerConfig, None, [override])


def test_the_edges_that_make_sense_load():
    cfg = load_config(ServerConfig, None, ["rounds.fraction=1", "rounds.seed=0"])
    assert (cfg.rounds.fraction, cfg.rounds.seed) == (1.0, 0)
