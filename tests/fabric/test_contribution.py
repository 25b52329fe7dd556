"""The owner's contribution: sizes and shares, the config file, clamping, trust and tags."""

import pytest

from p2pdeploy.fabric.contribution import Contribution, ContributionError, parse_config_section
from p2pdeploy.fabric.machine import Machine
from p2pdeploy.fabric.units import (
    GIB,
    MIB,
    UnitError,
    format_cores,
    format_size,
    parse_bandwidth,
    parse_cores,
    parse_size,
)

MACHINE = Machine(
    cores=4, memory_total_bytes=8 * GIB, memory_free_bytes=6 * GIB, disk_total_bytes=100 * GIB, disk_free_bytes=40 * GIB
)
KEY = bytes(range(32))


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 * MIB), ("2G", 2 * GIB), ("1.5G", 3 * GIB // 2), ("2GiB", 2 * GIB), ("100MB", 100_000_000),
     ("4096", 4096), (1024, 1024), ("64Ki", 64 * 1024), ("1 T", 1024 * GIB), ("10B", 10)],
)  # fmt: skip
def test_sizes_read_binary_units_and_decimal_ones(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "12X", "-5M", "", "1.2.3G", True])
def test_a_malformed_size_is_refused_with_an_example(text):
    with pytest.raises(UnitError, match="size"):
        parse_size(text)


def test_cores_bandwidth_and_formatting():
    assert parse_cores("1.5") == 1.5 and parse_cores(2) == 2.0
    assert parse_bandwidth("100Mbit") == 100_000_000 and parse_bandwidth("10Mbps") == 10_000_000
    assert format_size(512 * MIB) == "512 MiB" and format_size(1536 * MIB) == "1.5 GiB"
    assert format_cores(1) == "1 core" and format_cores(0.5) == "0.5 cores"
    with pytest.raises(UnitError):
        parse_cores("many")


def test_a_contribution_reads_amounts_shares_keys_and_tags_from_its_table():
    table = {
        "cpu": "50%", "memory": "2G", "disk": "10%", "bandwidth": "20Mbit", "max_services": 3,
        "trusted_keys": [KEY.hex()], "allowed_tags": ["web"], "tags": ["ssd"], "owner": "alice",
    }  # fmt: skip
    c = Contribution.from_table(table, MACHINE)
    assert (c.cpu_cores, c.memory_bytes, c.disk_bytes) == (2.0, 2 * GIB, 4 * GIB)
    assert c.bandwidth_bps == 20_000_000 and c.max_services == 3
    assert c.trusted_keys == frozenset({KEY}) and c.trusts(KEY) and not c.trusts(bytes(32))
    assert c.allowed_tags == frozenset({"web"}) and c.tags == frozenset({"ssd"}) and c.owner == "alice"
    assert Contribution.from_table(c.to_table(), MACHINE) == c


def test_a_node_never_offers_more_than_the_machine_has():
    c = Contribution.from_table({"cpu": 16, "memory": "64G", "disk": "1T"}, MACHINE)
    assert (c.cpu_cores, c.memory_bytes, c.disk_bytes) == (4, 8 * GIB, 40 * GIB)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"memory": "lots"}, "config.toml: contribution.memory: expected a size such as 512M or 2G (got 'lots')"),
        ({"cpu": "many"}, "config.toml: contribution.cpu: expected a number of cores"),
        ({"max_services": -1}, "config.toml: contribution.max_services must be an integer >= 0 (got -1)"),
        ({"trusted_keys": ["abc"]}, "config.toml: contribution.trusted_keys[0] must be a 64-digit hex Ed25519 public key"),
        ({"trusted_keys": "everyone"}, 'config.toml: contribution.trusted_keys must be "any" or a list'),
        ({"cpus": 2}, "config.toml: contribution.cpus: unknown key"),
        ({"allowed_tags": "web"}, "config.toml: contribution.allowed_tags must be a list of non-empty strings"),
    ],
)
def test_errors_name_the_file_and_the_key(table, message):
    with pytest.raises(ContributionError) as error:
        Contribution.from_table(table, MACHINE)
    assert str(error.value).startswith(message)


def test_a_share_of_the_machine_needs_the_machine():
    with pytest.raises(ContributionError, match="share of the machine; probe the machine first"):
        Contribution.from_table({"cpu": "50%"})


def test_a_config_document_gives_its_section_and_names_itself_when_broken():
    document = b'[contribution]\ncpu = 2\n[other]\nx = 1\n'
    assert parse_config_section(document, "node.toml") == {"cpu": 2}
    assert parse_config_section(document, "node.toml", "other") == {"x": 1}
    assert parse_config_section(b"", "node.toml") == {}
    with pytest.raises(ContributionError, match=r"^node.toml: not valid TOML: "):
        parse_config_section(b"[contribution\n", "node.toml")
    with pytest.raises(ContributionError, match=r"^node.toml: contribution must be a table \(\[contribution\]\)$"):
        parse_config_section(b"contribution = 1\n", "node.toml")


def test_tags_a_restricted_owner_refuses_name_what_is_allowed():
    c = Contribution(allowed_tags=frozenset({"web", "batch"}))
    assert c.tags_refusal({"web"}) is None
    assert c.tags_refusal({"web", "mining"}) == "tags: mining not allowed by this node's owner (allowed: batch, web)"
    assert c.tags_refusal(set()) == "tags: this node accepts only services tagged batch, web; this one has no tags"
    assert Contribution().tags_refusal({"anything"}) is None
