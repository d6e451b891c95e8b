"""The import graph of covid_keras and data_prep, read statically (``ast``, nothing is
imported): covid_keras is wings that import only downward (issue 28 item 7), no cycle,
model code imports no TensorFlow, and data_prep uses only covid_keras's core wing."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("covid_keras", "data_prep")

#: covid_keras's wings (``covid_keras/<wing>/``), bottom to top: a module imports (at
#: module level or in a function) only its own wing and lower ranks. training and serving
#: share a rank: neither imports the other. The evaluation wing sits below training: the
#: trainer validates, chooses its checkpoint and decision with evaluation's code.
WING_RANK = {"core": 0, "model": 1, "io": 2, "evaluation": 3, "training": 4, "serving": 4}
#: The commands (``python -m covid_keras.X``): the top, above every wing, thin (their flags
#: and ``main``). Nothing imports a command, another command included: what two commands
#: share (web and predict: the predictor; serve and predict: the exporter's versions)
#: lives in a wing.
COMMANDS = tuple(f"covid_keras.{name}" for name in (
    "train", "evaluate", "export", "serve", "predict", "web", "pretrain"))
COMMAND_RANK = max(WING_RANK.values()) + 1
#: The model code: pure Keras 3 (no TensorFlow), loadable without the wings above it.
MODEL_CODE = ("covid_keras.model",)  # the whole wing: saving and keras_private too
#: What model code never loads: the wings above the model wing and the commands.
ABOVE_MODEL = tuple(f"covid_keras.{wing}" for wing, rank in WING_RANK.items()
                    if rank > WING_RANK["model"]) + COMMANDS
#: data_prep imports (module or function level) only the core wing of covid_keras...
DATA_PREP_MAY_IMPORT = ("covid_keras.core",)
#: ... and only the serving wing imports data_prep (the preparation settings a study is
#: prepared with at prediction time; the commands are thin and import none of it).
DATA_PREP_IMPORTED_BY = ("covid_keras.serving",)


@dataclass(frozen=True)
class Import:
    """One imported name: ``target`` is a dotted name, resolved to a module of the packages
    where it names one; ``module_level``: it runs when ``source`` is imported."""

    source: str
    target: str
    line: int
    module_level: bool

    def __str__(self) -> str:
        where = "module level" if self.module_level else "in a function"
        return f"{self.source} -> {self.target} (line {self.line}, {where})"


def module_files(root: Path = REPO, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py of ``packages``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def module_imports(module: str, source: str, is_package: bool,
                   modules: set[str]) -> list[Import]:
    """Every import of ``source`` (the module ``module``), at module level (class bodies,
    ``if``/``try`` blocks included) and inside functions. ``from pkg import x`` is the module
    ``pkg.x`` when that is a module of ``modules``, else ``pkg``."""
    out: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    out.append(Import(module, alias.name, child.lineno, module_level))
            elif isinstance(child, ast.ImportFrom):
                base = (child.module or "" if child.level == 0 else
                        _resolve_relative(module, is_package, child.level, child.module))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    target = sub if sub in modules else base
                    out.append(Import(module, target, child.lineno, module_level))
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, module_level and not inner)

    visit(ast.parse(source), True)
    return out


def import_graph(files: dict[str, Path]) -> list[Import]:
    """The imports of every module in ``files`` (name -> path)."""
    modules = set(files)
    out = []
    for name, path in files.items():
        out += module_imports(name, path.read_text(encoding="utf-8"),
                              path.name == "__init__.py", modules)
    return out


def is_within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# ------------------------------------------------------------------------- the checks
def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph ``edges`` as its path ``[a, b, ..., a]``, else None."""
    white, grey, black = 0, 1, 2
    colour = {node: white for node in edges}
    for targets in edges.values():
        for node in targets:
            colour.setdefault(node, white)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if colour[nxt] == grey:
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == white:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(colour):
        if colour[node] == white:
            found = dfs(node)
            if found:
                return found
    return None


def module_level_edges(imports: list[Import], modules: set[str]) -> dict[str, set[str]]:
    """source -> the modules of ``modules`` it imports at module level."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if imp.module_level and imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    return edges


def loads_above(imports: list[Import], modules: set[str], sources, forbidden) -> dict:
    """Each module within ``sources`` whose import loads, through module-level imports
    only (transitively), something within ``forbidden`` -> the chain that loads it."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.module_level and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    out = {}
    for module in sorted(m for m in modules if any(is_within(m, s) for s in sources)):
        parent = {module: None}
        todo = [module]
        while todo and module not in out:
            node = todo.pop(0)
            for nxt in sorted(edges.get(node, ())):
                if nxt in parent:
                    continue
                parent[nxt] = node
                if any(is_within(nxt, f) for f in forbidden):
                    chain = [nxt]
                    while parent[chain[0]] is not None:
                        chain.insert(0, parent[chain[0]])
                    out[module] = " -> ".join(chain)
                    break
                if nxt in modules:
                    todo.append(nxt)
    return out


def upward_imports(imports: list[Import], sources, forbidden) -> list[Import]:
    """The imports (module or function level) from a module within ``sources`` to one
    within ``forbidden`` (dotted names; a package stands for all its modules)."""
    return [imp for imp in imports
            if any(is_within(imp.source, s) for s in sources)
            and any(is_within(imp.target, f) for f in forbidden)]


def imports_outside(imports: list[Import], sources, package: str, allowed) -> list[Import]:
    """The imports from ``sources`` into ``package`` that are not within ``allowed``."""
    return [imp for imp in imports
            if any(is_within(imp.source, s) for s in sources)
            and is_within(imp.target, package)
            and not any(is_within(imp.target, a) for a in allowed)]


def wing_of(module: str) -> str | None:
    """``module``'s wing (``covid_keras.<wing>...``), ``"commands"`` for a command, None for
    the package ``covid_keras`` itself and for anything outside covid_keras."""
    if module in COMMANDS:
        return "commands"
    parts = module.split(".")
    if parts[0] != "covid_keras" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in WING_RANK else "?"


def data_prep_imports_below_serving(imports: list[Import]) -> list[Import]:
    """The imports of data_prep by a covid_keras module outside DATA_PREP_IMPORTED_BY."""
    return [imp for imp in imports
            if is_within(imp.source, "covid_keras")
            and not any(is_within(imp.source, w) for w in DATA_PREP_IMPORTED_BY)
            and is_within(imp.target, "data_prep")]


def rank_of(wing: str) -> int:
    return COMMAND_RANK if wing == "commands" else WING_RANK[wing]


def upward_wing_imports(imports: list[Import], modules: set[str]) -> list[Import]:
    """The imports (module or function level) between covid_keras modules that do not point
    down the wings: into a higher rank, into another wing of the same rank, or from a
    command into another command (the commands are not a wing: each stands alone)."""
    out = []
    for imp in imports:
        src, dst = wing_of(imp.source), wing_of(imp.target)
        if src in (None, "?") or dst in (None, "?") or imp.target not in modules:
            continue
        if src == dst and (src != "commands" or imp.target == imp.source):
            continue
        if rank_of(dst) >= rank_of(src):
            out.append(imp)
    return out


def imports_of_commands(imports: list[Import], modules: set[str]) -> list[Import]:
    """The imports of a command by a covid_keras module: a library module or another
    command."""
    inside = {m for m in modules if is_within(m, "covid_keras")}
    return [imp for imp in imports
            if imp.source in inside and imp.target != imp.source
            and any(is_within(imp.target, c) for c in COMMANDS)]


def command_library_code(files: dict[str, Path]) -> list[str]:
    """What a command defines beyond its flags and ``main``: a class (library code lives in
    a wing; a command's functions are its flags, ``main`` and glue that reads the flags)."""
    out = []
    for name, path in files.items():
        if name in COMMANDS:
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.ClassDef):
                    out.append(f"{name}.{node.name} (line {node.lineno})")
    return out


# ------------------------------------------------------------------------- the rules
@pytest.fixture(scope="module")
def graph():
    files = module_files()
    return set(files), import_graph(files)


def test_the_graph_is_read(graph):
    """The walk sees the packages and their imports (a walk that reads nothing passes
    every rule)."""
    modules, imports = graph
    assert {"covid_keras.model.drenet", "covid_keras.model.layers.topk",
            "data_prep.phantom.cli", "data_prep.build_tfrecords", "covid_keras.model.layers",
            "data_prep", *COMMANDS} <= modules
    targets = {(imp.source, imp.target) for imp in imports}
    # the package re-exports its layers; run_dir imports `files` (from covid_keras.x import y)
    assert ("covid_keras.model.layers", "covid_keras.model.layers.topk") in targets
    assert ("covid_keras.io.run_dir", "covid_keras.core.files") in targets
    assert any(not imp.module_level for imp in imports)  # function-level imports are read


def test_every_module_is_in_a_wing_or_a_command(graph):
    """covid_keras's top holds the commands only (and the package's lazy names); every
    library module lives in a wing of WING_RANK."""
    modules, _ = graph
    loose = sorted(m for m in modules if is_within(m, "covid_keras")
                   and wing_of(m) in (None, "?") and m != "covid_keras")
    assert not loose, f"covid_keras modules outside the wings and the commands: {loose}"
    assert {wing_of(m) for m in modules} >= set(WING_RANK) | {"commands"}


def test_the_wings_import_only_downward(graph):
    """core < model < io < evaluation < training, serving < the commands: no import
    (module or function level) points up or sideways."""
    modules, imports = graph
    bad = upward_wing_imports(imports, modules)
    assert not bad, ("imports that do not point down the wings (core < model < io < "
                     "evaluation < training, serving < commands):\n"
                     + "\n".join(map(str, bad)))


def test_no_import_cycle(graph):
    modules, imports = graph
    cycle = find_cycle(module_level_edges(imports, modules))
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_through_function_level_imports(graph):
    """A function-level import loads nothing at import time, but a cycle through one is
    still two modules that need each other (e.g. data_prep.settings -> data_prep.study ->
    data_prep.settings): the whole graph is acyclic too."""
    modules, imports = graph
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.source:
            edges[imp.source].add(imp.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle (lazy imports included): " + " -> ".join(cycle)


def test_model_code_imports_nothing_above_it(graph):
    _, imports = graph
    bad = upward_imports(imports, MODEL_CODE, ABOVE_MODEL)
    assert not bad, ("model code imports training, evaluation, serving or a command:\n"
                     + "\n".join(map(str, bad)))


def test_model_code_is_pure_keras(graph):
    _, imports = graph
    bad = upward_imports(imports, MODEL_CODE, ("tensorflow",))
    assert not bad, "model code imports TensorFlow:\n" + "\n".join(map(str, bad))


def test_importing_model_code_loads_nothing_above_it(graph):
    """What ``import covid_keras.drenet`` (or any model module) loads through the
    module-level imports of the modules it imports: no trainer, no TensorFlow."""
    modules, imports = graph
    bad = loads_above(imports, modules, MODEL_CODE, ABOVE_MODEL + ("tensorflow",))
    assert not bad, ("importing model code loads training, evaluation, serving, a command "
                     "or TensorFlow:\n" + "\n".join(f"{m}: {chain}" for m, chain in bad.items()))


def test_nothing_imports_a_command(graph):
    """The commands are the top and thin: neither a library module (cross_validation gets
    the trainer as an argument) nor another command imports one; what two commands share
    comes from a wing."""
    modules, imports = graph
    bad = imports_of_commands(imports, modules)
    assert not bad, "a module imports a command:\n" + "\n".join(map(str, bad))


def test_the_commands_hold_no_library_classes():
    bad = command_library_code(module_files())
    assert not bad, "a command defines a class (its place is a wing):\n" + "\n".join(bad)


def test_data_prep_imports_only_core(graph):
    _, imports = graph
    bad = imports_outside(imports, ("data_prep",), "covid_keras", DATA_PREP_MAY_IMPORT)
    assert not bad, ("data_prep imports covid_keras modules outside the core wing:\n"
                     + "\n".join(map(str, bad)))
    used = {imp.target for imp in imports
            if is_within(imp.source, "data_prep") and is_within(imp.target, "covid_keras")}
    assert used, "data_prep imports nothing of covid_keras: is the walk reading it?"


def test_only_serving_imports_data_prep(graph):
    _, imports = graph
    bad = data_prep_imports_below_serving(imports)
    assert not bad, ("a wing below serving imports data_prep:\n" + "\n".join(map(str, bad)))


# ------------------------------------------------------------------------- self-test
def _synthetic(tmp_path: Path, sources: dict[str, str]) -> tuple[set[str], list[Import]]:
    for name, text in sources.items():
        parts = name.split(".")
        path = tmp_path.joinpath(*parts[:-1], parts[-1] + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in {name.split(".")[0] for name in sources}:
        for folder in [tmp_path / pkg, *(tmp_path / pkg).rglob("*")]:
            if folder.is_dir() and not (folder / "__init__.py").exists():
                (folder / "__init__.py").write_text("")
    files = module_files(tmp_path, sorted({name.split(".")[0] for name in sources}))
    return set(files), import_graph(files)


def test_the_checks_catch_a_broken_rule(tmp_path):
    modules, imports = _synthetic(tmp_path, {
        # a cycle through `from pkg import module`, a relative import and `import a.b as c`
        "covid_keras.core.alpha": "from covid_keras.core import beta\n",
        "covid_keras.core.beta": "from . import gamma\n",
        "covid_keras.core.gamma": "import covid_keras.core.alpha as a\n",
        # a function-level import closes no cycle and loads nothing at import, but is an
        # upward import
        "covid_keras.model.drenet": ("import keras\n\ndef f():\n"
                                     "    from covid_keras.training.recipes import x\n"
                                     "    return x\n"),
        "covid_keras.training.recipes": "import covid_keras.model.drenet\n",
        # model code loading the trainer through another model module
        "covid_keras.model.losses": "from covid_keras.model import saving\n",
        "covid_keras.model.saving": "if True:\n    import covid_keras.training.recipes\n",
        "covid_keras.model.layers.head": "class A:\n    import tensorflow as tf\n",
        "covid_keras.core.schema": "",
        # sideways: two wings of the same rank
        "covid_keras.serving.signatures": "from covid_keras.training import recipes\n",
        # down: allowed (evaluation < training)
        "covid_keras.training.callbacks": "from covid_keras.evaluation import metrics\n",
        "covid_keras.evaluation.metrics": "from ..core import schema\n",
        "covid_keras.train": "from covid_keras.core import schema\n\nclass Run:\n    pass\n",
        "covid_keras.export": "from covid_keras.serving import signatures\n",  # down: allowed
        # one command importing another (function level): refused
        "covid_keras.web": "def main():\n    from covid_keras import predict\n",
        "covid_keras.predict": "from covid_keras.core import schema\n",
        "covid_keras.training.folds": "def f():\n    import covid_keras.train\n",
        "covid_keras.loose": "",  # outside the wings, not a command
        "covid_keras.evaluation.report": "def f():\n    import data_prep.writer\n",
        "data_prep.writer": "from covid_keras.core import schema\nfrom covid_keras import "
                            "model\nfrom covid_keras.model import drenet\n",
    })
    cycle = find_cycle(module_level_edges(imports, modules))
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"covid_keras.core.alpha", "covid_keras.core.beta",
                          "covid_keras.core.gamma"}
    without = {m for m in modules if m.split(".")[-1] not in ("alpha", "beta", "gamma")}
    assert find_cycle(module_level_edges(
        [i for i in imports if i.source in without], without)) is None

    up = upward_imports(imports, MODEL_CODE, ABOVE_MODEL)
    assert [(i.source, i.target, i.line, i.module_level) for i in up] == [
        ("covid_keras.model.drenet", "covid_keras.training.recipes", 4, False),
        ("covid_keras.model.saving", "covid_keras.training.recipes", 2, True)]
    tf = upward_imports(imports, MODEL_CODE, ("tensorflow",))
    assert [(i.source, i.target, i.module_level) for i in tf] == [
        ("covid_keras.model.layers.head", "tensorflow", True)]
    assert loads_above(imports, modules, MODEL_CODE, ABOVE_MODEL + ("tensorflow",)) == {
        "covid_keras.model.layers.head": "covid_keras.model.layers.head -> tensorflow",
        "covid_keras.model.losses": ("covid_keras.model.losses -> covid_keras.model.saving"
                                     " -> covid_keras.training.recipes"),
        "covid_keras.model.saving": "covid_keras.model.saving -> covid_keras.training.recipes",
    }
    # the wing rule: up (model -> training, twice; training -> a command), sideways
    # (serving -> training) and command -> command; not down, not within a wing
    assert sorted((i.source, i.target) for i in upward_wing_imports(imports, modules)) == [
        ("covid_keras.model.drenet", "covid_keras.training.recipes"),
        ("covid_keras.model.saving", "covid_keras.training.recipes"),
        ("covid_keras.serving.signatures", "covid_keras.training.recipes"),
        ("covid_keras.training.folds", "covid_keras.train"),
        ("covid_keras.web", "covid_keras.predict"),
    ]
    assert sorted((i.source, i.target, i.module_level)
                  for i in imports_of_commands(imports, modules)) == [
        ("covid_keras.training.folds", "covid_keras.train", False),
        ("covid_keras.web", "covid_keras.predict", False)]
    assert sorted(m for m in modules if wing_of(m) == "?") == ["covid_keras.loose"]
    assert command_library_code(module_files(tmp_path, ["covid_keras"])) == [
        "covid_keras.train.Run (line 3)"]
    assert [(i.source, i.target) for i in data_prep_imports_below_serving(imports)] == [
        ("covid_keras.evaluation.report", "data_prep.writer")]
    outside = imports_outside(imports, ("data_prep",), "covid_keras", DATA_PREP_MAY_IMPORT)
    assert [(i.source, i.target) for i in outside] == [
        ("data_prep.writer", "covid_keras.model"),
        ("data_prep.writer", "covid_keras.model.drenet")]

    # and graphs that keep the rules pass them
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert imports_outside(imports, ("data_prep",), "covid_keras",
                           DATA_PREP_MAY_IMPORT + ("covid_keras.model",)) == []
    down = [i for i in imports if i.source in ("covid_keras.training.callbacks",
                                               "covid_keras.evaluation.metrics",
                                               "covid_keras.train", "covid_keras.export")]
    assert len(down) == 4 and upward_wing_imports(down, modules) == []
    assert imports_of_commands(down, modules) == []
