"""The ``[placement]`` and ``[state]`` tables: every error names the field, valid placements read back."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdeploy.resource.manifest import MAX_REPLICAS, Manifest, ManifestError, Placement
from p2pdeploy.resource.requirements import Requirement

MINIMAL = 'name = "web"\nversion = "1.0"\ncommand = ["python3", "app.py"]\n'


def read(placement: str = "", state: str = "") -> Manifest:
    text = (
        MINIMAL
        + (f"[placement]\n{placement}\n" if placement else "")
        + (f"[state]\n{state}\n" if state else "")
    )
    return Manifest.parse(text)


def test_without_a_placement_a_service_runs_one_replica_spread_over_owners():
    manifest = read()
    assert manifest.placement == Placement(replicas=1)
    assert manifest.placement.spread == ("owner",) and manifest.placement.mode == "count"
    assert manifest.replicas == 1 and manifest.state_consistency == "none"


def test_an_availability_target_leaves_the_count_to_the_deployer():
    manifest = read(
        'availability = 0.999\nmin_replicas = 2\nmax_replicas = 5\nspread = ["owner", "region"]\n'
        'constraints = \'region in {"eu", "us"}\''
    )
    p = manifest.placement
    assert (p.replicas, p.availability, p.min_replicas, p.max_replicas) == (None, 0.999, 2, 5)
    assert p.spread == ("owner", "region")
    assert p.constraints == Requirement.parse('region in {"eu", "us"}')
    assert manifest.replicas == 2  # the least it will run


def test_mode_every_has_no_count_and_manifest_replicas_reads_its_minimum():
    manifest = read('mode = "every"\nconstraints = \'"edge" in tags\'')
    assert manifest.placement.mode == "every" and manifest.placement.replicas is None
    assert manifest.replicas == 1


@pytest.mark.parametrize("consistency", ["none", "eventual", "quorum"])
def test_the_state_table_names_the_consistency(consistency):
    assert read(state=f'consistency = "{consistency}"').state_consistency == consistency


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ("availability = 1.5", "manifest.toml: placement.availability must be between 0 and 1 (got 1.5)"),
        ("availability = 1", "manifest.toml: placement.availability must be between 0 and 1 (got 1.0)"),
        ("availability = 0", "manifest.toml: placement.availability must be between 0 and 1 (got 0.0)"),
        ('availability = "high"', "manifest.toml: placement.availability must be a number (got 'high')"),
        (
            "replicas = 2\navailability = 0.99",
            "manifest.toml: placement.replicas and placement.availability are mutually exclusive",
        ),
        ("replicas = 0", "manifest.toml: placement.replicas must be >= 1 (got 0)"),
        ("replicas = 1.5", "manifest.toml: placement.replicas must be an integer (got 1.5)"),
        (
            f"replicas = {MAX_REPLICAS + 1}",
            f"manifest.toml: placement.replicas must be <= 64 (got {MAX_REPLICAS + 1})",
        ),
        ("min_replicas = 0", "manifest.toml: placement.min_replicas must be >= 1 (got 0)"),
        (
            "min_replicas = 3\nmax_replicas = 2",
            "manifest.toml: placement.max_replicas must be >= placement.min_replicas (3) (got 2)",
        ),
        ("max_replicas = 65", "manifest.toml: placement.max_replicas must be <= 64 (got 65)"),
        ('spread = "owner"', "manifest.toml: placement.spread must be a list of attribute names"),
        ("spread = [1]", "manifest.toml: placement.spread must be a list of attribute names"),
        (
            'spread = ["Owner"]',
            "manifest.toml: placement.spread must name node attributes ([a-z_][a-z0-9_]*) (got 'Owner')",
        ),
        ('spread = ["owner", "owner"]', "manifest.toml: placement.spread must not name an attribute twice"),
        (
            "constraints = 'cores >='",
            "manifest.toml: placement.constraints is not valid: requirement: expected a value after '>=' at column 9",
        ),
        ("constraints = 3", "manifest.toml: placement.constraints must be a string (got 3)"),
        ('mode = "all"', 'manifest.toml: placement.mode must be "count" or "every" (got \'all\')'),
        (
            'mode = "every"\nreplicas = 2',
            'manifest.toml: placement.replicas cannot be given with placement.mode = "every"',
        ),
        (
            'mode = "every"\navailability = 0.9',
            'manifest.toml: placement.availability cannot be given with placement.mode = "every"',
        ),
        (
            "replica = 2",
            "manifest.toml: placement.replica is not a manifest field (known in placement: replicas,",
        ),
    ],
)
def test_every_placement_error_names_the_field_and_the_reason(placement, message):
    with pytest.raises(ManifestError) as error:
        read(placement)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (
            'consistency = "strong"',
            'manifest.toml: state.consistency must be "none", "eventual" or "quorum" (got \'strong\')',
        ),
        ("consistency = 1", "manifest.toml: state.consistency must be a string (got 1)"),
        (
            'mode = "quorum"',
            "manifest.toml: state.mode is not a manifest field (known in state: consistency)",
        ),
    ],
)
def test_every_state_error_names_the_field_and_the_reason(state, message):
    with pytest.raises(ManifestError) as error:
        read(state=state)
    assert str(error.value) == message


def test_a_placement_built_in_code_keeps_the_same_rules():
    with pytest.raises(ValueError, match=r"^placement.availability must be between 0 and 1 \(got 2\)$"):
        Placement(availability=2)
    with pytest.raises(ValueError, match="mutually exclusive"):
        Placement(replicas=2, availability=0.9)
    assert Placement().replicas == 1 and Placement(availability=0.9).replicas is None


CONSTRAINTS = st.sampled_from(
    [
        None,
        'os == "linux"',
        "cores >= 4 and memory_free >= 512M",
        'region in {"eu", "us"} or not owner == "mallory"',
    ]
)
NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)


@st.composite
def placements(draw):
    mode = draw(st.sampled_from(["count", "every"]))
    low = draw(st.integers(1, MAX_REPLICAS))
    high = draw(st.integers(low, MAX_REPLICAS))
    replicas = availability = None
    if mode == "count":
        kind = draw(st.sampled_from(["replicas", "availability", "neither"]))
        if kind == "replicas":
            replicas = draw(st.integers(1, MAX_REPLICAS))
        elif kind == "availability":
            availability = draw(st.floats(0, 1, exclude_min=True, exclude_max=True))
    constraints = draw(CONSTRAINTS)
    return Placement(
        replicas=replicas,
        availability=availability,
        min_replicas=low,
        max_replicas=high,
        spread=tuple(draw(st.lists(NAMES, max_size=3, unique=True))),
        constraints=None if constraints is None else Requirement.parse(constraints),
        mode=mode,
    )


@given(placements())
def test_a_valid_placement_reads_back_from_its_table(placement):
    table = {"name": "web", "version": "1.0", "command": ["app"], "placement": placement.to_table()}
    assert Manifest.from_table(table).placement == placement
