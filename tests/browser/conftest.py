"""Browser tests use the real broker the integration fixtures start."""
from tests.integration.conftest import broker_settings, kafka_bootstrap, unique_name  # noqa: F401
