"""The validation split: held out of the clients' pool after the test split, never moving it;
``Task.held_out`` is the split ``data.eval_split`` names."""

from __future__ import annotations

import pytest

from hfedmoe.config import DataConfig, KitConfig, load_config
from hfedmoe.data import PairDataset, load_task
from hfedmoe.errors import ConfigError

N = 643  # the bundled corpus' classification texts (hfedmoe.data.chatterbot)


def test_validation_comes_out_of_the_pool_and_leaves_the_test_split_alone():
    plain = load_task(DataConfig(seed=3))
    task = load_task(DataConfig(seed=3, validation_fraction=0.1))
    assert task.test.texts == plain.test.texts and task.test.labels == plain.test.labels
    # test: round(643 * 0.2) = 129; validation: round(514 * 0.1 / 0.8) = round(64.25) = 64
    assert (len(task.test), len(task.validation), len(task.train)) == (129, 64, 450)
    train, val, test = set(task.train.texts), set(task.validation.texts), set(task.test.texts)
    assert not train & val and not train & test and not val & test
    assert train | val == set(plain.train.texts)
    assert len(train | val | test) == N
    assert len(plain.validation) == 0 and plain.validation.label_names == plain.label_names


def test_validation_is_stratified_over_the_pool():
    plain = load_task(DataConfig(seed=3))
    task = load_task(DataConfig(seed=3, validation_fraction=0.1))
    fraction = 0.1 / 0.8
    pool = plain.train.label_counts()
    for name, n in task.validation.label_counts().items():
        assert abs(n - pool[name] * fraction) < 1, name  # floor or ceil of its share
    assert all(n > 0 for n in task.train.label_counts().values())


def test_validation_is_deterministic_and_follows_the_seed():
    a = load_task(DataConfig(seed=3, validation_fraction=0.1))
    b = load_task(DataConfig(seed=3, validation_fraction=0.1))
    c = load_task(DataConfig(seed=4, validation_fraction=0.1))
    assert a.validation.texts == b.validation.texts and a.train.texts == b.train.texts
    assert a.validation.texts != c.validation.texts


def test_clients_are_partitioned_from_the_training_split_only():
    task = load_task(DataConfig(validation_fraction=0.15, partition="iid"))
    shards = task.client_datasets(4)
    assert sum(len(s) for s in shards) == len(task.train)
    held = set(task.validation.texts) | set(task.test.texts)
    assert not held & {t for s in shards for t in s.texts}


def test_causal_lm_pairs_get_a_validation_split_too():
    task = load_task(DataConfig(task="causal-lm", validation_fraction=0.1))
    assert isinstance(task.validation, PairDataset)
    assert len(task.train) + len(task.validation) + len(task.test) == 897
    assert len(task.validation) == round((897 - len(task.test)) * 0.1 / 0.8)


def test_held_out_is_the_split_eval_split_names():
    plain = load_task(DataConfig())
    assert plain.held_out is plain.test
    both = load_task(DataConfig(validation_fraction=0.1))
    assert both.held_out is both.test
    val = load_task(DataConfig(validation_fraction=0.1, eval_split="validation"))
    assert val.held_out is val.validation and len(val.held_out) == 64


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"validation_fraction": -0.1}, r"data.validation_fraction must be in \[0, 1\), got -0.1"),
    ({"validation_fraction": 1.0}, r"data.validation_fraction must be in \[0, 1\), got 1.0"),
    ({"test_fraction": 0.5, "validation_fraction": 0.5},
     r"data.test_fraction \+ data.validation_fraction must be < 1"),
    ({"test_fraction": 0.3, "validation_fraction": 0.75},
     r"data.test_fraction \+ data.validation_fraction must be < 1"),
    ({"eval_split": "validation"}, r"data.eval_split = 'validation' needs "
                                   r"data.validation_fraction > 0"),
    ({"eval_split": "train"}, r"data.eval_split must be 'test' or 'validation'"),
])
def test_bad_fractions_and_splits_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(**kwargs)


def test_toml_and_overrides_take_the_new_keys(tmp_path):
    path = tmp_path / "kit.toml"
    path.write_text('[data]\nsource = "fortunes"\nvalidation_fraction = 0.1\n'
                    'eval_split = "validation"\n')
    cfg = load_config(KitConfig, path)
    assert (cfg.data.source, cfg.data.validation_fraction, cfg.data.eval_split) == (
        "fortunes", 0.1, "validation")
    cfg = load_config(KitConfig, None, ["data.validation_fraction=0.2",
                                           "data.eval_split=validation"])
    assert (cfg.data.validation_fraction, cfg.data.eval_split) == (0.2, "validation")
    with pytest.raises(ConfigError, match=r"data.eval_split: 'dev' is not one of"):
        load_config(KitConfig, None, ["data.eval_split=dev"])
    with pytest.raises(ConfigError, match="needs data.validation_fraction > 0"):
        load_config(KitConfig, None, ["data.eval_split=validation"])
