"""Every module, file, definition and command that README.md and docs/*.md name exists.

The documents name code in three ways: repository paths (`medfusion/io/volume.py`,
`benchmarks/calibration.py`, `pipelines/*.yaml`), slash paths inside the package with an optional
definition (`io/case.load_case`, `run/result.py`, `models/meta (PackageMeta)`), and dotted names
(`train.distributed.process_device`, `medfusion.measure.lesions.label_lesions`). Each is resolved
against the working tree and, for a definition, against the module's source read by `ast` (a name
defined at the top level, or a method/field of a class defined there; a package's `__init__.py` may
re-export by import): nothing is imported. A dotted name whose first part is a stage and whose
second is a config field (`infer.window_overlap`, `preprocess.target_spacing_mm`) is a YAML key, not a
module. Commands (`medfusion run … --resume`, in code spans and fenced blocks) are checked against the
typer app's commands and options, built without running anything. The whole file takes ≈ 2 s.

A moved module leaves a doc naming its old place; this test fails with the file, the line and the
reference, so the doc is mended in the same commit as the move.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "medfusion"
DOCS = ("README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")))

# top-level folders of the repository whose paths the documents may name
REPO_DIRS = ("medfusion", "tests", "benchmarks", "pipelines", "docs", "sample_data")
# the first word of a dotted name that is a data file, not a module (`run.json`, `report.pdf`)
FILE_EXTENSIONS = {
    "csv", "dcm", "gz", "json", "jsonl", "md", "nii", "npz", "pdf", "png", "py", "safetensors", "txt", "yaml",
}  # fmt: skip

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SLASH = re.compile(rf"(?<![\w/.\-<>])((?:{IDENT}/)+)({IDENT})?(\.py)?((?:\.{IDENT})*)")
_DOTTED = re.compile(rf"(?<![\w/.\-<>])((?:medfusion\.)?{IDENT}(?:\.{IDENT})+)")
_REPO_PATH = re.compile(rf"(?<![\w/.\-<>])((?:{'|'.join(REPO_DIRS)})/[\w*./\-]*[\w*/])")


def subpackages(pkg: Path = PKG) -> set[str]:
    """Names of medfusion's sub-packages (folders with an `__init__.py`)."""
    return {p.parent.name for p in pkg.glob("*/__init__.py")}


def top_modules(pkg: Path = PKG) -> set[str]:
    """Names of medfusion's top-level modules (`config`, `cli`, `labels`, …)."""
    return {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"}


@functools.cache
def defined_names(path: Path) -> dict[str, set[str] | None]:
    """Top-level names of a Python file: {name: the names defined in its body (a class's methods and
    fields) or None (anything else)}. In a package's `__init__.py` imported names count (re-exports)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, set[str] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members: set[str] = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            out[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = None
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        out[n.id] = None
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and path.name == "__init__.py":
            for alias in node.names:
                out[(alias.asname or alias.name).split(".")[0]] = None
    return out


def check_definition(module: Path, attrs: list[str]) -> str | None:
    """None when `attrs` (e.g. ["Grid", "same_as"]) is defined in `module`, else why not."""
    if not attrs:
        return None
    names = defined_names(module)
    rel = module.relative_to(ROOT)
    if attrs[0] not in names:
        if module.name == "__init__.py":
            return f"{rel.parent} has no module {attrs[0]}.py and its __init__.py defines no {attrs[0]}"
        return f"{rel} defines no {attrs[0]}"
    members = names[attrs[0]]
    if len(attrs) > 1 and members is not None and attrs[1] not in members:
        return f"class {attrs[0]} in {rel} has no {attrs[1]}"
    return None


def resolve_module(parts: list[str], pkg: Path = PKG) -> tuple[Path | None, list[str]]:
    """The medfusion source file that the longest prefix of `parts` names, and the rest of `parts`
    (the definition inside it); (None, parts) when the first part is no module or folder there."""
    path = pkg
    for i, part in enumerate(parts):
        if (path / part).is_dir():
            path = path / part
            continue
        if (path / f"{part}.py").is_file():
            return path / f"{part}.py", parts[i + 1 :]
        init = path / "__init__.py"
        if path != pkg and init.is_file():
            return init, parts[i:]
        return None, parts
    init = path / "__init__.py"
    return (init if init.is_file() else path), []


# modules whose classes are the YAML configs: `infer.window_overlap` is a config key, not a module
CONFIG_MODULES = ("config.py", "train/config.py", "models/network.py")


def config_keys(pkg: Path = PKG) -> set[str]:
    """Field names of the config classes (`PipelineConfig`, `TrainConfig`, `NetConfig`, …)."""
    keys: set[str] = set()
    for rel in CONFIG_MODULES:
        path = pkg / rel
        if path.is_file():
            for members in defined_names(path).values():
                keys |= members or set()
    return keys


def _is_config_key(parts: list[str], pkg: Path) -> bool:
    """`infer.sliding_window`, `preprocess.target_spacing_mm`: a config section and key that reads like
    a module path (the section is named after the stage); a real module of that name wins."""
    if len(parts) < 2 or not (pkg / parts[0]).is_dir():
        return False
    is_module = (pkg / parts[0] / f"{parts[1]}.py").is_file() or (pkg / parts[0] / parts[1]).is_dir()
    return not is_module and parts[1] in config_keys(pkg)


def _resolve(parts: list[str], attrs: list[str], ref: str, pkg: Path) -> str | None:
    module, rest = resolve_module(parts, pkg)
    if module is None:
        return f"{ref}: no module medfusion/{'/'.join(parts)}"
    if module.is_dir():
        return None if not rest + attrs else f"{ref}: medfusion/{'/'.join(parts)} is a folder"
    return check_definition(module, rest + attrs)


def references(text: str, pkg: Path = PKG) -> list[tuple[int, str, str | None]]:
    """Every code reference in a document: (line number, the reference, None if it resolves, else why
    not). Only names whose first part is one of medfusion's sub-packages or top-level modules, or a
    repository folder, are references; anything else (`scores.json`, `OUT/<id>/`) is prose."""
    subs, tops = subpackages(pkg), top_modules(pkg)
    root = pkg.parent
    found: list[tuple[int, str, str | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        spans: list[tuple[int, int]] = []
        for m in _REPO_PATH.finditer(line):
            ref = m.group(1).rstrip(".")
            spans.append(m.span())
            if ref.startswith("medfusion/"):
                continue  # resolved below, definition included
            hit = any(root.glob(ref)) if "*" in ref else (root / ref).exists()
            found.append((lineno, ref, None if hit else f"{ref} does not exist"))
        for m in _SLASH.finditer(line):
            dirs, name, _, rest = m.groups()
            first = dirs.split("/")[0]
            if first == "medfusion":
                dirs = dirs[len("medfusion/") :]
                first = dirs.split("/")[0] if dirs else ""
            elif first not in subs or any(a <= m.start() < b for a, b in spans):
                continue
            parts = [p for p in dirs.split("/") if p] + ([name] if name else [])
            attrs = [a for a in (rest or "").split(".") if a]
            ref = m.group(0).rstrip(".")
            if attrs and attrs[0] in FILE_EXTENSIONS:
                continue  # e.g. run/report.pdf would be a data file
            found.append((lineno, ref, _resolve(parts, attrs, ref, pkg)))
        for m in _DOTTED.finditer(line):
            parts = m.group(1).split(".")
            if parts[0] == "medfusion":
                parts = parts[1:]
            if not parts or parts[0] not in subs | tops or (len(parts) > 1 and parts[1] in FILE_EXTENSIONS):
                continue
            if parts[-1] in FILE_EXTENSIONS or _is_config_key(parts, pkg):
                continue
            found.append((lineno, m.group(1), _resolve(parts, [], m.group(1), pkg)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_module_exists(doc: str) -> None:
    """Each module path, repository file and definition named in the document exists."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    refs = references(text)
    if doc == "docs/architecture.md":  # names most of the code: the finder must see it
        assert len(refs) > 100, f"{doc}: the reference finder found almost nothing ({len(refs)})"
    bad = [f"{doc}:{line}: {why}" for line, _, why in refs if why]
    assert not bad, "stale code references:\n" + "\n".join(bad)


def test_the_check_catches_a_stale_reference() -> None:
    """The finder flags a moved module, a missing definition, a missing method and a missing file,
    and passes live ones (the test above could not fail otherwise)."""
    text = "\n".join(
        [
            "`models/package.PackageMeta` and `medfusion/models/package.py`",  # module gone (0.9)
            "`train.loop.process_device`",  # moved to train/distributed.py
            "`io/volume.Grid.no_such_method`",
            "`benchmarks/no_such_script.py` and `pipelines/nothing_*.yaml`",
            "`io/volume.Grid.overlaps` · `package/ (load_package)` · `train.distributed.process_device`",
            "`medfusion/package/` and `pipelines/*.yaml`, `config.LEGACY_REGISTRATION`, scores.json, run.json",
        ]
    )
    refs = references(text)
    bad = {line for line, _, why in refs if why}
    good = {line for line, _, why in refs if not why}
    assert bad == {1, 2, 3, 4}, refs
    assert {5, 6} <= good and not any(line in bad for line in (5, 6)), refs
    assert sum(1 for line, _, why in refs if line == 1 and why) == 2


# --- commands ---

_COMMAND = re.compile(r"\bmedfusion((?:\s+[a-z][a-z-]*)+)((?:\s+(?!#)\S+)*)")


def cli_options() -> dict[str, set[str]]:
    """{"run": its options, "domain fit": …, "": the app's own}: from the typer app, built without
    running anything (the CLI imports torch only inside its commands)."""
    import typer

    from medfusion.cli import app

    root = typer.main.get_command(app)
    out: dict[str, set[str]] = {"": {o for p in root.params for o in getattr(p, "opts", [])} | {"--help"}}

    def walk(cmd: Any, name: str) -> None:  # typer's own (vendored) click Command or Group
        out[name] = {o for p in cmd.params for o in getattr(p, "opts", [])} | {"--help"} | out[""]
        for sub_name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, f"{name} {sub_name}".strip())

    walk(root, "")
    return out


def commands(text: str) -> list[tuple[int, str]]:
    """(line, command text) for each `medfusion …` in an inline code span or a fenced block; a fenced
    line starting with whitespace and `[` continues the command above it; a `#` ends it."""
    found: list[tuple[int, str]] = []
    fenced = False
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            code = line.split(" #")[0]
            if re.match(r"\s+\[", code) and found and found[-1][0] == lineno - 1:
                found[-1] = (lineno, found[-1][1] + " " + code.strip())
            elif code.lstrip().startswith("medfusion "):
                found.append((lineno, code.strip()))
        else:
            found += [(lineno, span) for span in re.findall(r"`(medfusion [^`]+)`", line)]
    return found


def check_command(command: str, options: dict[str, set[str]]) -> str | None:
    """None when `command`'s sub-command and every `--option` exist, else why not."""
    m = _COMMAND.match(command)
    if m is None:
        return None
    words = m.group(1).split()
    name = ""
    for w in words:
        if f"{name} {w}".strip() not in options:
            break
        name = f"{name} {w}".strip()
    if not name:
        return f"no command `medfusion {words[0]}`"
    unknown = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command)) - options[name])
    return f"`medfusion {name}` has no {', '.join(unknown)}" if unknown else None


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_exists(doc: str) -> None:
    """Each `medfusion <command> --option …` in the document is a command with those options."""
    options = cli_options()
    found = commands((ROOT / doc).read_text(encoding="utf-8"))
    if doc == "README.md":
        assert len(found) > 8, f"{doc}: the command finder found almost nothing ({len(found)})"
    bad = [f"{doc}:{line}: {why}" for line, cmd in found if (why := check_command(cmd, options))]
    assert not bad, "stale commands:\n" + "\n".join(bad)


def test_the_command_check_catches_a_stale_command() -> None:
    """A removed command and a removed option are caught; live ones pass."""
    options = cli_options()
    assert check_command("medfusion frobnicate --out X", options) == "no command `medfusion frobnicate`"
    assert "--no-such-flag" in (check_command("medfusion run P --out O --no-such-flag", options) or "")
    assert check_command("medfusion domain fit --help", options) is None
    assert check_command("medfusion train --config C --out O --package-only", options) is None
    text = "```\nmedfusion run P --out O\n    [--workers N | --bogus]\n```\n"
    assert [check_command(c, options) for _, c in commands(text)] == ["`medfusion run` has no --bogus"]
