"""The trainer's layout and the project's hygiene (issue #13, findings 12 and 13): one job per module, no
private helpers borrowed across modules, no improvised exception attributes, the docs cite only what the
repository holds, the README's commands use the set-up's interpreter, and the tool configuration exists."""

from __future__ import annotations

import ast
import re
import sys

import pytest

from tests.dml.tiny_runs import REPO

DML = REPO / "dml"
SOURCES = sorted(DML.rglob("*.py"))

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def test_the_layout_of_the_architecture_page():
    for name in ("config", "build", "trainer", "runtime", "metrics", "final_eval", "report", "train", "evaluate"):
        assert (DML / f"{name}.py").is_file(), name
    assert (DML / "data" / "degradations.py").is_file()
    assert not (DML / "evaluation.py").exists()  # metrics.py: no evaluation.py next to evaluate.py
    assert "architecture.md" in (REPO / "mkdocs.yml").read_text()


def test_no_module_imports_another_modules_private_names():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dml"):
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
                assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_no_improvised_exception_attributes_and_no_control_bytes():
    for path in SOURCES:
        text = path.read_text()
        assert "dist_shared" not in text, path
        assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", text), f"control characters in {path}"


def test_the_trainer_only_trains():
    """trainer.py builds nothing and parses nothing: no model, loss, data or argument parsing in it."""
    text = (DML / "trainer.py").read_text()
    for word in ("build_model", "build_loss", "load_splits", "argparse", "ArgumentParser", "Splits("):
        assert word not in text, word


def test_unused_loss_attribute_is_gone():
    from dml.losses import LOSSES

    assert not any(hasattr(cls, "uses_norm") for cls in LOSSES.values())


def test_vmf_dists_never_imports_dml():
    for path in (REPO / "vmf_dists").rglob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+dml\b", path.read_text(), re.M), path


def test_docs_cite_only_what_the_repository_holds():
    for path in (REPO / "docs").glob("*.md"):
        assert "design notes" not in path.read_text(), path


def test_readme_commands_use_the_setup_interpreter():
    """The README's command lines run the project's .venv (a bare `python` is some other interpreter)."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    for line in (line for block in blocks for line in block.splitlines()):
        assert not re.match(r"\s*python3? ", line), line


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_one_version_and_typed_packages(pyproject):
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "vmf_dists.__version__"}
    import dml
    import vmf_dists

    assert dml.__version__ == vmf_dists.__version__
    assert (DML / "py.typed").is_file() and (REPO / "vmf_dists" / "py.typed").is_file()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["*"]


def test_setup_metadata_is_current(pyproject):
    """An SPDX licence string (a table makes setuptools warn at every install) and tomli declared for 3.10."""
    assert pyproject["project"]["license"] == "Apache-2.0"
    dml_extra = pyproject["project"]["optional-dependencies"]["dml"]
    assert any(dep.startswith("tomli") and "3.11" in dep for dep in dml_extra)


def test_ruff_and_mypy_are_configured_and_run_by_ci(pyproject):
    tool = pyproject["tool"]
    assert "I" in tool["ruff"]["lint"]["select"] and "F" in tool["ruff"]["lint"]["select"]
    assert tool["mypy"]["files"] == ["dml", "vmf_dists"]
    assert any(o["module"] == ["vmf_dists.*"] and o["disallow_untyped_defs"] for o in tool["mypy"]["overrides"])
    dev = " ".join(pyproject["project"]["optional-dependencies"]["dev"])
    assert "ruff" in dev and "mypy" in dev
    ci = (REPO / ".ci" / "run").read_text()
    assert "ruff check .\n" in ci and "mypy" in ci
