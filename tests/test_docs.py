"""README.md and docs/ cannot drift from the code: the settings tables list
exactly `Config.SETTINGS` with their real defaults, the parameter tables list
exactly the request schemas' fields, every code block is run by a test or says
why it cannot be (`<!-- not-run: why -->`), and the blocks that talk to a
server are run here, as written, against README's Quick start server (SmolLM2)."""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import requests

from support import ROOT, readme_block

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^\s*```")
MARKER = re.compile(r"^\s*<!-- ([\w-]+):begin -->\s*$")
NOT_RUN = re.compile(r"^\s*<!-- not-run: .+ -->\s*$")


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as fh:
        return fh.read()


def _blocks(page: str):
    """(line number, language, line above the fence) of every fenced block."""
    lines = _read(page).splitlines()
    inside, above = False, ""
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            if not inside:
                yield number, line.strip()[3:].strip(), above
            inside = not inside
        elif line.strip() and not inside:
            above = line


def _tables(page: str) -> list[list[list[str]]]:
    """Every markdown table of a page: a list of rows, each a list of cells (header row and
    separator dropped)."""
    tables, rows = [], None
    for line in _read(page).splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if rows is None:
                rows = []          # the header
            elif not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows is not None:
            tables.append(rows)
            rows = None
    if rows is not None:
        tables.append(rows)
    return tables


def _table_after(page: str, heading: str) -> list[list[str]]:
    """The first table below `heading` in `page`."""
    text = _read(page)
    assert heading in text, f"{page} lost its section {heading!r}"
    rest = text.split(heading, 1)[1]
    if heading.startswith("|"):   # the table's own header row
        rest = "\n" + heading + rest
    start = rest.index("\n|")
    end = rest.find("\n\n", start + 1)
    block = rest[start + 1:end if end > 0 else None]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] for line in block.splitlines()]
    return [row for row in rows[2:]]


def _names(cell: str) -> set[str]:
    """`a`, `b.c` (chat) -> {"a", "b"}: the top-level fields a row documents."""
    return {name.split(".")[0] for name in re.findall(r"`([a-z_][a-z_.]*)`", cell)}


# -- links --------------------------------------------------------------------------------

def _anchors(page: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    text = re.sub(r"(?ms)^\s*```.*?^\s*```", "", _read(page))     # no headings inside code
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES)
def test_links_between_pages_resolve(page):
    """Every relative link names a file that exists, and a heading of it when it has
    an #anchor: moving a section cannot leave a dead link behind."""
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
        if re.match(r"[a-z]+:", target):
            continue                                   # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, linked)), f"{page}: {target} does not exist"
        if anchor and linked.endswith(".md"):
            assert anchor in _anchors(linked), f"{page}: {target}: no such heading in {linked}"


# -- settings --------------------------------------------------------------------------

def documented_default(default) -> str:
    """How a setting's default is written in the tables: `1`/`0` for switches, `unset`
    for an empty string or list, numbers without a useless `.0`."""
    if isinstance(default, bool):
        return "`1`" if default else "`0`"
    if default in ("", []):
        return "unset"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def _settings() -> dict:
    from llmhost.config import Config

    return {"LLMHOST_" + name: default for name, _parse, default in Config.SETTINGS}


def _setting_rows(page: str) -> dict[str, str]:
    """{variable: default cell} of every table row of `page` that starts with `LLMHOST_*`."""
    rows = {}
    for table in _tables(page):
        for row in table:
            found = re.fullmatch(r"`(LLMHOST_[A-Z0-9_]+)`", row[0])
            if found and len(row) >= 3:
                assert found[1] not in rows, f"{page} lists {found[1]} twice"
                rows[found[1]] = row[1]
    return rows


def test_configuration_lists_every_setting_with_its_default():
    """docs/configuration.md has one row per `Config.SETTINGS` entry and no other
    `LLMHOST_*` row. To add a setting: a row `| \\`LLMHOST_NAME\\` | <default> | meaning |`,
    the default written as `documented_default` writes it (the failure says it)."""
    settings, rows = _settings(), _setting_rows("docs/configuration.md")
    missing = [f"| `{name}` | {documented_default(default)} | ... |"
               for name, default in settings.items() if name not in rows]
    assert not missing, "docs/configuration.md lacks rows for:\n" + "\n".join(missing)
    unknown = sorted(set(rows) - set(settings))
    assert not unknown, f"docs/configuration.md lists settings that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES)
def test_setting_defaults_in_every_table_are_the_real_ones(page):
    """Any `LLMHOST_*` row of any page's table (a feature page's Settings table too)
    names a real setting and starts its default cell with the real default."""
    settings = _settings()
    for name, cell in _setting_rows(page).items():
        assert name in settings, f"{page}: {name} is not in Config.SETTINGS"
        want = documented_default(settings[name])
        assert cell.startswith(want), f"{page}: {name}'s default is {want}, the table says {cell!r}"


@pytest.mark.parametrize("page", PAGES)
def test_every_llmhost_variable_named_in_the_docs_exists(page):
    from llmhost.config import Config

    real = {"LLMHOST_" + name for name, *_ in Config.SETTINGS} | {"LLMHOST_TEST_LOGS"}
    named = set(re.findall(r"\bLLMHOST_[A-Z0-9_]*[A-Z0-9]\b", _read(page)))
    assert not named - real, f"{page} names settings that do not exist: {sorted(named - real)}"


# -- parameter tables ------------------------------------------------------------------

def _fields(*schemas) -> set[str]:
    return set().union(*(set(schema().fields) for schema in schemas))


def _documented(rows) -> set[str]:
    return set().union(*(_names(row[0]) for row in rows))


def test_chat_and_completions_parameters_table_is_the_schemas():
    from llmhost.schemas.chat import ChatCompletionRequestSchema
    from llmhost.schemas.completions import CompletionRequestSchema

    fields = _fields(ChatCompletionRequestSchema, CompletionRequestSchema)
    documented = _documented(_table_after("docs/api.md", "### Parameters"))
    assert fields - documented == set(), f"docs/api.md Parameters lacks {sorted(fields - documented)}"
    assert documented - fields == set(), f"docs/api.md Parameters lists {sorted(documented - fields)}"


def test_load_table_is_the_schema():
    from llmhost.schemas.models import LoadModelSchema

    documented = _documented(_table_after("docs/api.md", "## Loading models"))
    assert documented == _fields(LoadModelSchema)


def test_embeddings_table_is_the_schema():
    from llmhost.schemas.embeddings import EmbeddingRequestSchema

    documented = _documented(_table_after("docs/embeddings.md", "| field | meaning |"))
    assert documented == _fields(EmbeddingRequestSchema)


# -- code blocks -------------------------------------------------------------------------

def _test_sources() -> str:
    text = ""
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        with open(path, encoding="utf-8") as fh:
            text += fh.read()
    return text


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_is_run_or_says_why_not(page):
    """A block with a language is between `<!-- NAME:begin -->` / `<!-- NAME:end -->`
    markers that a test reads (`readme_block("NAME", ...)`), or right below a
    `<!-- not-run: why -->` line. Blocks without a language are sample output."""
    sources = _test_sources()
    for number, language, above in _blocks(page):
        if not language:
            continue
        marker = MARKER.match(above)
        if marker:
            assert f'"{marker[1]}"' in sources, f"{page}:{number}: no test reads block {marker[1]!r}"
        else:
            assert NOT_RUN.match(above), (f"{page}:{number}: a ```{language} block that no test runs; "
                                          "add begin/end markers and a test, or <!-- not-run: why -->")


def test_fallback_template_is_the_code():
    from llmhost.generation.prompt import FALLBACK_TEMPLATE

    assert readme_block("fallback-template", "docs/api.md") == FALLBACK_TEMPLATE.strip()


def test_preload_examples_parse():
    from llmhost.server import preload

    block = readme_block("preload-models", "docs/deploying.md")
    values = [shlex.split(line, comments=True)[0].partition("=")[2] for line in block.splitlines()]
    assert [preload.parse(v) for v in values] == [
        [{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "device": "cuda:0"},
         {"model": "/models/minilm", "device": "cpu"}],
        [{"model": "gpt2", "id": "small", "dtype": "float32", "keep_alive": 600}, {"model": "/models/x"}],
    ]


def test_env_file_and_kubernetes_settings_are_real_and_parse():
    """The systemd EnvironmentFile and the Kubernetes container: every LLMHOST_*
    they set exists, and Config reads the values without error."""
    import yaml

    from llmhost.config import Config

    env = {}
    for line in readme_block("env-file", "docs/deploying.md").splitlines():
        key, _, value = line.split("#")[0].strip().partition("=")
        env[key] = value
    container = yaml.safe_load(readme_block("kubernetes", "docs/deploying.md"))["containers"][0]
    assert container["command"] == ["gunicorn", "wsgi:app"]
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
    real = {"LLMHOST_" + name for name, *_ in Config.SETTINGS}
    named = {key for key in env if key.startswith("LLMHOST_")}
    assert named and named <= real, sorted(named - real)
    config = Config(env)
    assert config.PORT == 8000 and config.ALLOW_DOWNLOADS is False


# -- blocks run against README's Quick start server --------------------------------------

def _at(quickstart, text: str) -> str:
    return text.replace("http://127.0.0.1:8000", quickstart.url)


def _env(quickstart) -> dict:
    """The `llmhost` client commands talk to the test server."""
    return {**os.environ, "LLMHOST_URL": quickstart.url}


def _bash(quickstart, block: str) -> str:
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", _at(quickstart, block)], capture_output=True,
                         text=True, timeout=600, env=_env(quickstart))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _python(quickstart, block: str) -> str:
    out = subprocess.run([sys.executable, "-c", _at(quickstart, block)], capture_output=True, text=True,
                         timeout=600, env=_env(quickstart))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_walkthrough_commands_run(quickstart, tiny_models):
    block = readme_block("walkthrough-bash").replace("./my-model-folder", tiny_models["gpt2"])
    out = _bash(quickstart, block)
    assert '"smollm2"' in out and '"deleted"' in out, out
    assert "mine" not in requests.get(quickstart.url + "/v1/models", timeout=10).text


def test_api_examples_run(quickstart):
    out = _bash(quickstart, readme_block("api-curl", "docs/api.md"))
    assert '"object":"chat.completion"' in out.replace(" ", "") and "data: [DONE]" in out, out[:2000]
    assert '"text_completion"' in out, out[-2000:]
    out = _python(quickstart, readme_block("api-python", "docs/api.md"))
    lines = out.splitlines()
    assert lines[0].startswith("0 ") and any(line.startswith("1 ") for line in lines), out
    assert out.count("CompletionUsage(") == 2 and "1, 2, 3," in out, out


def test_tools_examples_run(quickstart):
    out = _python(quickstart, readme_block("tools-python", "docs/tools.md"))
    assert out.strip(), "the tool loop's final answer is printed"


def test_responses_examples_run(quickstart):
    out = _python(quickstart, readme_block("responses-python", "docs/responses.md"))
    assert out.strip()
    out = _python(quickstart, readme_block("agents", "docs/responses.md"))
    assert out.strip()


def test_embeddings_examples_run(quickstart):
    block = "\n".join(line for line in readme_block("embeddings-bash", "docs/embeddings.md").splitlines()
                      if not line.startswith("pip install"))   # installed: the `minilm_dir` fixture's package
    try:
        body = json.loads(_bash(quickstart, block).splitlines()[-1])
        assert [item["index"] for item in body["data"]] == [0, 1] and len(body["data"][0]["embedding"]) == 384
        assert _python(quickstart, readme_block("embeddings-python", "docs/embeddings.md")).strip().isdigit()
        # LangChain tokenizes with tiktoken on the client: its file comes from the package
        # here (no network), whichever test ran first
        from llmhost.generation.openai_tokens import ensure_offline
        ensure_offline()
        _python(quickstart, readme_block("embeddings-langchain", "docs/embeddings.md"))
    finally:
        requests.delete(quickstart.url + "/v1/models/minilm", timeout=60)
