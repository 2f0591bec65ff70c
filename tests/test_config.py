"""imagemanager.json as sites write it today."""

import json

import pytest

from imagegw.config import ConfigError, load_config, parse_config

SITE_FILE = {
    "WorkerThreads": 8,
    "DefaultImageLocation": "index.docker.io",
    "DefaultImageFormat": "squashfs",
    "PullUpdateTimeout": 300,
    "ImageExpirationTimeout": "90:00:00:00",
    "MongoDBURI": "mongodb://localhost/",
    "MongoDB": "Shifter",
    "CacheDirectory": "/images/cache/",
    "ExpandDirectory": "/images/expand/",
    "Locations": {
        "index.docker.io": {"remotetype": "dockerv2", "authentication": "http"},
        "myreg": {
            "remotetype": "dockerv2",
            "url": "myreg.example.org:5000",
            "sslcacert": "/etc/ssl/site-ca.pem",
        },
    },
    "ConverterOptions": {"squashfs": "-comp xz"},
    "Platforms": {
        "mycluster": {
            "mungeSocketPath": "/var/run/munge/munge.socket.2",
            "accesstype": "local",
            "admins": ["root"],
            "local": {"imageDir": "/images"},
        }
    },
}


def test_site_file_loads_as_is(tmp_path, monkeypatch):
    path = tmp_path / "imagemanager.json"
    path.write_text(json.dumps(SITE_FILE))
    monkeypatch.setenv("GWCONFIG", str(path))
    cfg = load_config()
    assert str(cfg.cache_dir) == "/images/cache"
    assert cfg.converter_options == {"squashfs": ["-comp", "xz"]}
    assert cfg.location("myreg").url == "https://myreg.example.org:5000"
    assert cfg.location("myreg").sslcacert == "/etc/ssl/site-ca.pem"
    assert cfg.location("index.docker.io").url == "https://registry-1.docker.io"
    assert cfg.location("127.0.0.1:5000").url == "http://127.0.0.1:5000"
    assert cfg.location("quay.io").url == "https://quay.io"
    assert cfg.platform == "linux/amd64"


@pytest.mark.parametrize("key", ["CacheDirectory", "ExpandDirectory"])
def test_missing_required_key_is_named(key):
    data = dict(SITE_FILE)
    del data[key]
    with pytest.raises(ConfigError, match=key):
        parse_config(data)


def test_unreadable_and_invalid_files_say_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_converter_options_list_form():
    data = dict(SITE_FILE, ConverterOptions={"squashfs": ["-comp", "zstd"]})
    assert parse_config(data).converter_options["squashfs"] == ["-comp", "zstd"]
    with pytest.raises(ConfigError, match="ConverterOptions"):
        parse_config(dict(SITE_FILE, ConverterOptions={"squashfs": 5}))
