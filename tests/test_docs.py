"""The documentation (issue 32): the configuration reference generated from the typed
schema names every key, the README stays short, every relative link resolves, and the
site builds with `mkdocs build --strict`."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedkd.config import FedKDConfig
from fedkd.mitigations import MITIGATIONS
from simulations.config_reference import render
from strategies import STRATEGIES

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key of the schema, walked here independently of the generator: a field
    whose default is a dataclass is a section, every other field a key."""
    keys = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        if dataclasses.is_dataclass(value):
            keys += schema_keys(type(value), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def missing_keys(reference: str, root: type = FedKDConfig) -> list[str]:
    return [key for key in schema_keys(root) if f"| `{key}` |" not in reference]


@pytest.fixture(scope="module")
def reference() -> str:
    return render()


def test_reference_names_every_key_of_every_section(reference):
    keys = schema_keys(FedKDConfig)
    assert len(keys) > 60  # the walk saw the sections, not only the top level
    assert missing_keys(reference) == []


def component_section(reference: str, key: str, name: str) -> str:
    start = reference.index(f"### `{key}={name}`\n")
    end = reference.find("\n#", start + 1)
    return reference[start : end if end > 0 else None]


@pytest.mark.parametrize("key, registry", [("strategy", STRATEGIES), ("mitigation", MITIGATIONS)])
def test_reference_names_every_setting_of_every_component(reference, key, registry):
    for name in registry.names():
        section = component_section(reference, key, name)
        for f in dataclasses.fields(registry.get(name).Params):
            if f.name != "name":
                assert f"| `{key}.{f.name}` |" in section, f"{key}={name}: {f.name}"


def test_reference_lists_every_config_group_option(reference):
    for path in sorted((ROOT / "conf").glob("*/*.yaml")):
        assert f"| `{path.parent.name}={path.stem}` |" in reference


def test_a_new_field_or_section_appears_without_an_edit(reference):
    """A schema with a field and a section the generator has never seen: both appear
    in its reference, and the check above would flag the current reference."""
    knob = dataclasses.make_dataclass("Knob", [("level", int, dataclasses.field(default=3))])
    extended = dataclasses.make_dataclass(
        "Extended",
        [
            ("zz_new_key", float, dataclasses.field(default=0.25)),
            ("zz_section", knob, dataclasses.field(default_factory=knob)),
        ],
        bases=(FedKDConfig,),
    )
    assert missing_keys(reference, extended) == ["zz_new_key", "zz_section.level"]
    generated = render(extended)
    assert missing_keys(generated, extended) == []
    assert "| `zz_new_key` | `float` | `0.25` |" in generated
    assert "### `zz_section`" in generated


def test_reference_rows_carry_type_default_allowed_and_comment(reference):
    row = next(line for line in reference.splitlines() if line.startswith("| `partition.alpha` |"))
    # key, type as written, default, what its check allows, and its inline comment
    assert row.startswith("| `partition.alpha` | `float` | `0.5` | a number > 0 | dirichlet")
    assert "one of joint, sequential" in reference  # distill.client_schedule's check


def test_readme_is_under_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 200, len(lines)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(path):
    text = FENCE.sub("", path.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page (mkdocs --strict checks those)
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert broken == []


def test_no_source_points_at_a_readme_section_that_is_gone():
    """Code that names a README section ("README, \"X\"") names one the README has."""
    headings = {
        line.lstrip("#").strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("#")
    }
    pointers = []
    for top in ("fedkd", "strategies", "simulations"):
        for path in (ROOT / top).rglob("*.py"):
            for section in re.findall(r"README[^\"\n]{0,12}\(?\"([^\"]+)\"", path.read_text()):
                if section not in headings:
                    pointers.append(f"{path.relative_to(ROOT)}: {section}")
    assert pointers == []


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("material", reason="mkdocs-material (fedkd[docs]) is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr
    assert (tmp_path / "configuration.html").exists()
    assert "strategy.era_temperature" in (tmp_path / "configuration.html").read_text()
