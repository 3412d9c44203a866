"""The package's shape: module-level imports form no cycle, and no module grows past 400 lines (one concept per
file; the config schema too is split by entry point)."""

import ast

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
