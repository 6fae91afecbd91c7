"""Unit tests of clickhouse_etl.core.settings (environment handled with monkeypatch; nothing is connected).

What a pipeline does (topic, dedup TTL, filters, policies) is its file's: see test_pipeline_files.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clickhouse_etl.core.settings import CONNECTION_VARIABLES, ENV_PREFIX, Settings, SettingsError, load_settings
from clickhouse_etl.dev.demo_data import EventShares


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No CLICKHOUSE_ETL_* or connection variable of the caller leaks in; data_dir resolves under tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX) or name.upper() in CONNECTION_VARIABLES.values():
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults(clean_environment):
    settings = load_settings()
    assert isinstance(settings, Settings)
    assert settings.pipelines == "ad_clicks"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert settings.postgres_dsn.startswith("postgresql://")
    assert settings.start_position == "earliest"
    assert settings.max_records_per_run == 1_000_000
    data_dir = (Path(clean_environment) / ".data").resolve()
    assert settings.data_dir == data_dir
    assert settings.clickhouse_dsn == f"chdb://{data_dir / 'clickhouse'}"
    assert settings.clickhouse_is_embedded
    assert settings.chdb_path == data_dir / "clickhouse"
    assert settings.dagster_home == str(data_dir / "dagster")


def test_data_dir_override_moves_the_derived_paths(tmp_path):
    settings = load_settings(data_dir=tmp_path / "elsewhere")
    assert settings.clickhouse_dsn == f"chdb://{(tmp_path / 'elsewhere').resolve() / 'clickhouse'}"
    assert settings.dagster_home == str((tmp_path / "elsewhere").resolve() / "dagster")


def test_explicit_clickhouse_dsn_is_kept(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_DSN", "http://clickhouse.example:8123")
    settings = load_settings()
    assert settings.clickhouse_dsn == "http://clickhouse.example:8123"
    assert not settings.clickhouse_is_embedded


def test_prefixed_variables_are_read(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_ETL_PIPELINES", "ad_clicks,api_usage")
    monkeypatch.setenv("CLICKHOUSE_ETL_MAX_BATCH_WAIT_SECONDS", "0.5")
    monkeypatch.setenv("CLICKHOUSE_ETL_CATCH_UP_WORKERS", "3")
    settings = load_settings()
    assert settings.pipelines == "ad_clicks,api_usage"
    assert settings.max_batch_wait_seconds == 0.5
    assert settings.catch_up_workers == 3


def test_connection_variables_are_read_without_prefix(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://cache.example:6380/2")
    monkeypatch.setenv("POSTGRES_DSN", "postgresql://etl@db.example:5432/ads")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k1:9092,k2:9093")
    monkeypatch.setenv("DAGSTER_HOME", "/srv/dagster")
    settings = load_settings()
    assert settings.redis_url == "redis://cache.example:6380/2"
    assert settings.postgres_dsn == "postgresql://etl@db.example:5432/ads"
    assert settings.kafka_bootstrap_servers == "k1:9092,k2:9093"
    assert settings.dagster_home == "/srv/dagster"


def test_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_ETL_PIPELINES", "from_env.yaml")
    assert load_settings(pipelines="from_override.yaml").pipelines == "from_override.yaml"


def test_kafka_config_from_json(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_ETL_KAFKA_CONFIG", '{"security.protocol": "SASL_SSL"}')
    assert load_settings().kafka_config == {"security.protocol": "SASL_SSL"}


INVALID = [
    pytest.param("redis_url", "http://x", "REDIS_URL", "http://x", id="redis-url"),
    pytest.param("postgres_dsn", "mysql://x", "POSTGRES_DSN", "mysql://x", id="postgres-dsn"),
    pytest.param("clickhouse_dsn", "ftp://x", "CLICKHOUSE_DSN", "ftp://x", id="clickhouse-dsn"),
    pytest.param("kafka_bootstrap_servers", "nohost", "KAFKA_BOOTSTRAP_SERVERS", "nohost", id="bootstrap"),
    pytest.param("log_format", "xml", "CLICKHOUSE_ETL_LOG_FORMAT", "xml", id="log-format"),
    pytest.param(
        "clickhouse_database",
        "x; drop",
        "CLICKHOUSE_ETL_CLICKHOUSE_DATABASE",
        "x; drop",
        id="database",
    ),
    pytest.param("start_position", "middle", "CLICKHOUSE_ETL_START_POSITION", "middle", id="start-position"),
    pytest.param("max_records_per_run", 0, "CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN", "0", id="max-records"),
]


@pytest.mark.parametrize(("field", "value", "variable", "text"), INVALID)
def test_invalid_override_names_setting_and_variable(field, value, variable, text):
    with pytest.raises(SettingsError) as raised:
        load_settings(**{field: value})
    message = str(raised.value)
    assert f"setting {field} ({variable})" in message


@pytest.mark.parametrize(("field", "value", "variable", "text"), INVALID)
def test_invalid_environment_names_setting_and_variable(monkeypatch, field, value, variable, text):
    monkeypatch.setenv(variable, text)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert f"setting {field} ({variable})" in message


def test_several_problems_are_all_reported(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "http://x")
    monkeypatch.setenv("CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN", "0")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "REDIS_URL" in str(raised.value)
    assert "CLICKHOUSE_ETL_MAX_RECORDS_PER_RUN" in str(raised.value)


def test_settings_error_is_a_value_error():
    assert issubclass(SettingsError, ValueError)


def test_malformed_json_object_is_a_settings_error(monkeypatch):
    monkeypatch.setenv("CLICKHOUSE_ETL_KAFKA_CONFIG", "{bad")
    with pytest.raises(SettingsError, match="CLICKHOUSE_ETL_KAFKA_CONFIG"):
        load_settings()


# --------------------------------------------------------------------------------------------------------
# EventShares
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["duplicate", "duplicate_other_partition", "bot", "unknown_ad", "malformed", "late", "ipv6", "numeric_string"],
)
@pytest.mark.parametrize("value", [-0.01, 1.01, -1.0, 2.0])
def test_event_shares_reject_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        EventShares(**{field: value})


@pytest.mark.parametrize("value", [0.0, 1.0, 0.5])
def test_event_shares_accept_the_bounds(value):
    shares = EventShares(bot=value, extra_field=value)
    assert shares.bot == value
    assert shares.extra_field == value


def test_event_shares_reject_duplicate_plus_malformed_above_one():
    with pytest.raises(ValueError, match="exceed 1"):
        EventShares(duplicate=0.7, malformed=0.4)


def test_run_workers_use_redis_databases_of_their_own(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:secret@cache.example.com:6380/0")
    settings = load_settings()
    assert settings.celery_broker_url == "redis://:secret@cache.example.com:6380/1"
    assert settings.celery_backend_url == "redis://:secret@cache.example.com:6380/2"


def test_run_workers_over_tls_name_the_certificate_check_celery_requires(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "rediss://cache.example.com:6380/0")
    settings = load_settings()
    assert settings.celery_broker_url == "rediss://cache.example.com:6380/1?ssl_cert_reqs=required"
    assert settings.celery_backend_url == "rediss://cache.example.com:6380/2?ssl_cert_reqs=required"
    explicit = load_settings(celery_broker_url="rediss://broker.example.com/3?ssl_cert_reqs=none")
    assert explicit.celery_broker_url == "rediss://broker.example.com/3?ssl_cert_reqs=none"


def test_a_redis_cluster_url_needs_both_celery_urls(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis+cluster://10.0.0.1:7000,10.0.0.2:7000")
    with pytest.raises(SettingsError) as error:
        load_settings()
    message = str(error.value)
    assert "CLICKHOUSE_ETL_CELERY_BROKER_URL" in message and "CLICKHOUSE_ETL_CELERY_BACKEND_URL" in message
    assert "Redis Cluster" in message
    monkeypatch.setenv("CLICKHOUSE_ETL_CELERY_BROKER_URL", "redis://broker.example:6379/1")
    with pytest.raises(SettingsError, match="CLICKHOUSE_ETL_CELERY_BACKEND_URL") as error:
        load_settings()
    assert "CLICKHOUSE_ETL_CELERY_BROKER_URL" not in str(error.value)
    monkeypatch.setenv("CLICKHOUSE_ETL_CELERY_BACKEND_URL", "redis://broker.example:6379/2")
    settings = load_settings()
    assert settings.redis_url == "redis+cluster://10.0.0.1:7000,10.0.0.2:7000"
    assert settings.celery_broker_url == "redis://broker.example:6379/1"


@pytest.mark.parametrize(
    "url", ["redis+cluster://h1:7000", "rediss+cluster://user:pw@h1:7000,h2:7001/0", "redis+cluster://[::1]:7000"]
)
def test_redis_cluster_urls_are_accepted(url):
    celery = {"celery_broker_url": "redis://b:6379/1", "celery_backend_url": "redis://b:6379/2"}
    assert load_settings(redis_url=url, **celery).redis_url == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h1", "is not host:port"),
        ("redis+cluster://h1:7000,h2", "is not host:port"),
        ("redis+cluster://h1:7000/3", "only database 0"),
        ("memcached://h1:11211", "redis+cluster://"),
    ],
)
def test_bad_redis_urls_name_the_variable(url, problem):
    celery = {"celery_broker_url": "redis://b:6379/1", "celery_backend_url": "redis://b:6379/2"}
    with pytest.raises(SettingsError, match="REDIS_URL") as error:
        load_settings(redis_url=url, **celery)
    assert problem in str(error.value)


def test_claims_wait(monkeypatch):
    assert load_settings().claims_wait_seconds == 30
    monkeypatch.setenv("CLICKHOUSE_ETL_CLAIMS_WAIT_SECONDS", "0")
    assert load_settings().claims_wait_seconds == 0  # fail at the first refused connection, as a step retry
    monkeypatch.setenv("CLICKHOUSE_ETL_CLAIMS_WAIT_SECONDS", "-1")
    with pytest.raises(SettingsError, match="CLICKHOUSE_ETL_CLAIMS_WAIT_SECONDS"):
        load_settings()
