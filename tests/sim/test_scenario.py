"""Scenario files: schema validation that names the key, --set overrides, runners and churn hooks."""

import tomllib
from pathlib import Path

import pytest

from p2pdeploy.core import Protocol
from p2pdeploy.sim.runner import RUNNERS, Runner, register_runner
from p2pdeploy.sim.scenario import (
    ScenarioError,
    apply_override,
    load_scenario,
    parse_scenario,
    parse_value,
    run_scenario,
    to_toml,
)
from p2pdeploy.sim.schema import Field

PING_TOML = Path(__file__).parents[2] / "simulations" / "ping.toml"


def scenario_file(tmp_path, text, name="ping.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_ping_scenario_resolves_every_key_with_defaults():
    scenario = load_scenario(PING_TOML)
    assert scenario.runner.name == "ping"
    assert scenario.get("nodes") == 1000
    assert scenario.get("network.loss") == 0.0
    assert scenario.get("network.upload_bytes_per_s") == 1_250_000.0  # a default the file does not state
    assert scenario.get("ping.interval_s") == 1.0
    assert scenario.get("churn.downtime.shape") == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[network]\nloss = 1.5\n", "ping.toml: network.loss must be between 0 and 1 (got 1.5)"),
        ("nodes = 0\n", "ping.toml: nodes must be >= 1 (got 0)"),
        ("duration_s = 0\n", "ping.toml: duration_s must be > 0 (got 0)"),
        ('nodes = "many"\n', 'ping.toml: nodes must be an integer (got "many")'),
        ("nodes = 10.5\n", "ping.toml: nodes must be an integer (got 10.5)"),
        ("trace = 1\n", "ping.toml: trace must be true or false (got 1)"),
        ("duration_s = inf\n", "ping.toml: duration_s must be a finite number (got inf)"),
        ('[network]\nlatency_model = "ring"\n', "ping.toml: network.latency_model must be one of euclidean"),
        ("network = 3\n", "ping.toml: network must be a table, e.g. [network] (got 3)"),
        ("[nodes]\nx = 1\n", "ping.toml: nodes must be an integer (got a table)"),
        ("[network]\nlosss = 0.1\n", "ping.toml: unknown key network.losss (did you mean network.loss?)"),
        ("colour = 1\n", "ping.toml: unknown key colour"),
        ("[ping]\ninterval_s = -1\n", "ping.toml: ping.interval_s must be > 0 (got -1)"),
        ("[churn.session]\nmedian_s = 0\n", "ping.toml: churn.session.median_s must be > 0 (got 0)"),
        ("nodes = 1\n", 'ping.toml: nodes must be >= 2 for protocol "ping" (got 1)'),
        ("nodes = \n", "ping.toml: not valid TOML"),
    ],
)
def test_scenario_errors_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(ScenarioError) as caught:
        load_scenario(scenario_file(tmp_path, text))
    assert str(caught.value).startswith(message)


def test_an_unknown_protocol_names_the_registered_runners(tmp_path):
    with pytest.raises(ScenarioError) as caught:
        load_scenario(scenario_file(tmp_path, 'protocol = "gossip"\n'))
    message = str(caught.value)
    assert message.startswith("ping.toml: protocol must be one of ")
    assert "ping" in message and '(got "gossip")' in message


def test_a_runner_module_that_fails_to_import_is_named_and_does_not_break_the_others(monkeypatch, tmp_path):
    import pkgutil

    from p2pdeploy.sim import runner as runner_module

    real = pkgutil.iter_modules

    def with_a_broken_module(path):
        yield from real(path)
        yield pkgutil.ModuleInfo(None, "not_written_yet", False)

    monkeypatch.setattr(runner_module.pkgutil, "iter_modules", with_a_broken_module)
    monkeypatch.setattr(runner_module, "BROKEN_RUNNER_MODULES", {})
    monkeypatch.setattr("p2pdeploy.sim.scenario.BROKEN_RUNNER_MODULES", runner_module.BROKEN_RUNNER_MODULES)
    assert load_scenario(PING_TOML).runner.name == "ping"
    with pytest.raises(ScenarioError, match=r"p2pdeploy.sim.runners.not_written_yet failed to import \(ModuleNotFound"):
        load_scenario(scenario_file(tmp_path, 'protocol = "gossip"\n'))


def test_a_runner_section_belongs_to_its_runner_only(tmp_path, churn_counter):
    with pytest.raises(ScenarioError, match=r"ping.toml: unknown key counter"):
        load_scenario(scenario_file(tmp_path, '[counter]\nlabel = "x"\n'))


def test_overrides_set_dotted_keys_with_toml_typed_values():
    scenario = load_scenario(
        PING_TOML,
        overrides=[
            "nodes=200",
            "network.loss=0.05",
            "trace=false",
            "churn.model=sessions",  # not TOML: kept as the string
            'ping.identities="hash"',
            "churn.session.median_s=5",
            "description = two words",
        ],
        seed=9,
    )
    assert scenario.get("nodes") == 200
    assert scenario.get("network.loss") == 0.05
    assert scenario.get("trace") is False
    assert scenario.get("churn.model") == "sessions"
    assert scenario.get("ping.identities") == "hash"
    assert scenario.get("churn.session.median_s") == 5.0
    assert scenario.get("description") == "two words"
    assert scenario.get("seed") == 9


def test_override_errors_say_they_come_from_set():
    with pytest.raises(ScenarioError, match=r"^ping.toml --set: network.loss must be between 0 and 1 \(got 1.5\)$"):
        load_scenario(PING_TOML, overrides=["network.loss=1.5"])
    with pytest.raises(ScenarioError, match=r"^ping.toml --set: unknown key network.jiter_ms \(did you mean"):
        load_scenario(PING_TOML, overrides=["network.jiter_ms=1"])
    with pytest.raises(ScenarioError, match="expected KEY=VALUE"):
        load_scenario(PING_TOML, overrides=["nodes"])
    with pytest.raises(ScenarioError, match="nodes is not a table"):
        load_scenario(PING_TOML, overrides=["nodes.count=3"])


def test_override_values_parse_as_toml_or_fall_back_to_text():
    assert parse_value("200") == 200
    assert parse_value("1e3") == 1000.0
    assert parse_value("true") is True
    assert parse_value('"quoted"') == "quoted"
    assert parse_value("weibull") == "weibull"
    raw = {"network": {"loss": 0.0}}
    assert apply_override(raw, "network.jitter_ms=3") == "network.jitter_ms"
    assert raw == {"network": {"loss": 0.0, "jitter_ms": 3}}


def test_trace_churn_needs_a_readable_trace_file(tmp_path):
    with pytest.raises(ScenarioError, match="churn.trace_file must name a CSV file"):
        load_scenario(scenario_file(tmp_path, '[churn]\nmodel = "trace"\n'))
    with pytest.raises(ScenarioError, match="churn.trace_file must name an existing file"):
        load_scenario(scenario_file(tmp_path, '[churn]\nmodel = "trace"\ntrace_file = "nope.csv"\n'))
    (tmp_path / "bad.csv").write_text("1,3,down\n2,3,sideways\n")
    with pytest.raises(ScenarioError, match=r"ping.toml: churn.trace_file: .*bad.csv:2: state must be up or down"):
        load_scenario(scenario_file(tmp_path, '[churn]\nmodel = "trace"\ntrace_file = "bad.csv"\n'))


def test_the_resolved_scenario_written_as_toml_reads_back_identically():
    scenario = load_scenario(PING_TOML, overrides=["churn.model=sessions", 'description="a \\"quoted\\" text"'])
    assert tomllib.loads(to_toml(scenario.values)) == scenario.values


class Idle(Protocol):
    def receive(self, src, msg, now):
        pass


class ChurnCounter(Runner):
    """A runner that hosts idle cores and counts the churn hooks it gets."""

    name = "test-churn-counter"
    schema = {"counter": {"label": Field("x", str, "a label")}}

    def __init__(self, scenario, sim):
        super().__init__(scenario, sim)
        self.downs = 0
        self.ups = 0

    def make_core(self, address):
        return Idle()

    def on_down(self, address):
        self.downs += 1
        super().on_down(address)

    def on_up(self, address):
        self.ups += 1
        super().on_up(address)

    def summary(self):
        return {"downs": self.downs, "ups": self.ups, "label": self.scenario.get("counter.label")}


@pytest.fixture
def churn_counter(monkeypatch):
    monkeypatch.setitem(RUNNERS, ChurnCounter.name, ChurnCounter)
    return ChurnCounter


def test_a_registered_runner_gets_its_schema_and_the_churn_hooks(churn_counter):
    scenario = parse_scenario(
        {
            "protocol": "test-churn-counter",
            "nodes": 50,
            "duration_s": 100.0,
            "counter": {"label": "hooks"},
            "churn": {
                "model": "sessions",
                "session": {"distribution": "exponential", "median_s": 10.0},
                "downtime": {"distribution": "exponential", "median_s": 5.0},
            },
        }
    )
    result = run_scenario(scenario)
    summary = result.summary
    assert summary["label"] == "hooks"
    assert summary["downs"] == summary["departures"] > 50
    assert summary["ups"] == summary["arrivals"] > 0
    assert summary["nodes_up"] == 50 - (summary["downs"] - summary["ups"])
    with pytest.raises(ScenarioError, match=r"unknown key counter\.lable"):
        parse_scenario({"protocol": "test-churn-counter", "counter": {"lable": "x"}})


def test_registering_a_second_runner_under_a_taken_name_is_refused(churn_counter):
    class Impostor(Runner):
        name = "test-churn-counter"

    with pytest.raises(ValueError, match="already registered"):
        register_runner(Impostor)


def test_a_config_key_takes_its_default_and_type_from_the_layer_config():
    from dataclasses import dataclass

    from p2pdeploy.overlay.kademlia import KademliaConfig
    from p2pdeploy.sim.runners.overlay import OverlayRunner
    from p2pdeploy.sim.schema import Tunable, config_keys

    @dataclass(frozen=True)
    class Knobs:
        period_s: float = 2.5
        tries: int = 4
        name: str = "x"

    keys = config_keys(Knobs, tries=Tunable("sends", ge=1), period_s=Tunable("how often", gt=0))
    assert list(keys) == ["tries", "period_s"]
    assert keys["tries"] == Field(4, int, "sends", ge=1) and keys["period_s"] == Field(2.5, float, "how often", gt=0)
    with pytest.raises(TypeError, match="Knobs.speed is not a field"):
        config_keys(Knobs, speed=Tunable("no such field"))
    # the overlay scenario's k is KademliaConfig's, not a second copy of 20
    assert OverlayRunner.schema["overlay"]["k"].default == KademliaConfig().k
