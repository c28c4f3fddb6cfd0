"""The one config object: defaults, file, environment and flags, with precedence and validation."""
from __future__ import annotations

import argparse

import pytest

from twostage.server.config import Config, add_arguments


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_precedence_flag_over_env_over_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('port = 6000\nrerank_max_batch_size = 8\n[index]\ndtype = "f16"\n[embed]\nmax_delay_ms = 7.5\n')
    env = {"TWOSTAGE_PORT": "7000", "TWOSTAGE_BATCHING": "off", "TWOSTAGE_READ_API_KEYS": "a, b"}
    cfg = Config.from_sources(parse(["--config", str(f), "--port", "8000"]), env=env)
    assert cfg.port == 8000                       # flag beats env and file
    assert cfg.batching is False                  # env
    assert cfg.read_api_keys == ["a", "b"]
    assert cfg.rerank_max_batch_size == 8         # file, flat key
    assert cfg.index_dtype == "f16"               # file, section
    assert cfg.embed_max_delay_ms == 7.5
    assert cfg.max_top_k == Config().max_top_k    # default


def test_bad_values_are_refused_with_the_key_named(tmp_path):
    with pytest.raises(ValueError, match="index_dtype"):
        Config.from_sources(parse([]), env={"TWOSTAGE_INDEX_DTYPE": "f64"})
    with pytest.raises(ValueError, match="rerank_max_batch_size"):
        Config.from_sources(parse(["--rerank-max-batch-size", "0"]), env={})
    with pytest.raises(ValueError, match="port"):
        Config.from_sources(parse([]), env={"TWOSTAGE_PORT": "many"})
    f = tmp_path / "c.json"
    f.write_text('{"no_such_knob": 1}')
    with pytest.raises(ValueError, match="no_such_knob"):
        Config.from_sources(parse(["--config", str(f)]), env={})
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        Config.from_sources(parse(["--tls-cert", "x.pem"]), env={})


def test_help_documents_every_default():
    p = argparse.ArgumentParser()
    add_arguments(p)
    text = " ".join(p.format_help().split())
    assert "default: 50051" in text and "TWOSTAGE_RERANK_MAX_DELAY_MS" in text


def test_api_keys_are_redacted_when_logged():
    cfg = Config(read_api_keys=["secret-read"], write_api_keys=["secret-write"])
    assert "secret" not in repr(cfg.as_dict())
