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


@pytest.mark.parametrize(("field", "value", "named"), [
    ("url", "mysql://db/run", "store.url"),
    ("url", "/var/run/run.db", "store.url"),
    ("schema", "Run-1", "store.schema"),
    ("connect_timeout_s", 0.0, "store.connect_timeout_s"),
])
def test_a_bad_store_section_names_its_field(field, value, named):
    from server.config import StoreConfig

    with pytest.raises(ConfigError, match=named):
        StoreConfig(**{field: value})


def test_the_store_schema_defaults_to_the_run_and_passwords_stay_out_of_logs():
    from server.config import StoreConfig, redact_url

    assert StoreConfig().schema_for("Field-Trial.2") == "hfedmoe_field_trial_2"
    assert StoreConfig(schema="mine").schema_for("x") == "mine"
    assert redact_url("postgresql://kit:s3cret@db:5432/fleet") == \
        "postgresql://kit:***@db:5432/fleet"
    assert redact_url("postgresql://kit@db/fleet") == "postgresql://kit@db/fleet"


@pytest.mark.parametrize("store", [{}, {"url": "postgresql://db/fleet"},
                                   {"spool_dir": "/mnt/spool"}])
def test_a_worker_in_its_own_directory_needs_the_shared_database_and_spool(tmp_path, store):
    from server.config import StoreConfig
    from server.ingest import IngestWorker

    cfg = ServerConfig(run_dir=str(tmp_path / "run"), store=StoreConfig(**store))
    with pytest.raises(ConfigError, match="store.url .* and store.spool_dir"):
        IngestWorker(cfg, None, None, "w0", work_dir=tmp_path / "host")
    assert not (tmp_path / "host").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("spawn", [True, False])
def test_ingest_workers_on_mqtt_3_1_1_is_refused_naming_both_settings(tmp_path, capsys, spawn):
    """Workers share the updates through an MQTT 5 shared subscription; on 3.1.1 nobody would
    take the single-message updates, so the server refuses to start instead."""
    from hfedmoe.cli import main
    from hfedmoe.errors import ConfigError as Refused

    path = tmp_path / "server.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[transport]\nurl = "mqtt://127.0.0.1:1"\n'
                    f'protocol = "3.1.1"\n[ingest]\nworkers = 2\n'
                    f"spawn = {str(spawn).lower()}\n")

    code = main(["server", "--config", str(path)])

    err = capsys.readouterr().err
    assert code == Refused("").exit_code != 0
    assert "ingest.workers = 2" in err and 'transport.protocol is "3.1.1"' in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"ingest\.workers .*transport\.protocol"):
        load_config(ServerConfig, path, ["transport.protocol=3.1.1"])
    assert load_config(ServerConfig, path, ['transport.protocol="5"']).ingest.workers == 2
    assert load_config(ServerConfig, path, ["ingest.workers=0"]).ingest.workers == 0


def test_the_ingestion_mode_says_who_takes_the_updates():
    from hfedmoe.transport.config import TransportConfig
    from server.config import IngestConfig, ingestion_mode

    plain = ingestion_mode(ServerConfig(run_id="r"))
    assert plain == {"mode": "coordinator", "workers": 0, "protocol": "3.1.1",
                     "text": "ingestion: coordinator only (transport.protocol 3.1.1: no shared "
                             "subscriptions)"}
    v5 = TransportConfig(protocol="5")
    assert ingestion_mode(ServerConfig(run_id="r", transport=v5))["text"] == \
        "ingestion: coordinator only (transport.protocol 5: ingest.workers = 0)"
    sharded = ingestion_mode(ServerConfig(run_id="r", transport=v5,
                                          ingest=IngestConfig(workers=3, group="g")))
    assert (sharded["mode"], sharded["workers"], sharded["protocol"]) == ("workers", 3, "5")
    assert sharded["text"].startswith(
        "ingestion: 3 workers on $share/g/hfedmoe/v1/r/update/+/+/whole (MQTT 5)")
    elsewhere = ingestion_mode(ServerConfig(run_id="r", transport=v5,
                                            ingest=IngestConfig(workers=1, spawn=False)))
    assert "ingest.spawn = false" in elsewhere["text"]
