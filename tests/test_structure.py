"""The package's architecture, checked: no import cycle, no oversized module, every setting declared once
(the CLI options and the framework classes' fields come from the settings objects), and framework adapters
that touch only the public modules."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

import flashback_integrations
from flashback_integrations.cli import app
from flashback_integrations.config import FlashBackConfig, LoadSettings, help_of
from flashback_integrations.engine.sampling import Sampling
from flashback_integrations.store.chroma import StoreLocation
from flashback_integrations.training.config import TrainConfig
from flashback_integrations.training.examples import ExampleSettings, ExampleSource

PKG = Path(flashback_integrations.__file__).parent
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports() -> dict[str, set[str]]:
    """Package module -> package modules it imports, at module level or inside functions alike."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_import_walker_sees_a_cycle_when_there_is_one() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "flashback_integrations.engine.kv" in _imports()["flashback_integrations.engine.loop"]


def test_no_import_cycles() -> None:
    assert _cycles(_imports()) == []


def test_no_module_over_450_lines() -> None:
    sizes = {str(p.relative_to(PKG)): len(p.read_text().splitlines()) for p in PKG.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_no_test_file_over_500_lines() -> None:
    """Tests split by subject, so a newcomer finds a behaviour's tests by the file's name."""
    tests = Path(__file__).parent
    sizes = {str(p.relative_to(tests)): len(p.read_text().splitlines()) for p in tests.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}


def _package_imports(prefix: str) -> set[str]:
    return {t for m, targets in _imports().items() if m.startswith(prefix) for t in targets}


def test_framework_adapters_touch_only_the_public_modules() -> None:
    """langchain/ and llama_index/ adapt; they never reach into the engine, loading or training."""
    public = (
        "config",
        "errors",
        "events",
        "settings",
        "chat",
        "tools",
        "retrieval",
        "store",
        "langchain",
        "llama_index",
    )
    allowed = {f"flashback_integrations.{name}" for name in public}
    for framework in ("langchain", "llama_index"):
        touched = _package_imports(f"flashback_integrations.{framework}")
        outside = {t for t in touched if not any(t == a or t.startswith(a + ".") for a in allowed)}
        assert outside == set(), f"{framework} reaches into {sorted(outside)}"


def test_the_engine_depends_only_on_settings_records_and_retrieval() -> None:
    touched = _package_imports("flashback_integrations.engine")
    allowed = ("config", "errors", "events", "retrieval", "engine")
    assert {t for t in touched if t.split(".")[1] not in allowed} == set()


def test_retrieval_knows_no_store_engine_or_framework_module() -> None:
    touched = _package_imports("flashback_integrations.retrieval")
    assert {t for t in touched if t.split(".")[1] not in ("config", "errors", "retrieval")} == set()


SETTINGS = (FlashBackConfig, Sampling, LoadSettings, ExampleSettings, ExampleSource, TrainConfig, StoreLocation)


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_setting_is_declared_with_its_help(cls: type) -> None:
    missing = [f.name for f in dataclasses.fields(cls) if not help_of(f)]
    assert missing == []


def _command(*path: str):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


COMMANDS = {
    ("generate",): (FlashBackConfig, Sampling, LoadSettings, StoreLocation),
    ("demo",): (LoadSettings,),
    ("train",): (TrainConfig, ExampleSettings, ExampleSource, StoreLocation),
    ("data", "build"): (ExampleSettings, ExampleSource, StoreLocation),
    ("eval", "ppl"): (ExampleSettings, ExampleSource, StoreLocation),
    ("index", "add"): (StoreLocation,),
    ("index", "query"): (StoreLocation,),
}


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_cli_options_are_derived_from_the_settings(path: tuple[str, ...]) -> None:
    """Each field is an option named after it, with the field's help and default."""
    params = {p.name: p for p in _command(*path).params}
    for cls in COMMANDS[path]:
        for f in dataclasses.fields(cls):
            assert f.name in params, f"{' '.join(path)} has no option for {cls.__name__}.{f.name}"
            option = params[f.name]
            assert option.help == help_of(f)
            assert option.opts[0] == "--" + f.name.replace("_", "-")
            if f.default is not dataclasses.MISSING and not isinstance(f.default, (list, dict)):
                assert option.default == f.default, (cls.__name__, f.name)


def test_a_derived_option_reaches_the_settings_object_and_its_check() -> None:
    result = CliRunner().invoke(app, ["generate", "hi", "--stride", "0", "--mode", "none"])
    assert result.exit_code == 2
    assert "stride must be a positive integer" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["generate", "hi", "--model-kwargs", "[1]"])
    assert result.exit_code == 2 and "--model-kwargs must be a JSON object" in " ".join(result.output.split())


def test_framework_fields_are_the_settings_fields() -> None:
    from flashback_integrations.langchain import ChatFlashBack, FlashBackLLM
    from flashback_integrations.llama_index import FlashBackLLM as LlamaIndexLLM

    for cls in (ChatFlashBack, FlashBackLLM, LlamaIndexLLM):
        fields = cls.model_fields
        for settings in (FlashBackConfig, Sampling, LoadSettings):
            for f in dataclasses.fields(settings):
                assert f.name in fields, (cls.__name__, f.name)
                assert fields[f.name].description == help_of(f)
                default = fields[f.name].get_default(call_default_factory=True)
                expected = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                assert default == expected, (cls.__name__, f.name)
