"""The docs cannot drift from the code: README.md and docs/*.md are read and everything they name is checked.

- every relative link (and image) exists; a `#fragment` into a Markdown file matches one of its headings;
- every `configs/NAME.yaml` loads with `jaxctx.config.load`; a bare `NAME.yaml` in backticks is a file in
  `configs/` (a workdir's `config.yaml` excepted); every shipped config is listed in the README;
- every command starting with `jaxctx ` or `python train.py` -- in ```bash blocks, on `$ ` lines of any block,
  and in backticks in tables and prose -- parses with the real parser (`jaxctx.cli.build_parser().parse_args`,
  `jaxctx.train.cli.parse_args`): an unknown flag, subcommand or choice fails. Only argparse runs;
- every `--set section.key=value` key and every backticked `model.KEY` / `data.KEY` / `train.KEY` /
  `parallel.KEY` is a field of its `jaxctx.config.SECTIONS` dataclass;
- every `jaxctx/...`, `tests/...`, `benchmarks/...`, `tpu/...` and `.ci/...` path exists (`{a,b}` and `*` expand);
- every `tpu/NAME ...` command names a launch-kit script, and each `--flag` it shows is in that script's `--help`.

From documented text to argv (see `command_argvs`): shell syntax goes through `shlex` (comments, `\\` line
continuations, `&&`, `||`, `;`, `|`, `&` and leading `VAR=value` assignments are removed); `[...]` optional groups
are expanded (brackets dropped, contents kept, so every optional flag is checked too); a token `a|b|c` is checked
once per alternative; a standalone `...` ("more arguments") is dropped and marks the command elided. Elided
commands and commands quoted in prose may leave out required arguments (they are filled with samples) and may
stop at a command group (`jaxctx bench`). A placeholder value (upper case, like FILE, DIR, N, GIB, HF_DIR, or
containing `...`, like `T,T,...`) given to an option that has a type or choices is replaced by a value of that
type (the first of `2`, `2.0` its type accepts) or its first choice; string options and positionals accept any
text, so `FILE`, `OUT_DIR` or `CKPT_OR_WORKDIR` stay as written.

Each check is a pure function of (name, text) returning a list of problems, so the self-tests at the end can
plant a wrong flag, key, path or link and see it reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import io
import os
import re
import shlex

import pytest

from jaxctx import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_SEPARATORS = {"&&", "||", ";", "|", "&"}
FILE_EXTENSIONS = {"py", "yaml", "json", "jsonl", "md", "safetensors", "bin", "pt", "txt", "csv", "png"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*([.=,][A-Za-z0-9_.=,]*)?$|\.\.\.")


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------
# Markdown: fenced blocks, prose, inline code spans, headings
# ----------------------------------------------------------------------------------------------------------

def split_markdown(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(prose with fenced blocks blanked out, [(language, block body)])."""
    prose, blocks, lang, body = [], [], None, []
    for line in text.split("\n"):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, body = line.strip()[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body)))
                lang = None
            prose.append("")
        elif lang is None:
            prose.append(line)
        else:
            body.append(line)
            prose.append("")
    return "\n".join(prose), blocks


def code_spans(prose: str) -> list[tuple[str, bool]]:
    """[(span text with whitespace collapsed, whether it sits in a table row)]; prose spans may wrap lines."""
    chunks: list[tuple[str, bool]] = []  # table rows one by one; runs of other lines joined (a paragraph)
    for line in prose.split("\n"):
        in_table = line.lstrip().startswith("|")
        if in_table or not line.strip() or not chunks or chunks[-1][1]:
            chunks.append((line, in_table))
        else:
            chunks[-1] = (chunks[-1][0] + "\n" + line, False)
    spans = []
    for chunk, in_table in chunks:
        for m in re.finditer(r"(`+)(.+?)\1", chunk, flags=re.S):
            spans.append((" ".join(m.group(2).split()), in_table))
    return spans


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_markdown(text)
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", prose, flags=re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


# ----------------------------------------------------------------------------------------------------------
# (a) links
# ----------------------------------------------------------------------------------------------------------

def link_problems(rel: str, text: str) -> list[str]:
    prose, _ = split_markdown(text)
    prose = re.sub(r"(`+).+?\1", "", prose, flags=re.S)  # no links inside code spans
    base = os.path.dirname(os.path.join(ROOT, rel))
    problems = []
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(base, path)) if path else os.path.join(ROOT, rel)
        if not os.path.exists(full):
            problems.append(f"{rel}: link target {target} does not exist")
        elif fragment and full.endswith(".md") and fragment not in anchors(open(full, encoding="utf-8").read()):
            problems.append(f"{rel}: link {target}: no heading #{fragment} in {os.path.relpath(full, ROOT)}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# (b) configs, (e) paths
# ----------------------------------------------------------------------------------------------------------

def config_problems(rel: str, text: str, root: str = ROOT) -> list[str]:
    problems = []
    names = set(re.findall(r"(?<![\w/.-])(configs/[\w.-]+\.yaml)", text))
    prose, _ = split_markdown(text)
    for span, _ in code_spans(prose):
        if re.fullmatch(r"[\w.-]+\.yaml", span) and span != "config.yaml":
            names.add(f"configs/{span}")
    for name in sorted(names):
        if re.fullmatch(r"configs/[A-Z_]+\.yaml", name):  # configs/NAME.yaml: a placeholder
            continue
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            problems.append(f"{rel}: {name} does not exist")
            continue
        try:
            config_lib.load(path)
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"{rel}: {name} does not load: {err}")
    return problems


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [out for alt in m.group(1).split(",")
            for out in _expand_braces(pattern[:m.start()] + alt + pattern[m.end():])]


def path_problems(rel: str, text: str, root: str = ROOT) -> list[str]:
    problems = []
    for m in re.finditer(r"(?<![\w/.-])((?:jaxctx|tests|benchmarks|tpu|\.ci)/[\w/.*{},-]*)", text):
        name = m.group(1).rstrip(".,;:")
        for pattern in _expand_braces(name):
            if not glob.glob(os.path.join(root, pattern)):
                problems.append(f"{rel}: path {pattern} does not exist")
    return problems


# ----------------------------------------------------------------------------------------------------------
# (c) commands
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Command:
    program: str  # "jaxctx" or "train.py"
    argv: list[str]  # tokens after the program, brackets already expanded, one alternative chosen
    lenient: bool  # may omit required arguments (elided with `...`, or quoted in prose)
    source: str  # the documented text, for messages


def _shell_segments(line: str) -> list[list[str]]:
    tokens = shlex.split(line, comments=True)
    segments, current = [], []
    for tok in tokens:
        if tok in SHELL_SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    out = []
    for seg in segments:
        while seg and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", seg[0]):  # VAR=value cmd
            seg = seg[1:]
        if seg:
            out.append(seg)
    return out


def _to_commands(tokens: list[str], lenient: bool, source: str) -> list[Command]:
    if tokens[:1] == ["jaxctx"]:
        program, rest = "jaxctx", tokens[1:]
    elif len(tokens) >= 2 and tokens[0] in ("python", "python3") and tokens[1] == "train.py":
        program, rest = "train.py", tokens[2:]
    else:
        return []
    expanded = []
    for tok in rest:  # [--flag VALUE [--other]] -> --flag VALUE --other
        tok = tok.lstrip("[").rstrip("]")
        if tok:
            expanded.append(tok)  # a `...` stays: prepare_argv tells a placeholder value from "more arguments"
    alternatives = [tok.split("|") if "|" in tok else [tok] for tok in expanded]
    width = max((len(a) for a in alternatives), default=1)
    variants = []
    for i in range(width):  # variant i takes alternative i of every token that has that many (else the first)
        argv = [alts[i] if i < len(alts) else alts[0] for alts in alternatives]
        if argv not in variants:
            variants.append(argv)
    return [Command(program, argv, lenient, source) for argv in variants]


def command_argvs(text: str) -> list[Command]:
    """Every documented `jaxctx ...` / `python train.py ...` command of one Markdown text."""
    prose, blocks = split_markdown(text)
    commands = []
    for lang, body in blocks:
        body = body.replace("\\\n", " ")
        for line in body.split("\n"):
            stripped = line.strip()
            if stripped.startswith("$ "):
                stripped = stripped[2:]
            elif lang not in ("bash", "sh", "shell", "console"):
                continue
            if not stripped or stripped.startswith("#"):
                continue
            for seg in _shell_segments(stripped):
                commands += _to_commands(seg, lenient=False, source=stripped)
    for span, in_table in code_spans(prose):
        if span.startswith(("jaxctx ", "python train.py", "python3 train.py")):
            try:
                segments = _shell_segments(span)
            except ValueError:  # unbalanced quotes in prose
                segments = [span.split()]
            for seg in segments:
                commands += _to_commands(seg, lenient=not in_table, source=span)
    return commands


@functools.lru_cache(maxsize=None)
def _parsers():
    from jaxctx import cli
    from jaxctx.train.cli import add_arguments
    train_parser = argparse.ArgumentParser(prog="train.py")  # mirror of train.cli.parse_args, to look actions up
    add_arguments(train_parser)
    return {"jaxctx": cli.build_parser(), "train.py": train_parser}


def _subparsers_action(parser):
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _sample(action: argparse.Action) -> str:
    if action.choices:
        return str(next(iter(action.choices)))
    if action.type is None or action.type is str:
        return "X"
    for candidate in ("2", "2.0"):
        try:
            action.type(candidate)
            return candidate
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            pass
    return "X"


def prepare_argv(cmd: Command) -> list[str] | None:
    """Placeholders replaced by typed samples; for lenient commands required arguments filled. None: only a
    command group was named (`jaxctx bench`), nothing to parse."""
    parser = _parsers()[cmd.program]
    argv, i, lenient = list(cmd.argv), 0, cmd.lenient
    while (sub := _subparsers_action(parser)) is not None and i < len(argv) and argv[i] in sub.choices:
        parser = sub.choices[argv[i]]
        i += 1
    if sub is not None and i == len(argv) and lenient:
        return None
    given, positionals_given = set(), 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            flag, eq, value = tok.partition("=")
            action = parser._option_string_actions.get(flag)
            given.add(flag)
            if action is not None and action.nargs != 0:
                if eq:
                    if PLACEHOLDER.search(value) and (action.choices or action.type not in (None, str)):
                        argv[i] = f"{flag}={_sample(action)}"
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    value = argv[i + 1]
                    if PLACEHOLDER.search(value) and (action.choices or action.type not in (None, str)):
                        argv[i + 1] = _sample(action)
                    i += 1
        elif tok == "...":  # not an option's value: "more arguments" -- dropped, the command is elided
            del argv[i]
            lenient = True
            continue
        else:
            positionals_given += 1
        i += 1
    if lenient:
        positionals = [a for a in parser._actions if not a.option_strings and a is not sub]
        for action in positionals[positionals_given:]:
            if action.nargs not in ("?", "*"):
                argv.append(_sample(action))
        for action in parser._actions:
            if action.required and action.option_strings and not given & set(action.option_strings):
                argv += [action.option_strings[0]] + ([_sample(action)] if action.nargs != 0 else [])
        for group in parser._mutually_exclusive_groups:  # e.g. --checkpoint | --hf: one is required
            flags = {f for action in group._group_actions for f in action.option_strings}
            if group.required and not given & flags:
                action = group._group_actions[0]
                argv += [action.option_strings[0]] + ([_sample(action)] if action.nargs != 0 else [])
    return argv


def parse(cmd: Command, argv: list[str]) -> argparse.Namespace:
    """The real parse: `jaxctx.cli.build_parser().parse_args` or `jaxctx.train.cli.parse_args`."""
    if cmd.program == "jaxctx":
        return _parsers()["jaxctx"].parse_args(argv)
    from jaxctx.train import cli as train_cli
    return train_cli.parse_args(argv)


def command_problems(rel: str, text: str) -> list[str]:
    problems = []
    for cmd in command_argvs(text):
        argv = prepare_argv(cmd)
        if argv is None:
            continue
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parse(cmd, argv)
        except SystemExit as exit_:
            if exit_.code:
                last = (err.getvalue().strip().splitlines() or ["exit %s" % exit_.code])[-1]
                problems.append(f"{rel}: `{cmd.source}` -> {cmd.program} {' '.join(argv)}: {last}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# (c') tpu/ launch-kit commands
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _tpu_help(script: str) -> str | None:
    """`tpu/SCRIPT --help` (None: no such script). The scripts are bash; --help runs no gcloud."""
    path = os.path.join(ROOT, "tpu", script)
    if not os.path.isfile(path) or script.endswith(".sh"):
        return None
    import subprocess
    done = subprocess.run(["bash", path, "--help"], capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else None


def tpu_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """[(documented line, script name, its argv)] for every `tpu/NAME ...` command of one Markdown text."""
    prose, blocks = split_markdown(text)
    lines = [line.strip().removeprefix("$ ") for lang, body in blocks if lang in ("bash", "sh", "shell", "console")
             for line in body.replace("\\\n", " ").split("\n")]
    lines += [span.replace("\\|", "|") for span, _ in code_spans(prose) if span.startswith("tpu/")]
    commands = []
    for line in lines:
        try:
            segments = _shell_segments(line)
        except ValueError:
            segments = [line.split()]
        for seg in segments:
            m = re.fullmatch(r"tpu/([\w-]+)", seg[0]) if seg else None  # tpu/common.sh: a file, not a command
            if m:
                commands.append((line, m.group(1), seg[1:]))
    return commands


def tpu_command_problems(rel: str, text: str) -> list[str]:
    """Every documented `tpu/NAME ...` command names a script, and each of its --flags is in that script's --help."""
    problems = []
    for line, script, argv in tpu_commands(text):
        help_text = _tpu_help(script)
        if help_text is None:
            problems.append(f"{rel}: `{line}`: tpu/{script} is not a script with --help")
            continue
        for tok in argv:
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", tok):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                    problems.append(f"{rel}: `{line}`: tpu/{script} has no flag {flag}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# (d) config keys
# ----------------------------------------------------------------------------------------------------------

def _key_problem(key: str) -> str | None:
    section, _, field = key.partition(".")
    if section not in config_lib.SECTIONS:
        return f"unknown config section {section!r} in {key}"
    names = {f.name for f in dataclasses.fields(config_lib.SECTIONS[section])}
    if field not in names:
        return f"unknown config key {key}"
    return None


def config_key_problems(rel: str, text: str) -> list[str]:
    keys = set()
    for m in re.finditer(r"--set[ =]['\"]?([\w.]+)=", text):
        keys.add(m.group(1))
    for cmd in command_argvs(text):
        for a, b in zip(cmd.argv, cmd.argv[1:]):
            if a == "--set" and "=" in b:
                keys.add(b.split("=", 1)[0])
    prose, _ = split_markdown(text)
    for span, _ in code_spans(prose):
        m = re.fullmatch(r"(model|data|train|parallel)\.(\w+)(\s*[:=].*)?", span)
        if m and m.group(2) not in FILE_EXTENSIONS:  # `train.py`, `model.safetensors` are files
            keys.add(f"{m.group(1)}.{m.group(2)}")
    problems = []
    for key in sorted(keys):
        if "." not in key or key.split(".")[0] == "section":  # k=v, KEY=VALUE, section.key=value: placeholders
            continue
        problem = _key_problem(key)
        if problem:
            problems.append(f"{rel}: {problem}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# The tests: the shipped docs
# ----------------------------------------------------------------------------------------------------------

CHECKS = {"links": link_problems, "configs": config_problems, "paths": path_problems,
          "commands": command_problems, "config_keys": config_key_problems, "tpu_commands": tpu_command_problems}


def test_docs_exist_and_readme_links_every_page():
    assert len(DOC_FILES) > 1, "no docs/*.md found"
    readme = _read("README.md")
    unlinked = [rel for rel in DOC_FILES[1:] if f"]({rel})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_docs(check):
    problems = [p for rel in DOC_FILES for p in CHECKS[check](rel, _read(rel))]
    assert not problems, "\n".join(problems)


def test_docs_name_commands():
    """Guard against the extraction silently finding nothing (then every check above would pass)."""
    commands = [c for rel in DOC_FILES for c in command_argvs(_read(rel))]
    named = {" ".join([c.program] + c.argv[:2]) for c in commands}
    for expected in ("train.py", "jaxctx convert from-hf", "jaxctx bench max-context", "jaxctx data inspect"):
        assert any(n.startswith(expected) for n in named), (expected, sorted(named))
    assert len(commands) >= 20
    scripts = {script for rel in DOC_FILES for _, script, _ in tpu_commands(_read(rel))}
    assert {"create", "setup", "launch", "babysit", "logs", "status", "stop", "delete"} <= scripts, scripts


def test_every_config_is_in_the_readme():
    readme = _read("README.md")
    missing = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
               if f"`{os.path.relpath(p, ROOT)}`" not in readme]
    assert not missing, f"README.md's configs table does not list {missing}"


# ----------------------------------------------------------------------------------------------------------
# Self-tests: planted mistakes are reported
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, expected", [
    ("```bash\njaxctx plan --confg configs/tiny.yaml\n```", "unrecognized arguments: --confg"),
    ("| `jaxctx bench max-context --config FILE --budget-gb N --varaints x` | |", "--varaints"),
    ("| `jaxctx bench traim --config FILE` | |", "invalid choice: 'traim'"),
    ("```bash\npython train.py --config FILE --steps 3\n```", "unrecognized arguments: --steps"),
    ("```bash\njaxctx convert to-hf SRC OUT --dtype float64\n```", "invalid choice: 'float64'"),
    ("```bash\njaxctx bench max-context --config FILE --budget-gb lots\n```", "invalid float value: 'lots'"),
    ("`jaxctx tokenizer train --vocab-sise N` in prose", "--vocab-sise"),
    ("```bash\njaxctx convert from-hf HF_DIR\n```", "required: OUT_DIR"),
])
def test_a_wrong_command_is_reported(doc, expected):
    problems = command_problems("planted.md", doc)
    assert len(problems) == 1 and expected in problems[0], problems


def test_placeholders_and_optional_groups_parse():
    doc = ("```bash\njaxctx convert from-hf HF_DIR OUT_DIR [--force] [--max-positions N "
           "[--extend-positions tile|copy|interpolate]]\n"
           "XLA_FLAGS=--x jaxctx plan --config configs/tiny.yaml --buffers 3 && python train.py  # comment\n```\n"
           "| `jaxctx bench attention ...` | `jaxctx bench train --config FILE --seq-lens ...` |\n\n"
           "Prose: `jaxctx tokenizer train` and `jaxctx bench`.\n")
    commands = command_argvs(doc)
    assert sum(c.argv[:2] == ["convert", "from-hf"] for c in commands) == 3  # one per --extend-positions choice
    assert command_problems("planted.md", doc) == []


@pytest.mark.parametrize("doc, expected", [
    ("```bash\njaxctx plan --set model.d_modl=3\n```", "unknown config key model.d_modl"),
    ("Set `train.stepz: 3`.", "unknown config key train.stepz"),
    ("`--set modle.d_model=3`", "unknown config section 'modle'"),
])
def test_a_wrong_config_key_is_reported(doc, expected):
    problems = config_key_problems("planted.md", doc)
    assert len(problems) == 1 and expected in problems[0], problems
    assert config_key_problems("planted.md", "`--set section.key=value`, `--set k=v`, `model.d_model`") == []


def test_a_wrong_path_config_or_link_is_reported(tmp_path):
    assert "configs/nope.yaml does not exist" in config_problems("planted.md", "see configs/nope.yaml")[0]
    assert "configs/nope.yaml" in config_problems("planted.md", "the `nope.yaml` file")[0]
    assert config_problems("planted.md", "a workdir's `config.yaml`, `configs/tiny.yaml`") == []
    bad = tmp_path / "configs" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("model:\n  d_modl: 3\n")
    assert "did you mean 'd_model'" in config_problems("planted.md", "configs/bad.yaml", root=str(tmp_path))[0]
    assert path_problems("planted.md", "`jaxctx/ops/nope.py`, `tests/ops/`") == [
        "planted.md: path jaxctx/ops/nope.py does not exist"]
    assert len(path_problems("planted.md", "benchmarks/results/cpu-2core-attention.{json,csv,pdf}")) == 1
    assert link_problems("README.md", "[a](docs/nope.md) [b](docs/kernels.md#nope) [c](https://x.org)") == [
        "README.md: link target docs/nope.md does not exist",
        "README.md: link docs/kernels.md#nope: no heading #nope in docs/kernels.md"]


def test_a_wrong_tpu_command_is_reported():
    doc = ("```bash\ntpu/launch configs/tiny.yaml --sett train.steps=3\ntpu/nope\n```\n"
           "| `tpu/create [--spot\\|--reservd]` | `tpu/logs --worker N --follow` |\n")
    assert tpu_command_problems("planted.md", doc) == [
        "planted.md: `tpu/launch configs/tiny.yaml --sett train.steps=3`: tpu/launch has no flag --sett",
        "planted.md: `tpu/nope`: tpu/nope is not a script with --help",
        "planted.md: `tpu/create [--spot|--reservd]`: tpu/create has no flag --reservd"]
    assert path_problems("planted.md", "`tpu/launch` and `tpu/lunch`") == ["planted.md: path tpu/lunch does not exist"]
