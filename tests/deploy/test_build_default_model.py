"""deploy/build_default_model.py's corpus and provenance: the text trained on is a commit's, a tree without git is
refused with a message saying so, and build_info.json records what a rebuild needs to be compared (a build of two
steps of a tiny config from a small repository; the shipped model is never rebuilt here)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers

import deploy.build_default_model as builder
from deploy.build_default_model import (
    BuildConfig,
    build,
    code_sources,
    committed_files,
    corpus_documents,
    provenance,
)

MODULE = "\n".join(f"def f{i}():\n    return {i}\n" for i in range(8))  # 24 lines: a code source (>= 12)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git checkout with a committed guide.md, pkg/mod.py and a CRLF notes.md."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "guide.md").write_text("# Guide\n\nCommitted text.\n")
    (root / "pkg" / "mod.py").write_text(MODULE)
    (root / "notes.md").write_bytes(b"line one\r\nline two\r\n")
    (root / "data.txt").write_text("not corpus\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "corpus")
    return root


def test_the_corpus_is_the_committed_text_not_the_working_tree(repo):
    """Uncommitted edits, staged or not, went into the corpus (read from the working tree), so the recorded corpus
    hash named no commit; now the files are HEAD's, decoded as Path.read_text decodes them (universal newlines)."""
    (repo / "guide.md").write_text("# Guide\n\nAn uncommitted edit.\n")
    (repo / "staged.md").write_text("staged, not committed\n")
    git(repo, "add", "staged.md")
    (repo / "untracked.py").write_text(MODULE)
    commit, files = committed_files(repo)
    assert commit == git(repo, "rev-parse", "HEAD")
    assert files == {"guide.md": "# Guide\n\nCommitted text.\n", "notes.md": "line one\nline two\n",
                     "pkg/mod.py": MODULE}
    titles = [title for title, _ in corpus_documents(files)]
    assert titles[-3:] == ["guide.md", "notes.md", "pkg/mod.py"] and len(titles) > 3  # the pydoc topics first
    names = [name for name, _ in code_sources(files)]
    assert "pkg/mod.py" in names and "textwrap" in names and "guide.md" not in names


def test_a_tree_without_git_is_refused_with_a_message_that_says_why(tmp_path, monkeypatch):
    """A source tree from a tarball, an sdist or an installed package: `git ls-files` died with a bare
    CalledProcessError (the audit's repro_nogit.py); now a RuntimeError says a clone is needed, before any work."""
    tree = tmp_path / "tree"
    (tree / "deploy").mkdir(parents=True)
    (tree / "README.md").write_text("# no git here\n")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path is found either
    with pytest.raises(RuntimeError, match="not one .*build from a clone"):
        committed_files(tree)
    with pytest.raises(RuntimeError, match="build from a clone"):
        build(BuildConfig(), tmp_path / "model", tmp_path / "prompts", tmp_path / "workloads", repo_root=tree)
    assert not (tmp_path / "model").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="git is not installed"):
        committed_files(tree)


def test_a_folder_inside_another_checkout_is_refused(repo):
    """An installed copy inside some other repository must not read that repository's files as its corpus."""
    with pytest.raises(RuntimeError, match="not the top of a git checkout"):
        committed_files(repo / "pkg")


def test_a_build_records_its_commit_builder_and_library_versions(repo, tmp_path):
    """build_info.json recorded neither the builder nor the libraries: the shipped tokenizer cannot be rebuilt
    from the corpus it records (the audit's repro_tok_708f523.py) and nothing says which code or versions made it."""
    cfg = BuildConfig(vocab_size=300, hidden_size=16, num_heads=2, num_kv_heads=1, head_dim=8,
                      moe_intermediate_size=8, num_layers=2, num_experts=4, top_k=2, seq_len=32, batch_size=2,
                      steps=2, warmup_steps=1, threads=1, num_profile=4, num_sharegpt=2, num_sonnet=1, num_code=2)
    build(cfg, tmp_path / "model", tmp_path / "prompts", tmp_path / "workloads", repo_root=repo)
    info = json.loads((tmp_path / "model" / "build_info.json").read_text())
    assert info["git_commit"] == git(repo, "rev-parse", "HEAD") and info["git_dirty"] is False
    assert info["builder_sha256"] == hashlib.sha256(Path(builder.__file__).read_bytes()).hexdigest()
    assert info["versions"]["tokenizers"] == tokenizers.__version__
    assert (info["versions"]["torch"], info["versions"]["transformers"]) == (torch.__version__,
                                                                             transformers.__version__)
    assert info["config"]["threads"] == 1 and "guide.md" in info["corpus_documents"]
    (repo / "pkg" / "mod.py").write_text(MODULE + "# edited\n")
    assert provenance(repo, info["git_commit"])["git_dirty"] is True


def test_threads_can_be_set_on_the_command_line(monkeypatch):
    """--threads 1 is how a rebuild trains bit-identically run to run; the default stays the recorded 2."""
    seen = []
    monkeypatch.setattr(builder, "build", lambda cfg, *_: seen.append(cfg))
    for argv, threads in ((["--threads", "1"], 1), ([], 2)):
        monkeypatch.setattr("sys.argv", ["build_default_model", *argv])
        builder.main()
        assert seen[-1].threads == threads
