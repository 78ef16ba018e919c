"""Settings come from flags and CAPTION_* variables, flags first, and fail by name."""

import argparse

import pytest

from worker.settings import SettingsError, add_settings_arguments, load_settings


def parse_flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return parser.parse_args(list(argv))


def test_flag_wins_over_variable(monkeypatch):
    monkeypatch.setenv("CAPTION_INPUT_TOPIC", "from-variable")

    settings = load_settings(parse_flags("--input-topic", "from-flag"))

    assert settings.input_topic == "from-flag"


def test_variable_used_without_flag(monkeypatch):
    monkeypatch.setenv("CAPTION_MAX_NEW_TOKENS", "7")

    settings = load_settings(parse_flags())

    assert settings.max_new_tokens == 7


def test_list_variables_accept_commas_and_json(monkeypatch):
    monkeypatch.setenv("CAPTION_S3_ALLOWED_BUCKETS", "photos, uploads")
    monkeypatch.setenv("CAPTION_STOP_STRINGS", '["a,b"]')

    settings = load_settings(parse_flags())

    assert settings.s3_allowed_buckets == ["photos", "uploads"]
    assert settings.stop_strings == ["a,b"]


def test_kafka_options_repeat_as_flags():
    settings = load_settings(
        parse_flags("--kafka-option", "security.protocol=SSL", "--kafka-option", "linger.ms=5")
    )

    assert settings.kafka_option == {"security.protocol": "SSL", "linger.ms": "5"}
    assert settings.kafka_common_config()["linger.ms"] == "5"


def test_kafka_option_variable_takes_json_object(monkeypatch):
    monkeypatch.setenv("CAPTION_KAFKA_OPTION", '{"sasl.mechanism": "PLAIN"}')

    settings = load_settings(parse_flags())

    assert settings.kafka_option == {"sasl.mechanism": "PLAIN"}


def test_invalid_setting_error_names_flag_and_variable():
    with pytest.raises(SettingsError) as caught:
        load_settings(parse_flags("--max-new-tokens", "many"))

    assert "--max-new-tokens" in str(caught.value)
    assert "CAPTION_MAX_NEW_TOKENS" in str(caught.value)


def test_kafka_option_without_equals_sign_is_invalid():
    with pytest.raises(SettingsError) as caught:
        load_settings(parse_flags("--kafka-option", "linger.ms"))

    assert "--kafka-option" in str(caught.value)


def test_missing_model_directory_is_invalid(tmp_path):
    with pytest.raises(SettingsError) as caught:
        load_settings(parse_flags("--model", str(tmp_path / "absent")))

    assert "--model" in str(caught.value)
    assert "not found" in str(caught.value)


def test_summary_masks_secrets():
    settings = load_settings(
        parse_flags(
            "--kafka-sasl-password", "hunter2",
            "--kafka-option", "ssl.key.password=swordfish",
        )
    )

    summary = settings.summary()

    assert "hunter2" not in summary
    assert "swordfish" not in summary
    assert "kafka_sasl_password=***" in summary


def test_settings_are_frozen():
    settings = load_settings(parse_flags())

    with pytest.raises(Exception):
        settings.input_topic = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--input-topic", "loop", "--dlq-topic", "loop"), "--input-topic"),
        (("--input-topic", "loop", "--output-topic", "loop"), "--input-topic"),
        (("--input-topic", "bad topic!"), "--input-topic"),
        (("--bootstrap-servers", "not a host"), "--bootstrap-servers"),
        (("--s3-endpoint-url", "ftp://store"), "--s3-endpoint-url"),
        (("--allowed-schemes", "http"), "--allowed-schemes"),
        (("--min-image-side", "100", "--max-image-side", "10"), "--min-image-side"),
    ],
)
def test_inconsistent_settings_are_invalid(flags, named):
    with pytest.raises(SettingsError) as caught:
        load_settings(parse_flags(*flags))

    assert named in str(caught.value)


def test_misspelt_variable_is_invalid(monkeypatch):
    monkeypatch.setenv("CAPTION_MAX_IN_FLGHT", "3")

    with pytest.raises(SettingsError) as caught:
        load_settings(parse_flags())

    assert "CAPTION_MAX_IN_FLGHT" in str(caught.value)


def test_summary_masks_endpoint_credentials_and_oauth_config():
    settings = load_settings(
        parse_flags(
            "--s3-endpoint-url", "http://user:UrlPassw0rd@127.0.0.1:9000",
            "--kafka-option", "sasl.oauthbearer.config=clientSecret=OauthCfgSecret",
        )
    )

    summary = settings.summary()

    assert "UrlPassw0rd" not in summary
    assert "OauthCfgSecret" not in summary
    assert "127.0.0.1:9000" in summary
