"""imagemanager.json as sites write it today."""

import json
import logging
from pathlib import Path

import pytest

from imagegw.config import ConfigError, check_config, load_config, parse_config, parse_size

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


# -- every key, typed, with defaults; every problem at once -----------------------------

# Shifter's own example file, as sites copied it (a remote platform, LogLevel lower case,
# the "authentication" spelling under Locations): loads with no error and no warning.
SHIFTER_EXAMPLE = {
    "WorkerThreads": 2,
    "LogLevel": "info",
    "DefaultImageLocation": "index.docker.io",
    "DefaultImageFormat": "squashfs",
    "PullUpdateTimeout": 300,
    "ImageExpirationTimeout": "90:00:00:00",
    "MongoDBURI": "mongodb://localhost/",
    "MongoDB": "Shifter",
    "CacheDirectory": "/images/cache/",
    "ExpandDirectory": "/images/expand/",
    "Metrics": True,
    "ImportUsers": "None",
    "Locations": {"index.docker.io": {"remotetype": "dockerv2", "authentication": "http"}},
    "Platforms": {
        "mycluster": {
            "mungeSocketPath": "/var/run/munge/munge.socket.2",
            "accesstype": "local",
            "admins": ["root"],
            "local": {"imageDir": "/images"},
        },
        "mycluster2": {
            "mungeSocketPath": "/var/run/munge/munge.socket.2",
            "accesstype": "remote",
            "admins": ["root"],
            "host": ["mycluster2.example.org"],
            "ssh": {
                "username": "root",
                "key": "/etc/shifter/ssh/mycluster2.key",
                "imageDir": "/images",
            },
        },
    },
}


def test_shifter_example_loads_typed_without_warnings():
    cfg, errors, warnings = check_config(SHIFTER_EXAMPLE, gateway=True)
    assert errors == [] and warnings == []
    assert cfg.log_level == logging.INFO
    assert cfg.worker_threads == 2 and cfg.metrics is True and cfg.import_users is None
    assert cfg.mongo_uri == "mongodb://localhost/" and cfg.mongo_db == "Shifter"
    assert cfg.image_expiration == 90 * 86400
    remote = cfg.platforms["mycluster2"]
    assert (remote.accesstype, remote.hosts, remote.image_dir) == (
        "remote",
        ("mycluster2.example.org",),
        "/images",
    )
    assert cfg.platforms["mycluster"].admins == ("root",)


def test_defaults_of_a_minimal_file():
    cfg = parse_config(
        {
            "CacheDirectory": "/c",
            "ExpandDirectory": "/e",
            "Platforms": {"s": {"mungeSocketPath": "/m", "local": {"imageDir": "/i"}}},
        },
        gateway=True,
    )
    assert cfg.worker_threads == 1
    assert cfg.log_level == logging.INFO
    assert cfg.pull_update_timeout == 300 and cfg.pull_heartbeat_timeout == 3600
    assert cfg.image_expiration == 90 * 86400
    assert cfg.mongo_uri is None and str(cfg.state_dir) == "/var/lib/shifter"
    assert cfg.metrics is False and cfg.metrics_retention == 1_000_000
    assert cfg.authentication == "munge" and cfg.import_users is None
    assert cfg.access_log is None
    assert cfg.layer_cache_max_size is None and cfg.layer_cache_max_age is None
    assert cfg.platforms["s"].accesstype == "local"


@pytest.mark.parametrize(
    "text, level",
    [
        ("DEBUG", logging.DEBUG),
        ("info", logging.INFO),
        ("WARNING", logging.WARNING),
        ("warn", logging.WARNING),
        ("ERROR", logging.ERROR),
        ("CRITICAL", logging.CRITICAL),
    ],
)
def test_log_level_values_as_shifter(text, level):
    assert parse_config(dict(SITE_FILE, LogLevel=text)).log_level == level


def test_every_problem_is_reported_at_once():
    data = dict(SITE_FILE, LogLevel="LOUD", WorkerThreads="many", ImageExpirationTimeout="soon")
    del data["CacheDirectory"]
    data["Platforms"] = {"tape": {"accesstype": "tape", "mungeSocketPath": "/m"}}
    data["LayerCacheMaxSize"] = "lots"
    with pytest.raises(ConfigError) as info:
        parse_config(data, gateway=True)
    message = str(info.value)
    for words in (
        "CacheDirectory is missing",
        "LogLevel must be one of",
        "WorkerThreads must be a number",
        "ImageExpirationTimeout must be D:H:M:S",
        "Platforms.tape: accesstype must be local or remote, not 'tape'",
        "LayerCacheMaxSize must be bytes",
    ):
        assert words in message, message
    assert len(message.splitlines()) == 6


def test_unknown_keys_warn_with_the_nearest_known_key():
    data = json.loads(json.dumps(SITE_FILE))
    data["PullUpdateTimout"] = 600  # a typo
    data["Platforms"]["mycluster"]["mungeSocketPth"] = "/m"
    data["Platforms"]["mycluster"]["local"]["imagedir"] = "/x"
    data["SomethingElse"] = 1
    cfg, errors, warnings = check_config(data, gateway=True)
    assert errors == [] and cfg is not None
    assert cfg.pull_update_timeout == 300  # the misspelt key is not taken
    assert "unknown key PullUpdateTimout; did you mean PullUpdateTimeout?" in warnings[0]
    joined = "\n".join(warnings)
    assert "Platforms.mycluster.mungeSocketPth; did you mean mungeSocketPath?" in joined
    assert "Platforms.mycluster.local.imagedir; did you mean imageDir?" in joined
    assert "unknown key SomethingElse (ignored)" in joined
    assert len(warnings) == 4


def test_sizes_and_ages_of_the_layer_cache():
    cfg = parse_config(dict(SITE_FILE, LayerCacheMaxSize="50G", LayerCacheMaxAge="7:00:00:00"))
    assert cfg.layer_cache_max_size == 50 * 1024**3
    assert cfg.layer_cache_max_age == 7 * 86400
    assert parse_config(dict(SITE_FILE, LayerCacheMaxSize=1000)).layer_cache_max_size == 1000
    assert parse_size("1.5TiB") == int(1.5 * 1024**4)
    with pytest.raises(ConfigError, match="MetricsRetention"):
        parse_config(dict(SITE_FILE, MetricsRetention=0))
    assert parse_config(dict(SITE_FILE, MetricsRetention=None)).metrics_retention is None


def test_the_shipped_example_checks_clean():
    # etc/imagemanager.json is what the packages install: no error, no unknown key.
    path = Path(__file__).resolve().parent.parent / "etc" / "imagemanager.json"
    cfg, errors, warnings = check_config(json.loads(path.read_text()), gateway=True)
    assert errors == [] and warnings == [] and cfg is not None


def test_only_config_reads_the_file():
    # One owner: no module of the gateway looks a key of imagemanager.json up itself.
    root = Path(__file__).resolve().parent.parent / "imagegw"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "config.py":
            continue
        text = path.read_text()
        for key in ("raw.get(", ".raw[", '"Platforms"', '"MongoDBURI"', '"LogLevel"'):
            if key in text:
                offenders.append(f"{path.name}: {key}")
    assert offenders == []
