"""Typed config: validation on construction, TOML loading, unknown keys, --set overrides."""

import pytest

from hfedmoe.config import KitConfig, MethodConfig, ModelConfig, load_config, parse_override
from hfedmoe.errors import ConfigError, HFedMoEError


def test_defaults_are_the_papers_where_measured_otherwise_documented():
    m = MethodConfig()
    # lam, tau and the key are the paper's; beta was changed with the evidence in
    # docs/results.md (the paper's 0.1 leaves IB inert on the default model); the specificity
    # term is the kit's, chosen on the validation sweep (docs/method.md, "Defaults")
    assert (m.lam, m.beta, m.tau, m.selection_key) == (0.5, 3.0, 0.01, "ib")
    assert (m.specificity, m.gate_weighting) == (1.0, "importance")
    assert m.layer_scale == "standardized" and ModelConfig().upcycle == "moefy"
    # learning rates from the sweep in docs/results.md (benchmarks/lr_sweep.py)
    t = KitConfig().train
    assert (t.batch_size, t.lr, t.head_lr) == (8, 1e-3, 3e-2)


def test_toml_with_overrides(tmp_path):
    path = tmp_path / "kit.toml"
    path.write_text('[method]\nbeta = 0.2\nselection_key = "importance"\n[model]\ntop_k = 1\n')
    cfg = load_config(KitConfig, path, ["method.tau=0.125", 'model.name="qwen3-moe-tiny"',
                                        "train.optimizer=sgd"])
    assert cfg.method.beta == 0.2 and cfg.method.selection_key == "importance"
    assert cfg.method.tau == 0.125 and cfg.model.top_k == 1
    assert cfg.model.name == "qwen3-moe-tiny" and cfg.train.optimizer == "sgd"


def test_executorch_capacity_factor_is_unset_by_default_and_read_as_a_float(tmp_path):
    assert KitConfig().train.executorch_capacity_factor is None  # dense, exact
    path = tmp_path / "kit.toml"
    path.write_text("[train]\nexecutorch_capacity_factor = 1.25\n")
    assert load_config(KitConfig, path).train.executorch_capacity_factor == 1.25
    cfg = load_config(KitConfig, None, ["train.executorch_capacity_factor=2"])
    assert cfg.train.executorch_capacity_factor == 2.0
    assert isinstance(cfg.train.executorch_capacity_factor, float)


@pytest.mark.parametrize("text,match", [
    ("[method]\nbetaa = 1\n", r"unknown config key\(s\) in \[method\]: betaa"),
    ("[nope]\nx = 1\n", r"unknown config key\(s\): nope"),
    ("[method]\nlam = 1.5\n", r"method.lam must be in \[0, 1\]"),
    ("[method]\nselection_key = 'x'\n", r"method.selection_key: 'x' is not one of"),
    ("[train]\nbatch_size = 'eight'\n", r"train.batch_size: expected an integer"),
    ("[train]\ndetach_frozen = 1\n", r"train.detach_frozen: expected true/false"),
    ("[model]\ntop_k = 9\n", r"model.top_k must be in \[1, num_experts=8\]"),
    ("[method]\ndp_noise_multiplier = 1.0\n", r"needs method.dp_clip > 0"),
    ("[train]\nexecutorch_capacity_factor = 0\n",
     r"train.executorch_capacity_factor must be a number > 0"),
    ("[train]\nexecutorch_capacity_factor = -inf\n",
     r"train.executorch_capacity_factor must be a number > 0"),
    ("[train]\nexecutorch_capacity_factor = inf\n",
     r"train.executorch_capacity_factor must be a number > 0"),
    ("[train]\nexecutorch_capacity_factor = 'big'\n",
     r"train.executorch_capacity_factor: expected a number"),
    ("[method\n", r"invalid TOML"),
    ("[model]\nseed = -1\n", r"model.seed must be >= 0, got -1"),
    ("[data]\nseed = -3\n", r"data.seed must be >= 0, got -3"),
    ("[method]\nseed = -2\n", r"method.seed must be >= 0, got -2"),
])
def test_bad_config_is_a_clear_typed_error(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(KitConfig, path)


def test_override_parsing_and_errors():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=hello") == (["a", "b"], "hello")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="not found"):
        load_config(KitConfig, "/nonexistent/kit.toml")


def test_frozen_and_in_the_tree():
    cfg = ModelConfig()
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # type: ignore[misc]
    assert issubclass(ConfigError, HFedMoEError)
