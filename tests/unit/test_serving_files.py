"""TF Serving's files: the reference batching config, monitoring config, models.config and traffic weights."""
import pytest

from conveyor_ml.base.errors import ConveyorError
from conveyor_ml.formats import serving_config as config

REFERENCE_BATCHING = """
max_batch_size { value: 128 }
batch_timeout_micros { value: 5000 }
max_enqueued_batches { value: 10 }
num_batch_threads { value: 4 }
allowed_batch_sizes: 32
allowed_batch_sizes: 64
allowed_batch_sizes: 128
"""


def test_reference_batching_config_parses(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(REFERENCE_BATCHING)
    options = config.read_batching_options(path)
    assert options == config.BatchingOptions(128, 5000, 10, 4, (32, 64, 128))


def test_batching_defaults_and_errors(tmp_path):
    path = tmp_path / "b.config"
    path.write_text("max_batch_size { value: 8 }\n")
    assert config.read_batching_options(path).batch_timeout_micros == 0
    path.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n")
    with pytest.raises(ConveyorError, match="must increase and end with max_batch_size"):
        config.read_batching_options(path)
    path.write_text("max_batch_size: 8\n")
    with pytest.raises(ConveyorError, match="not a valid BatchingParameters text proto"):
        config.read_batching_options(path)


def test_batching_text_round_trips(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text(config.batching_parameters_text(128, 5000, 10, 2))
    assert config.read_batching_options(path) == config.BatchingOptions(128, 5000, 10, 2)


def test_monitoring_config(tmp_path):
    path = tmp_path / "monitoring.config"
    path.write_text('prometheus_config { enable: true, path: "/metrics" }')
    assert config.read_prometheus_path(path) == "/metrics"
    path.write_text(config.monitoring_config_text())
    assert config.read_prometheus_path(path) == "/monitoring/prometheus/metrics"
    path.write_text("prometheus_config { enable: false }")
    assert config.read_prometheus_path(path) is None


def test_model_server_config_round_trip_and_checks(tmp_path):
    path = tmp_path / "models.config"
    original = config.single_model_config("mnist", "/models/mnist")
    config.write_model_server_config(path, original)
    assert config.read_model_server_config(path) == original
    assert not list(tmp_path.glob(".models.config.*")), "temporary file left behind"
    path.write_text('model_config_list { config { name: "a" base_path: "/x" } config { name: "a" base_path: "/y" } }')
    with pytest.raises(ConveyorError, match="configured twice"):
        config.read_model_server_config(path)
    path.write_text("model_config_list { config { name: ")
    with pytest.raises(ConveyorError, match="not a valid ModelServerConfig"):
        config.read_model_server_config(path)


def test_traffic_file(tmp_path):
    path = tmp_path / "traffic.json"
    assert config.read_traffic(path).models == {}
    config.write_traffic(path, config.TrafficWeights({"mnist": {"stable": 90, "canary": 10}}))
    assert config.read_traffic(path).for_model("mnist") == {"stable": 90, "canary": 10}
    path.write_text('{"models": {"mnist": {"stable": -1}}}')
    with pytest.raises(ConveyorError, match="non-negative integers"):
        config.read_traffic(path)
