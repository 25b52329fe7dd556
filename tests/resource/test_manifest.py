"""Service manifests: the examples read, and every error names the file and the field."""

from pathlib import Path

import pytest

from p2pdeploy.fabric.admission import Demand
from p2pdeploy.fabric.units import MIB
from p2pdeploy.files import load_manifest
from p2pdeploy.resource.manifest import Manifest, ManifestError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MINIMAL = 'name = "web"\nversion = "1.0"\ncommand = ["python3", "app.py"]\n'


def test_the_hello_example_reads_with_its_resources_checks_and_policies():
    manifest = load_manifest(EXAMPLES / "hello" / "manifest.toml")
    assert (manifest.name, manifest.version, manifest.command) == ("hello", "1.0.0", ("python3", "app.py"))
    assert manifest.demand() == Demand(0.25, 64 * MIB, 16 * MIB, 0, frozenset({"web", "example"}))
    assert (manifest.health.kind, manifest.health.path, manifest.health.failures) == ("http", "/health", 3)
    assert (manifest.restart.mode, manifest.restart.max_restarts) == ("on-failure", 5)
    assert manifest.replicas == 2 and manifest.stop_grace_s == 5
    assert (manifest.logs.max_bytes, manifest.logs.files) == (256 * 1024, 3)
    assert str(manifest.resources.requirements) == 'os == "linux" and arch in {"aarch64", "x86_64"}'
    assert manifest.simulated is not None and manifest.simulated.start_delay_s == 0.5


def test_a_minimal_manifest_takes_the_defaults():
    manifest = Manifest.parse(MINIMAL)
    assert manifest.health.kind == "none" and manifest.restart.mode == "on-failure"
    assert manifest.replicas == 1 and manifest.resources.requirements is None
    limits = manifest.limits()
    assert (limits.memory_bytes, limits.processes, limits.open_files) == (128 * MIB, 64, 1024)


def test_a_replica_spec_carries_the_env_the_bindings_and_the_limits():
    manifest = Manifest.parse(MINIMAL + '[env]\nMODE = "prod"\n[resources]\nmemory = "32M"\ncpu_time_s = 60\n')
    spec = manifest.replica_spec("web-1", bindings={"DATABASE_URL": "postgres://db"})
    assert spec.process.env == {"MODE": "prod", "DATABASE_URL": "postgres://db", "P2PDEPLOY_SERVICE": "web"}
    assert spec.process.limits.memory_bytes == 32 * MIB and spec.process.limits.cpu_time_s == 60
    assert spec.replica_id == "web-1" and spec.process.port is None
    with pytest.raises(ManifestError, match="binding 'PORT'"):
        manifest.replica_spec("web-1", bindings={"PORT": "1"})


LOADER = "changes how the dynamic loader or the C library starts a program"


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH", "MALLOC_CHECK_",
                                  "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS"])  # fmt: skip
def test_variables_that_change_how_a_program_starts_are_refused_in_the_env_and_the_bindings(name):
    with pytest.raises(ManifestError) as error:
        Manifest.parse(MINIMAL + f'[env]\n{name} = "/app/evil.so"\n')
    assert str(error.value) == f"manifest.toml: env.{name} {LOADER}, which a service may not do on a volunteer's node"
    with pytest.raises(ManifestError, match=f"binding '{name}' {LOADER}"):
        Manifest.parse(MINIMAL).replica_spec("web-1", bindings={name: "x"})


def test_an_interpreters_own_variables_stay_the_services_business():
    manifest = Manifest.parse(MINIMAL + '[env]\nPYTHONPATH = "lib"\nLDFLAGS = "-O2"\nTMPDIR = "/tmp"\n')
    assert {"PYTHONPATH", "LDFLAGS", "TMPDIR"} <= set(manifest.env)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[placement]\nreplicas = 0\n", "manifest.toml: placement.replicas must be >= 1 (got 0)"),
        ("[resources]\nmemory = \"lots\"\n", "manifest.toml: resources.memory is not valid: expected a size"),
        ("[resources]\ncpus = 1\n", "manifest.toml: resources.cpus is not a manifest field (known in resources: cpu,"),
        ("[resources]\nrequirements = \"cpu >=\"\n",
         "manifest.toml: resources.requirements is not valid: requirement: expected a value after '>=' at column 7"),
        ("[health]\nkind = \"ping\"\n", 'manifest.toml: health.kind must be "none", "tcp", "http" or "command"'),
        ("[health]\nkind = \"command\"\n", "manifest.toml: health.command is required when health.kind is command"),
        ("[health]\ninterval_s = 0\n", "manifest.toml: health.interval_s must be > 0 (got 0)"),
        ("[restart]\npolicy = \"sometimes\"\n", 'manifest.toml: restart.policy must be "never", "on-failure" or "always"'),
        ("[env]\nPORT = \"80\"\n", "manifest.toml: env.PORT is set by the node and cannot be overridden"),
        ("[logs]\nfiles = 0\n", "manifest.toml: logs.files must be >= 1 (got 0)"),
        ("colour = \"blue\"\n", "manifest.toml: colour is not a manifest field"),
        ("[simulation]\nignores_term = \"yes\"\n", "manifest.toml: simulation.ignores_term must be true or false"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_the_field(extra, message):
    with pytest.raises(ManifestError) as error:
        Manifest.parse(MINIMAL + extra)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('version = "1"\ncommand = ["x"]\n', "manifest.toml: name is required"),
        ('name = "Web App"\nversion = "1"\ncommand = ["x"]\n', "manifest.toml: name must be 1-48 characters"),
        ('name = "web"\nversion = "1"\n', "manifest.toml: command is required"),
        ('name = "web"\nversion = "1"\ncommand = "python3 app.py"\n', "manifest.toml: command must be a non-empty list"),
        ("name = [", "manifest.toml: not valid TOML"),
    ],
)
def test_required_fields_and_their_forms(text, message):
    with pytest.raises(ManifestError) as error:
        Manifest.parse(text)
    assert str(error.value).startswith(message)
