"""Real English text for tests and benchmarks: sentences from the standard library's docstrings,
and mean-pooled sentence embeddings (as sentence-transformers computes them for MiniLM)."""

from __future__ import annotations

import importlib
import inspect
import re

import torch

_MODULES = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "mailbox",
    "math",
    "mimetypes",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "token",
    "tokenize",
    "trace",
    "traceback",
    "turtle",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml",
    "zipfile",
    "zoneinfo",
]


def docstring_sentences() -> list[str]:
    """English sentences from the docstrings of the standard library (deterministic order, deduplicated)."""
    seen: dict[str, None] = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        objects = [module, *(v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v))]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            text = " ".join(doc.split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 40 <= len(sentence) <= 300 and sentence[0].isupper() and not re.search(r"[>{}\[\]=]", sentence):
                    seen.setdefault(sentence, None)
    return list(seen)


def embed(model: torch.nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), 32):
            enc = tokenizer(sentences[i : i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")  # type: ignore[operator]
            hidden = model.eval()(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def mean_cosine(
    model: torch.nn.Module, dense_embeddings: torch.Tensor, tokenizer: object, held_out: list[str]
) -> float:
    return float(torch.nn.functional.cosine_similarity(embed(model, tokenizer, held_out), dense_embeddings).mean())
