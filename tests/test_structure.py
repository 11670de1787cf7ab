"""The package's shape: no import cycle, anywhere (also through imports inside functions)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'paella'


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph():
    """{module: the paella modules it imports, at module level or inside functions}."""
    modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == '__init__.py' else name.rpartition('.')[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ''
                if node.level:
                    base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
                named = [f'{base}.{a.name}' for a in node.names]
                # `from . import x` imports the module x (its package is already loaded, not re-entered)
                targets = named if all(t in modules for t in named) else named + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            # `from .x import y` names x (y is not a module)
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges - {'paella'} if name != 'paella' else edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 'done'
        stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {'paella.pipeline', 'paella.editing', 'paella.serve.web'} <= set(graph)
    assert 'paella.editing' in graph['paella.pipeline']                  # the graph does see imports
    assert {'paella.train.distributed', 'paella.train.state'} <= graph['paella.train.engine']
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_ruff_default_rules_are_clean_on_the_library():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-m', 'ruff', 'check', '--isolated', '--select', 'E4,E7,E9,F',
                          '--output-format', 'concise', str(PACKAGE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_file_and_function_reads_in_one_sitting():
    """No library file over 350 lines, no function over 80, and the sampler's loop fits on a screen."""
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob('*.py')):
        text = path.read_text()
        if len(text.splitlines()) > 350:
            long_files.append(f'{path.name}: {len(text.splitlines())}')
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f'{path.name}:{node.name}: {node.end_lineno - node.lineno + 1}')
            if isinstance(node, ast.FunctionDef) and path.name == 'sampler.py' and node.name == 'sample':
                body = node.body[1:] if ast.get_docstring(node) else node.body
                assert body[-1].end_lineno - body[0].lineno + 1 <= 40
    assert not long_files and not long_functions, long_files + long_functions
