"""Every public definition in medfusion/ has a docstring (#29).

Public: a module-level function or class, or a method of a public class, whose name does not start with
an underscore, in a module whose path has no part starting with one (``__init__.py`` counts as public).
A property's setter and ``@overload`` stubs are exempt (the getter and the implementation carry the
docstring).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "medfusion"

Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _exempt(node: Definition) -> bool:
    """A property setter/deleter or an `@overload` stub."""
    for d in node.decorator_list:
        if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter"):
            return True
        if isinstance(d, ast.Name | ast.Attribute) and (getattr(d, "id", None) or d.attr) == "overload":
            return True
    return False


def undocumented(source: str, where: str) -> list[str]:
    """ "WHERE:LINE NAME" for each public definition in the module text `source` without a docstring
    (NAME dotted for methods, e.g. Trainer.run)."""
    out: list[str] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if not isinstance(node, Definition) or node.name.startswith("_") or _exempt(node):
                continue
            if ast.get_docstring(node) is None:
                out.append(f"{where}:{node.lineno} {prefix}{node.name}")
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")

    visit(ast.parse(source).body, "")
    return out


def public_modules() -> list[Path]:
    """The .py files of medfusion/ whose path has no private part."""
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if not any(part.startswith("_") and part != "__init__.py" for part in p.relative_to(PACKAGE).parts)
    )


def test_the_check_names_what_lacks_a_docstring() -> None:
    src = '''
def documented():
    """Yes."""

def bare():
    pass

def _private():
    pass

class Public:
    """Yes."""

    def method(self):
        pass

    def _helper(self):
        pass

    @property
    def size(self):
        """Yes."""

    @size.setter
    def size(self, value):
        pass

class _Hidden:
    def method(self):
        pass
'''
    assert undocumented(src, "m.py") == ["m.py:5 bare", "m.py:14 Public.method"]


def test_every_public_definition_has_a_docstring() -> None:
    modules = public_modules()
    assert len(modules) > 50  # the package was found
    missing = [
        line for p in modules for line in undocumented(p.read_text(), str(p.relative_to(PACKAGE.parent)))
    ]
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)
