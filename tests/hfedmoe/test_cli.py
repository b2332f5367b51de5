"""The ``hfedmoe`` command."""

import json

from hfedmoe.cli import main


def test_models_lists_every_family(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("minilm-moe", "qwen2-moe-tiny", "qwen3-moe-tiny", "olmoe-tiny", "mixtral-tiny",
                 "switch-tiny", "deepseek-v3-tiny"):
        assert name in out


def test_models_inspect_json(capsys):
    assert main(["models", "inspect", "olmoe-tiny", "--task", "causal-lm", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["moe_layers"] == 2 and info["experts_per_layer"] == [4, 4]
    assert info["top_k"] == [2, 2] and info["total_params"] > info["active_params_per_token"]


def test_unknown_model_is_a_typed_error_with_exit_code(capsys):
    assert main(["models", "inspect", "no-such-model"]) == 3
    assert "ModelError" in capsys.readouterr().err

