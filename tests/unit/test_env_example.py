"""``.env.example`` documents every setting, with its real default, and nothing that does not exist.

Each field of every settings class in ``protocol/settings.py`` appears once, as ``# NAME=default``
under a comment saying what it does. A new setting without a line here fails
``test_every_setting_is_documented``; a line for a setting that was removed or renamed fails
``test_nothing_unknown_is_documented``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

import protocol.settings as settings_module
from protocol.settings import REPO_ROOT

ENV_EXAMPLE = REPO_ROOT / ".env.example"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ASSIGNMENT = re.compile(r"^#\s?([A-Z][A-Z0-9_]*)=(.*)$")

# Variables that are not spindle settings, each with who reads it.
THIRD_PARTY = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": "the OpenTelemetry SDK",
    "COMPOSE_PROFILES": "docker compose itself",
    "OMP_WAIT_POLICY": "libgomp (torch's OpenMP runtime); the worker sets PASSIVE unless this or GOMP_SPINCOUNT is set",
    "GOMP_SPINCOUNT": "libgomp (torch's OpenMP runtime)",
}
# Read by docker-compose.yml only, as ${NAME:-default}; the default there must be the one here.
COMPOSE_ONLY = {"SPINDLE_TAG", "WORKER_STOP_GRACE_PERIOD", "REDIS_MAXMEMORY", "IMPORT_HOST_DIR",
                "PROMETHEUS_PORT", "PROMETHEUS_RETENTION", "GRAFANA_PORT", "GRAFANA_ADMIN_PASSWORD"}


def settings_classes() -> list[type[BaseSettings]]:
    return [cls for _, cls in inspect.getmembers(settings_module, inspect.isclass)
            if issubclass(cls, BaseSettings) and cls.__module__ == settings_module.__name__]


def env_name(name: str, field: FieldInfo) -> str:
    alias = field.validation_alias
    return alias.upper() if isinstance(alias, str) else name.upper()


def documented_fields() -> dict[str, tuple[type[BaseSettings], FieldInfo]]:
    fields: dict[str, tuple[type[BaseSettings], FieldInfo]] = {}
    for cls in settings_classes():
        for name, field in cls.model_fields.items():
            fields.setdefault(env_name(name, field), (cls, field))
    return fields


def parse_example() -> tuple[dict[str, str], list[str]]:
    """The ``# NAME=value`` lines as {NAME: value}, and a list of problems with the file's form."""
    values: dict[str, str] = {}
    problems: list[str] = []
    lines = ENV_EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", line):
            problems.append(f"line {i + 1} sets {line.split('=')[0]}: keep every line commented out "
                            "(the file documents defaults; it must change nothing)")
        m = ASSIGNMENT.match(line)
        if not m:
            continue
        name, value = m.groups()
        if name in values:
            problems.append(f"{name} is listed twice (line {i + 1})")
        values[name] = value
        above = lines[i - 1] if i > 0 else ""
        if not above.startswith("# ") or ASSIGNMENT.match(above) or above.startswith("# ---"):
            problems.append(f"{name} (line {i + 1}) has no comment line above it saying what it does")
    return values, problems


def test_settings_classes_are_found():
    names = {cls.__name__ for cls in settings_classes()}
    assert {"CommonSettings", "GatewaySettings", "WorkerSettings", "ManagerSettings", "UISettings"} <= names


def test_file_form():
    _, problems = parse_example()
    assert not problems, "\n".join(problems)


def test_every_setting_is_documented():
    values, _ = parse_example()
    missing = {name: cls.__name__ for name, (cls, _) in documented_fields().items() if name not in values}
    assert not missing, (f"settings without a line in .env.example: {missing}; add "
                         "'# <what it does>' and '# NAME=<default>' under the service's heading")


def test_nothing_unknown_is_documented():
    values, _ = parse_example()
    known = set(documented_fields()) | set(THIRD_PARTY) | COMPOSE_ONLY
    unknown = sorted(set(values) - known)
    assert not unknown, (f".env.example lists variables nothing reads: {unknown} (a removed or renamed "
                         "setting? a third-party variable belongs in THIRD_PARTY with who reads it)")


@pytest.mark.parametrize("name", sorted(documented_fields()))
def test_documented_value_is_the_default(name):
    values, _ = parse_example()
    if name not in values:
        pytest.skip("not documented (test_every_setting_is_documented fails)")
    cls, field = documented_fields()[name]
    value = values[name]
    if field.default_factory is not None:
        # Made up at start (an instance id): the file can only leave it empty and say so in words.
        assert value == "", f"{name} has a generated default; leave its value empty"
        return
    if isinstance(field.default, Path):
        # Paths below the repository are shown relative to it (scripts run from the repo root).
        assert REPO_ROOT / value == field.default, f"{name}: {value!r} is not {field.default}"
        return
    parsed = TypeAdapter(field.annotation).validate_python(value)
    assert parsed == field.default, f"{name}={value!r} in .env.example, but {cls.__name__} defaults to " \
                                    f"{field.default!r}"


def test_compose_variables_match_their_compose_defaults():
    values, _ = parse_example()
    compose = COMPOSE_FILE.read_text()
    for name in sorted(COMPOSE_ONLY):
        defaults = set(re.findall(r"\$\{" + name + r":-([^}]*)\}", compose))
        assert defaults, f"{name} is documented as a compose variable but docker-compose.yml never reads it"
        assert defaults == {values.get(name)}, f"{name}: compose defaults {defaults} vs .env.example " \
                                                f"{values.get(name)!r}"


def test_every_compose_variable_is_documented():
    values, _ = parse_example()
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    assert used - set(values) == set(), f"docker-compose.yml reads undocumented variables: {used - set(values)}"
