"""Built kernels are kept for the next process (engine/native.py compile_library,
LLMHOST_CACHE_DIR): built once, loaded from the cache after, built again for an
edited source, other flags or a damaged file, and not kept with the cache off.
A tiny C file and the system's real compiler, through a wrapper that logs each
call."""
import os
import shutil
import stat
import subprocess
import sys

import pytest

from llmhost.engine import native

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")

FLAGS = ("-O1", "-shared", "-fPIC")


@pytest.fixture
def built(tmp_path, monkeypatch):
    """(compile a source, its compiler calls, the cache's folder of libraries)."""
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "cc"
    real = shutil.which("cc") or shutil.which("gcc")
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("LLMHOST_CACHE_DIR", str(tmp_path / "cache"))

    def build(answer: int, flags=FLAGS):
        source = tmp_path / f"answer{answer}.c"
        source.write_text(f"int answer(void) {{ return {answer}; }}\n")
        lib, why = native.compile_library(str(source), flags)
        assert lib is not None, why
        assert lib.answer() == answer
        return lib

    def compiles() -> int:
        lines = log.read_text().splitlines() if log.exists() else []
        return sum("-o" in line.split() for line in lines)

    return build, compiles, tmp_path / "cache" / "native"


def test_a_library_is_built_once_and_loaded_from_the_cache(built):
    build, compiles, folder = built
    build(1)
    assert compiles() == 1
    assert [n for n in os.listdir(folder) if n.endswith(".so")] and \
        not [n for n in os.listdir(folder) if n.startswith("llmhost-")]   # no build folder left
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700   # loaded as code: its owner's alone
    build(1)
    assert compiles() == 1   # the same source and flags: from the cache
    build(2)   # another source
    build(1, FLAGS + ("-DOTHER",))   # other flags (LLMHOST_CPU_FLAGS' builds)
    assert compiles() == 3 and len(os.listdir(folder)) == 3


def test_a_new_process_loads_the_kept_library_and_a_damaged_one_is_built_again(built, tmp_path):
    build, compiles, folder = built
    build(7)
    script = ("import sys; from llmhost.engine import native; "
              "lib, why = native.compile_library(sys.argv[1], tuple(sys.argv[2:])); print(lib.answer())")

    def in_a_new_process() -> str:
        return subprocess.run([sys.executable, "-c", script, str(tmp_path / "answer7.c"), *FLAGS],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert in_a_new_process() == "7" and compiles() == 1
    (kept,) = os.listdir(folder)
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not a library")
    os.replace(damaged, folder / kept)   # a new file: this process's mapping keeps the old one
    assert in_a_new_process() == "7" and compiles() == 2
    assert in_a_new_process() == "7" and compiles() == 2   # the rebuilt one is kept


def test_no_library_is_kept_with_the_cache_off(built, tmp_path, monkeypatch):
    build, compiles, folder = built
    monkeypatch.setenv("LLMHOST_CACHE_DIR", "off")
    build(3)
    build(3)
    assert compiles() == 2 and not os.path.exists(tmp_path / "cache")


def test_the_cache_keeps_the_most_recently_used(built, monkeypatch):
    build, compiles, folder = built
    monkeypatch.setattr(native, "KEPT", 2)
    build(4)
    build(5)
    os.utime(next(folder.glob("answer4-*.so")), (1e9, 1e9))   # the older of the two
    os.utime(next(folder.glob("answer5-*.so")), (1e9 + 20, 1e9 + 20))
    build(4)   # used again: now the newest
    build(6)
    assert sorted(n.split("-")[0] for n in os.listdir(folder)) == ["answer4", "answer6"]
    assert compiles() == 3


def test_a_prebuilt_library_is_built_once_however_many_threads_ask(built, tmp_path, monkeypatch):
    """native.prebuild starts a load's builds in threads; the load asking for the same
    library meanwhile waits for that build instead of compiling it again."""
    build, compiles, folder = built
    monkeypatch.setenv("LLMHOST_CACHE_DIR", "off")   # every build a compile
    source = tmp_path / "answer9.c"
    source.write_text("int answer(void) { return 9; }\n")
    calls = []

    @native.once
    def library():
        calls.append(1)
        return native.compile_library(str(source), FLAGS)

    native.prebuild(library, library)
    lib, why = library()
    assert lib.answer() == 9 and library() == (lib, why)
    assert calls == [1] and compiles() == 1


def test_a_folder_others_can_write_to_keeps_nothing(built, tmp_path, monkeypatch, caplog):
    """What the cache holds is loaded as code: a cache others could write to (a
    world-writable root that is not sticky, a kind folder group or others can
    write to) is not used, with one warning; a sticky world-writable root (as
    /tmp) is, its kind folder made this user's alone."""
    build, compiles, _ = built
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("LLMHOST_CACHE_DIR", str(shared))
    build(3)
    build(3)
    assert compiles() == 2 and not os.listdir(shared)   # built each time, nothing kept
    assert [r.message for r in caplog.records].count(
        f"LLMHOST_CACHE_DIR: nothing is kept in {shared}: other users can write to it; "
        "use a folder only this user can write to") == 1
    shared.chmod(0o1777)   # sticky, as /tmp
    build(3)
    build(3)
    assert compiles() == 3 and stat.S_IMODE(os.stat(shared / "native").st_mode) == 0o700
    (shared / "native").chmod(0o770)   # its entries' folder, writable by the group
    build(4)
    build(4)
    assert compiles() == 5 and len(os.listdir(shared / "native")) == 1


def test_a_load_prebuilds_the_kernels_its_model_runs(tiny_models, smollm2_gguf, tmp_path, monkeypatch):
    """A CPU load starts the builds its steps will ask for: engine/omp.c (every
    step spreads its threads), a Llama's attention (engine/llamastep.py runs
    Llama only), not another architecture's; an int4 load q4kernel too. The
    architecture comes from config.json, or from a GGUF file's first metadata
    entries (gguf.architecture), without its header's child."""
    from llmhost.config import TestConfig
    from llmhost.models import gguf
    from llmhost.models.loading import LoadSpec, load

    asked = []
    monkeypatch.setattr(native, "prebuild", lambda *builds: asked.append(
        sorted(b.__module__.rsplit(".", 1)[1] for b in builds)))
    for name in ("gpt2", "llama"):
        load(LoadSpec(model=tiny_models[name], device="cpu"), TestConfig())
    assert asked == [["omp"], ["attention", "omp"]]
    assert gguf.architecture(smollm2_gguf) == "llama"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16) + (2**40).to_bytes(8, "little"))
    assert gguf.architecture(str(fake)) is None   # a key "2**40 bytes long": not read
    assert gguf.architecture(str(tmp_path / "absent.gguf")) is None


def test_every_kernel_source_ships_in_the_package():
    """`pip install .` (README's quick start) installs the C sources the kernels
    are built from at run time, their headers too: setup.cfg's package data names each of them
    (engine/llamastep.c was missing, so an installed llmhost ran a Llama's layers
    in Python)."""
    import configparser
    import fnmatch
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup = configparser.ConfigParser()
    setup.read(os.path.join(root, "setup.cfg"))
    patterns = [p.strip() for p in setup["options.package_data"]["llmhost"].split(",")]
    sources = [os.path.relpath(path, os.path.join(root, "llmhost"))
               for kind in ("*.c", "*.h")   # the kernels and the headers they include
               for path in glob.glob(os.path.join(root, "llmhost", "**", kind), recursive=True)]
    assert len(sources) >= 4 and any(s.endswith(".h") for s in sources), sources
    for source in sources:
        assert any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source


def test_an_edited_header_the_source_includes_builds_anew(built, tmp_path):
    """A kernel's quoted includes (engine/simd.h) join its cache key: an edit
    there builds it again; an edit to a header it does not include does not."""
    build, compiles, folder = built
    (tmp_path / "inc").mkdir()
    header, other = tmp_path / "inc" / "value.h", tmp_path / "inc" / "other.h"
    header.write_text("#define VALUE 40\n")
    other.write_text("#define OTHER 1\n")
    source = tmp_path / "answer.c"
    source.write_text('#include "inc/value.h"\nint answer(void) { return VALUE + 2; }\n')

    def answer() -> int:
        lib, why = native.compile_library(str(source), FLAGS)
        assert lib is not None, why
        return lib.answer()

    assert answer() == 42 and compiles() == 1
    assert answer() == 42 and compiles() == 1   # from the cache
    other.write_text("#define OTHER 2\n")
    assert answer() == 42 and compiles() == 1   # not included: the same key
    header.write_text("#define VALUE 50\n")
    assert answer() == 52 and compiles() == 2
    assert {path for path, _ in native.local_sources(str(source))} == {str(source.resolve()), str(header.resolve())}
