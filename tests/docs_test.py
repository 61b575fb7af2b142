"""The public surface: every module says what it exports (``__all__``), and the API reference
builds from the docstrings with pdoc, so that it cannot rot (see docs/README.md)."""

import ast
import importlib
import pathlib
import pkgutil
import re
import types
import warnings

import pytest

import ftlab

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Modules whose owners add their `__all__` in branches merged alongside this one (issue 17);
# once they are merged this set should be empty. Until then their check is an expected failure.
_AWAITING_ALL: set[str] = set()


def _public_modules():
    names, packages = ["ftlab"], ["ftlab"]
    for info in pkgutil.walk_packages(ftlab.__path__, "ftlab."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
            if info.ispkg:
                packages.append(info.name)
    return [*sorted(names), "third_party.peft_format"], sorted(packages)


MODULES, PACKAGES = _public_modules()


def _bound_here(module: types.ModuleType) -> set[str]:
    """Names a module binds itself (def, class, assignment), as opposed to importing them."""
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def test_every_public_module_is_checked():
    # walk_packages must see the modules, else the checks below pass vacuously
    assert {"ftlab.core.partition", "ftlab.peft.lora", "ftlab.data.text"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_public_names_that_resolve_and_no_imported_module(name):
    module = importlib.import_module(name)
    if not hasattr(module, "__all__") and name in _AWAITING_ALL:
        pytest.xfail(f"{name}: __all__ comes with its owner's branch (issue 17)")
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    exported = list(module.__all__)
    assert exported, f"{name}.__all__ is empty"
    assert len(set(exported)) == len(exported), f"{name}.__all__ repeats a name"
    assert not [n for n in exported if n.startswith("_")], f"{name}.__all__ lists private names"
    is_package = hasattr(module, "__path__")
    for n in exported:
        value = getattr(module, n)  # resolves (a package loads the submodule here)
        if isinstance(value, types.ModuleType):
            # A package may export its own submodules (and ftlab its short names); nothing
            # else exports a module: `jax`, `np`, `json` are not ftlab's API.
            assert is_package and value.__name__.startswith("ftlab."), f"{name}.__all__: {n}"
    if not is_package:
        imported = sorted(set(exported) - _bound_here(module))
        assert not imported, f"{name}.__all__ lists names it imports: {imported}"


@pytest.mark.parametrize("name", PACKAGES)
def test_packages_list_only_their_exports_in_dir(name):
    module = importlib.import_module(name)
    assert set(dir(module)) == set(module.__all__)
    assert "importlib" not in dir(module)


# Annotations of a NamedTuple's generated __init__ are evaluated by pdoc in the namespace of
# `collections`, where the module's names (np, Params, ...) are unknown: a pdoc limitation, not a
# fault of the docstrings. Every other warning fails the build.
_PDOC_LIMITATION = re.compile(r"Error parsing type annotation .* for [\w.]+\.__init__\. ")


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc", reason="pdoc is in the `test` extra")
    import pdoc  # noqa: PLC0415
    import pdoc.render  # noqa: PLC0415

    pdoc.render.configure(docformat="google")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("ftlab", "third_party", output_directory=tmp_path)
    problems = [str(w.message) for w in caught if not _PDOC_LIMITATION.search(str(w.message))]
    assert not problems, "\n".join(problems)
    for name in MODULES:
        page = tmp_path.joinpath(*name.split(".")).with_suffix(".html")
        assert page.is_file(), f"no page for {name}"
    page = (tmp_path / "ftlab" / "core" / "partition.html").read_text()
    assert "def split" in page.replace('<span class="def">def</span>', "def") or "split" in page
    assert "Splits <code>params</code> into" in page
