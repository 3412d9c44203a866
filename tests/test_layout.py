"""The package's shape: module-level imports form no cycle, no module imports from a floor above its own, no
module grows past 400 lines (one concept per file; the config schema too is split by entry point), and the
records' column names are written in diffguard_pl/records/columns.py only."""

import ast

import pytest

from helpers.paths import ROOT


def modules() -> dict:
    """Dotted name -> path, for diffguard_pl and callbacks/ (installed as diffguard_pl.callbacks)."""
    found = {}
    for path in [*(ROOT / "diffguard_pl").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "callbacks":
            parts.insert(0, "diffguard_pl")
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def module_imports(name: str, path, known: dict) -> set:
    """The project modules ``name`` imports at module level (imports inside functions are deferred on purpose)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            deps.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                deps.add(full if full in known else base)
    return {d for d in deps if d in known and d != name}


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_module_level_imports_form_no_cycle():
    known = modules()
    graph = {name: module_imports(name, path, known) for name, path in known.items()}
    assert len(graph) > 60 and graph["diffguard_pl.jobs.eval_job"]  # the walk sees the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_over_400_lines():
    sizes = {path.relative_to(ROOT): len(path.read_text().splitlines()) for path in modules().values()}
    assert len(sizes) > 60
    assert not {p: n for p, n in sizes.items() if n > 400}


# Rooms by floor, lowest first: a module may import from its own floor and the floors below, never from above
# (imports inside functions included). Two declarations sit on the ground floor whatever their room: the
# detector registry and the record columns, pure tables the config schema validates against.
FLOORS = (
    ("errors", "seeding", "console", "config", "config_shared", "config_checks", "config_training",
     "config_evaluation", "config_loading", "detectors.registry", "records.columns"),
    ("data", "models", "method"),
    ("detectors", "records"),
    ("modules", "callbacks", "profiling"),
    ("api", "integrations"),
    ("jobs", "cli"),  # the jobs and the command line: the tools' main() parse their arguments with cli
)


def floor(module: str) -> int:
    """The floor of a dotted module name of the package (its room's, or a ground-floor declaration's)."""
    inside = module.removeprefix("diffguard_pl.")
    rooms = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}
    matches = [room for room in rooms if inside == room or inside.startswith(room + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no room of FLOORS: add its room to tests/test_layout.py")
    return rooms[max(matches, key=len)]


def every_import(path) -> set:
    """The project modules a file imports anywhere (module level and inside functions), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("diffguard_pl.")}


def test_no_module_imports_from_a_floor_above_its_own():
    known = modules()
    upward = []
    for name, path in known.items():
        if name == "diffguard_pl":
            continue
        for imported in every_import(path):
            target = next((imported[:i] for i in _prefix_ends(imported) if imported[:i] in known), None)
            if target and target != "diffguard_pl" and floor(target) > floor(name):
                upward.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
    assert not upward, "\n".join(upward)


def _prefix_ends(dotted: str) -> list:
    """Where the dotted name's prefixes end, longest first (``a.b.c``: after c, after b, after a)."""
    return [len(dotted)] + [i for i in range(len(dotted) - 1, 0, -1) if dotted[i] == "."]


def test_the_floor_check_sees_an_upward_import():
    assert floor("diffguard_pl.modules.evaluator") > floor("diffguard_pl.records.store") > floor("diffguard_pl.method")
    assert floor("diffguard_pl.records.columns") == floor("diffguard_pl.config") == 0
    with pytest.raises(AssertionError, match="in no room"):
        floor("diffguard_pl.nowhere")


# Column names that are not ordinary words: written only in records/columns.py. (id, set, split, label, pred and
# depth are also the batch's keys and everyday words; the declaration names them, and check_columns refuses an
# undeclared column at the first write.)
COLUMN_WORDS = ("synthesis_pred", "reference_pred", "round_trip_psnr", "unet_evals")
COLUMN_PREFIXES = ("diffguard/", "diffguard+", "oracle-", "curve/", "@input")


def test_column_names_are_written_in_the_declaration_only():
    from test_registry import code_strings

    declaration = ROOT / "diffguard_pl" / "records" / "columns.py"
    offenders = []
    for path in [*(ROOT / "diffguard_pl").rglob("*.py"), *(ROOT / "callbacks").glob("*.py")]:
        if path == declaration:
            continue
        for text in code_strings(path):
            if text in COLUMN_WORDS or any(text.startswith(p) or text.endswith(p) for p in COLUMN_PREFIXES):
                offenders.append(f"{path.relative_to(ROOT)}: {text!r}")
    assert not offenders, "\n".join(offenders)


def test_an_undeclared_column_is_refused():
    from diffguard_pl.records.columns import check_columns

    check_columns(["id", "pred", "diffguard/l2", "diffguard/ssim@input", "oracle-paper/diffguard/l1", "curve/psnr",
                   "vim", "diffguard+vim", "diffguard"])
    with pytest.raises(ValueError, match=r"\['confidence'\] are declared nowhere"):
        check_columns(["id", "confidence"])


def test_setup_cfg_installs_every_package():
    """A room missing from setup.cfg's list works in an editable install and breaks in a wheel."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = set(parser["options"]["packages"].split())
    rooms = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffguard_pl").rglob("__init__.py")}
    assert rooms | {"diffguard_pl.callbacks"} == listed
