"""Bad inputs, table-driven, through the command line as a user meets them.

Every case of :data:`CASES` builds its inputs in a fresh folder, runs ``dfsmerge.cli.main`` in this process and
checks the same contract: a non-zero exit, exactly one ``error:`` line on stderr naming the field (or file) at
fault, no traceback, nothing created or changed (the case's folder and the shared tiny sources are hashed before
and after), and for the resource cases a refusal within :data:`RESOURCE_SECONDS`. The data-safety cases that need
a real process (two merges at once, SIGTERM and SIGKILL mid-merge) run the command line in forked processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import importlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from dfsmerge.cli import main

RESOURCE_SECONDS = 1.0  # "well under a second" of CPU time (the process's own, so other jobs on the CPUs count not)


# ---------------------------------------------------------------------------------------------------- helpers


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` -> a hash of its bytes (files), its link target (links) or ``dir``."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                found[str(path)] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[str(path)] = "dir"
            elif not path.is_file():  # a FIFO: reading it would block
                found[str(path)] = "special"
            elif path.stat().st_size > 1 << 26:  # a huge sparse file: its size and time stand for its bytes
                found[str(path)] = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
            else:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _run(argv: list[str], capsys) -> tuple[int, str, float]:
    started = time.process_time()  # CPU seconds of this process: what a resource case costs, whatever else runs
    code = main([str(a) for a in argv])
    elapsed = time.process_time() - started
    return code, capsys.readouterr().err, elapsed


def _assert_one_error(code: int, err: str, field: str) -> str:
    assert code != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert field in errors[0], errors[0]
    assert len(errors[0]) <= len("error: ") + 1000, errors[0]  # RecipeError's bound on a message
    return errors[0]


def _copy(source: Path, work: Path, name: str = "bad") -> Path:
    return Path(shutil.copytree(source, work / name))


def _config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


_DROP = object()


def _tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _native(work: Path, models: list, hops: str = "[{model: 0, layer: 0}, {model: 1, layer: 1}]",
            extra: str = "") -> Path:
    path = work / "r.yml"
    path.write_text(f"models: {json.dumps([str(m) for m in models])}\nhops: {hops}\n{extra}")
    return path


def _legacy(work: Path, models: list, mask: str = "[[[true, true, false, true], [false, true, false, false]]]",
            extra: str = "") -> Path:
    path = work / "r.yml"
    path.write_text(f"model_paths: {json.dumps([[str(m), None] for m in models])}\nnum_r: 1\nlayer_mask: {mask}\n"
                    f"{extra}")
    return path


def _merge(work: Path, recipe: Path, *options: str) -> list[str]:
    return [str(a) for a in ("merge", recipe, work / "out", "--quiet", *options)]


def _search(work: Path, src: list[Path], data: str = '{"text": "the cat"}\n', evaluator: str = "loglik",
            num_r: int = 1, extra: str = "") -> Path:
    """A search file over the first two sources; ``extra``: more lines of its ``search:`` section."""
    (work / "d.jsonl").write_bytes(data.encode() if isinstance(data, str) else data)
    path = work / "s.yml"
    path.write_text(f"models: {json.dumps([str(s) for s in src[:2]])}\nnum_r: {num_r}\n"
                    f"evaluator: {{type: {evaluator}, data: d.jsonl, validation: 0}}\n"
                    f"search:\n  population: 4\n  generations: 1\n{extra}")
    return path


def _search_with(work: Path, src: list[Path], old: str, new: str, extra: str = "") -> Path:
    """A :func:`_search` file with ``old`` replaced by ``new`` (a setting of its evaluator line, say)."""
    path = _search(work, src, extra=extra)
    path.write_text(path.read_text().replace(old, new))
    return path


def _python_search(work: Path, src: list[Path], module: str, code: str) -> Path:
    """A search file whose evaluator is ``python: <module>:score``, the module (``code``) beside it."""
    (work / f"{module}.py").write_text(code)
    path = _search(work, src)
    path.write_text(path.read_text().replace("{type: loglik, data: d.jsonl", f"{{python: '{module}:score', data: d.jsonl"))
    return path


def _tiny_gguf(path: Path) -> Path:
    """A two-layer Llama GGUF written with the gguf package (metadata and a few float32 tensors)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(64)
    writer.add_tensor("token_embd.weight", np.ones((64, 64), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _truncated_gguf(work: Path) -> Path:
    path = _tiny_gguf(work / "m.gguf")
    path.write_bytes(path.read_bytes()[:100])
    return path


def _laughs(levels: int = 9) -> str:
    """The "billion laughs": nine levels of ten aliases each, 10**9 values once expanded."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # the class of the case, for the tally in the report
    build: Callable[[Path, list[Path]], list]  # (work folder, tiny sources) -> argv
    field: str  # what the error line must name
    timed: bool = False  # a resource case: refused within RESOURCE_SECONDS


CASES = [
    # --- the recipe file
    Case("recipe-not-utf8", "recipe", lambda w, s: _merge(w, _bytes(w / "r.yml", b"models: [a\xff]\nhops: []\n")),
         "r.yml:1: not UTF-8"),
    Case("recipe-missing", "recipe", lambda w, s: _merge(w, w / "nothing.yml"), "nothing.yml: cannot read the recipe"),
    Case("recipe-not-yaml", "recipe", lambda w, s: _merge(w, _text(w / "r.yml", "models: [a\nhops: ]\n")), "r.yml:"),
    Case("ordered-dict-bad-pairs", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", "!!python/object/apply:collections.OrderedDict [[[model_paths, a, b], [num_r]]]\n")),
         "OrderedDict: expected a list of [key, value] pairs"),
    Case("ordered-dict-bad-args", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", "!!python/object/apply:collections.OrderedDict {args: 7, state: 1}\n")), "OrderedDict"),
    Case("python-tag", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", "models: !!python/object/apply:os.system [echo]\nhops: []\n")), "refusing Python tag"),
    # found by the hostile pass
    Case("custom-tag", "recipe", lambda w, s: _merge(w, _text(w / "r.yml", "models: !custom [a]\nhops: []\n")),
         "r.yml:1:9: unknown tag !custom:"),
    Case("long-custom-tag", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", f"models: !{'tagname' * 40} [a]\nhops: []\n")), f"unknown tag !{'tagname' * 40}:"),
    Case("search-not-utf8", "recipe", lambda w, s: ["evolve", _bytes(w / "s.yml", b"models: [a\xff]\n"), "--out",
                                                    w / "run", "--quiet"], "s.yml:1: not UTF-8"),
    Case("eval-search-not-utf8", "recipe", lambda w, s: ["eval", s[0], "--search", _bytes(
        w / "s.yml", b"num_r: 1\nmodels: [a\xff]\n")], "s.yml:2: not UTF-8"),
    Case("search-scales-inf", "recipe", lambda w, s: ["evolve", _search(w, s, extra="  scales: [0.0, .inf]\n"),
                                                      "--out", w / "run", "--quiet"],
         "search.scales: expected [low, high] with 0 <= low < high <= 1000"),
    Case("search-scales-nan", "recipe", lambda w, s: ["evolve", _search(w, s, extra="  scales: [.nan, 1]\n"),
                                                      "--out", w / "run", "--quiet"], "search.scales"),
    # the input model's tokenizer files, which an output copies: checked before any weight is read
    Case("merge-tokenizer-json-garbage", "options", lambda w, s: _with_tokenizer_file(w, s, "tokenizer.json",
                                                                                    b"garbage"),
         "/bad/tokenizer.json:1:1: not valid JSON"),
    Case("merge-tokenizer-json-not-a-tokenizer", "options", lambda w, s: _with_tokenizer_file(
        w, s, "tokenizer.json", b'{"model": 5}'),
         "/bad/tokenizer.json: not a tokenizer file transformers can read: Exception"),
    Case("merge-tokenizer-config-a-list", "options", lambda w, s: _with_tokenizer_file(
        w, s, "tokenizer_config.json", b"[1, 2]"),
         "/bad/tokenizer_config.json: not a tokenizer file transformers can read: expected a JSON object, got list"),
    Case("flatten-tokenizer-json-garbage", "options", lambda w, s: ["flatten", _bytes(
        _compact(s[0], w) / "tokenizer.json", b"\xff\xfe").parent, w / "out", "--quiet"],
         "/compact/tokenizer.json: not UTF-8 text"),
    Case("merge-tokenizer-json-a-folder", "options", lambda w, s: _merge(w, _native(w, [_dir(
        _gone(_copy(s[0], w) / "tokenizer.json") / "tokenizer.json").parent, s[1]])),
         "/bad/tokenizer.json: not a tokenizer file transformers can read: not a regular file"),
    Case("merge-tokenizer-config-bom", "options", lambda w, s: _with_tokenizer_file(
        w, s, "tokenizer_config.json", b"\xef\xbb\xbf{}"),
         "/bad/tokenizer_config.json:1:1: not valid JSON (Unexpected UTF-8 BOM"),
    Case("merge-tokenizer-class-a-list", "options", lambda w, s: _with_tokenizer_file(
        w, s, "tokenizer_config.json", b'{"tokenizer_class": ["X"]}'),
         "tokenizer_config.json: not a tokenizer file transformers can read: tokenizer_class: expected a class name"),
    # files that never end or block: refused before a byte is read
    Case("recipe-huge-sparse", "recipe", lambda w, s: _merge(w, _sparse(w / "r.yml", 3 << 30)),
         "r.yml: cannot read the recipe: 3221225472 bytes, more than the 1 GiB such a file may have", timed=True),
    Case("recipe-a-fifo", "recipe", lambda w, s: _merge(w, _fifo(w / "r.yml")),
         "r.yml: cannot read the recipe: not a regular file (a device, pipe or socket)"),
    Case("recipe-dev-zero", "recipe", lambda w, s: _merge(w, Path("/dev/zero")),
         "/dev/zero: cannot read the recipe: not a regular file"),
    Case("search-a-fifo", "recipe", lambda w, s: ["evolve", _fifo(w / "s.yml"), "--out", w / "run", "--quiet"],
         "cannot read search file"),
    Case("data-dev-zero", "evaluator data", lambda w, s: ["eval", s[0], "--data", "/dev/zero"],
         "evaluator.data: cannot read /dev/zero: not a regular file"),
    # found by the hostile pass: numbers by YAML 1.2, explicit tags held to it, and the search file's numbers
    Case("yaml-int-tag-exponent", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], "[{model: 0, layer: 0, scale: !!int 1e0}]")], "r.yml:2:36: !!int: expected an integer"),
    Case("yaml-float-tag-text", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], "[{model: 0, layer: 0, scale: !!float abc}]")], "r.yml:2:36: !!float: expected a float"),
    Case("yaml-int-tag-empty", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], '[{model: 0, layer: 0, scale: !!int ""}]')], "r.yml:2:36: !!int: expected an integer"),
    Case("yaml-int-tag-bare-0x", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], "[{model: 0, layer: 0, scale: !!int 0x}]")], "r.yml:2:36: !!int: expected an integer"),
    Case("yaml-sexagesimal-is-text", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], "[{model: 0, layer: 0, scale: 1:30.5}]")], "hops[0].scale: expected a number"),
    Case("yaml-binary-is-text", "recipe", lambda w, s: ["plan", _native(
        w, s[:2], "[{model: 0, layer: 0, scale: 0b11}]")], "hops[0].scale: expected a number"),
    Case("search-seed-beyond-2-32", "recipe", lambda w, s: [
        "evolve", _search(w, s, extra="  seed: 4294967296\n"), "--out", w / "run", "--quiet"],
         "search.seed: expected an integer in 0..4294967295"),
    Case("eval-search-seed-huge", "recipe", lambda w, s: [
        "eval", s[0], "--search", _search(w, s, extra=f"  seed: {10**35}\n")],
         "search.seed: expected an integer in 0..4294967295"),
    Case("search-population-huge", "resource", lambda w, s: [  # cmaes loops over the population: never ended
        "evolve", _search_with(w, s, "population: 4", f"population: {10**30}"), "--out", w / "run", "--quiet"],
         "search.population: expected an integer in 4..100000", timed=True),
    Case("search-heartbeat-huge", "recipe", lambda w, s: [
        "evolve", _search(w, s, extra="  heartbeat: 99999999999999999999999\n"), "--out", w / "run", "--quiet"],
         "search.heartbeat: expected an integer in 1..86400"),
    Case("search-validation-nan", "recipe", lambda w, s: [
        "evolve", _search_with(w, s, "validation: 0}", "validation: .nan}"), "--out", w / "run", "--quiet"],
         "evaluator.validation: expected a fraction in [0, 1) or a whole count"),
    Case("search-validation-beyond-float", "recipe", lambda w, s: [
        "eval", s[0], "--search", _search_with(w, s, "validation: 0}", "validation: 1e400}")],
         "evaluator.validation: expected a fraction in [0, 1) or a whole count"),
    Case("search-weight-inf", "recipe", lambda w, s: [
        "evolve", _search_with(w, s, "evaluator: {type: loglik, data: d.jsonl, validation: 0}",
                               "evaluators: [{type: loglik, data: d.jsonl, validation: 0, weight: .inf}]"),
        "--out", w / "run", "--quiet"], "evaluators[0].weight: expected a finite number > 0"),
    Case("search-weight-beyond-float", "recipe", lambda w, s: [
        "eval", s[0], "--search", _search_with(w, s, "evaluator: {type: loglik, data: d.jsonl, validation: 0}",
                                               "evaluators: [{type: loglik, data: d.jsonl, validation: 0, "
                                               "weight: 1e400}]")],
         "evaluators[0].weight: expected a finite number > 0"),
    # (end of the hostile pass's block)
    Case("duplicate-key", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", f"models: [{s[0]}]\nhops: [{{layer: 0}}]\nhops: [{{layer: 1}}]\n")), "duplicate key 'hops'"),
    Case("misspelt-legacy-key", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", f"model_paths: [[{s[0]}, null]]\nnum_r: 1\nlayer_masks: [[[true]]]\n")),
         "recipe: unknown key 'layer_masks' (did you mean 'layer_mask'?)"),
    Case("misspelt-native-key", "recipe", lambda w, s: _merge(w, _native(w, s[:2], extra="output_modle: 1\n")),
         "did you mean 'output_model'?"),
    Case("missing-legacy-key", "recipe", lambda w, s: _merge(w, _text(
        w / "r.yml", f"model_paths: [[{s[0]}, null]]\nlayer_mask: [[[true]]]\n")), "num_r: missing"),
    Case("no-format-keys", "recipe", lambda w, s: _merge(w, _text(w / "r.yml", "hop: []\n")),
         "(did you mean 'hops'?)"),
    Case("mask-entry-2", "strict types", lambda w, s: _merge(w, _legacy(w, s[:2], "[[[1, 2, 0, 1], [0, 0, 0, 0]]]")),
         "layer_mask[0][0][1]: expected true or false (or 0/1), got 2"),
    Case("mask-entry-minus-1", "strict types", lambda w, s: _merge(w, _legacy(
        w, s[:2], "[[[1, -1, 0, 1], [0, 0, 0, 0]]]")), "layer_mask[0][0][1]"),
    Case("mask-entry-half", "strict types", lambda w, s: _merge(w, _legacy(
        w, s[:2], "[[[1, 0.5, 0, 1], [0, 0, 0, 0]]]")), "layer_mask[0][0][1]"),
    Case("mask-entry-nan", "strict types", lambda w, s: _merge(w, _legacy(
        w, s[:2], "[[[1, .nan, 0, 1], [0, 0, 0, 0]]]")), "layer_mask[0][0][1]"),
    Case("bool-vector-scale", "strict types", lambda w, s: _merge(w, _native(
        w, s[:2], "[{model: 0, layer: 0, scale: [true, false]}]")), "hops[0].scale: expected a number"),
    Case("bool-scale-legacy", "strict types", lambda w, s: _merge(w, _legacy(
        w, s[:2], extra="scaling_factors: [[[true, 1, 1, 1], [1, 1, 1, 1]]]\n")), "scaling_factors[0][0][0]"),
    Case("classification-not-bool", "strict types", lambda w, s: _merge(w, _native(
        w, s[:2], extra="classification: 'yes'\n")), "classification: expected true, false or null"),
    Case("empty-model-path", "strict types", lambda w, s: _merge(w, _native(w, ["", s[1]])),
         "models[0]: the model path is empty"),
    Case("local-path-missing", "strict types", lambda w, s: _merge(w, _native(w, [w / "no-such-model", s[1]])),
         "no-such-model: no such folder"),
    Case("relative-path-missing", "strict types", lambda w, s: _merge(w, _native(w, ["./no-such-model", s[1]])),
         "no-such-model: no such folder"),
    Case("revision-dotdot", "strict types", lambda w, s: _merge(w, _text(
        w / "r.yml", "models: [{path: org/model, revision: ../../etc}]\nhops: [{layer: 0}]\n")),
         "models[0].revision: '../../etc' is not a branch, tag or commit name"),
    Case("revision-not-string", "strict types", lambda w, s: _merge(w, _text(
        w / "r.yml", "models: [{path: org/model, revision: 12}]\nhops: [{layer: 0}]\n")), "models[0].revision"),
    Case("revision-on-local-folder", "strict types", lambda w, s: _merge(w, _text(
        w / "r.yml", f"models: [{{path: {s[0]}, revision: main}}]\nhops: [{{layer: 0}}]\n")),
         "revision applies to hub IDs only"),
    Case("scale-beyond-float32", "strict types", lambda w, s: _merge(w, _native(
        w, s[:2], "[{model: 0, layer: 0}, {model: 1, layer: 1, scale: 1.0e+39}]")), "hops[1].scale"),
    # --- resource bounds
    Case("billion-laughs", "resource", lambda w, s: _merge(w, _text(w / "r.yml", _laughs())),
         "values once aliases are expanded", timed=True),
    Case("deep-nesting", "resource", lambda w, s: _merge(w, _text(w / "r.yml", "models: " + "[" * 100_000)),
         "nested deeper than", timed=True),
    Case("deep-block-nesting", "resource", lambda w, s: _merge(w, _text(
        w / "r.yml", "".join(" " * i + f"k{i}:\n" for i in range(2000)))), "nested deeper than", timed=True),
    Case("recursive-alias", "resource", lambda w, s: _merge(w, _text(w / "r.yml", "models: &m [a, *m]\nhops: []\n")),
         "an alias refers to the collection that holds it", timed=True),
    # found by the hostile pass
    Case("search-num-r-huge", "resource", lambda w, s: ["evolve", _search(w, s, num_r=1_000_000_000), "--out",
                                                        w / "run", "--quiet"],
         "num_r: expected num_r x 2 models x their layers <= 100,000 slots", timed=True),
    Case("search-slots-beyond-the-bound", "resource", lambda w, s: ["evolve", _search(w, s, num_r=20_000), "--out",
                                                                    w / "run", "--quiet"],
         "num_r: expected num_r x 2 models x 4 layers <= 100,000 slots", timed=True),
    # (end of the hostile pass's block)
    Case("400-digit-integer", "resource", lambda w, s: _merge(w, _text(
        w / "r.yml", f"model_paths: [[{s[0]}, null]]\nnum_r: {'9' * 400}\nlayer_mask: [[[true]]]\n")),
         "r.yml:2:8: a number of 400 characters", timed=True),
    Case("long-value-cut", "resource", lambda w, s: _merge(w, _native(
        w, s[:2], extra="input_model: '" + "x" * 100_000 + "'\n")), "input_model: expected an integer", timed=True),
    Case("config-400-digit-integer", "resource", lambda w, s: _merge(w, _native(
        w, [s[0], _config(_copy(s[1], w), hidden_size=int("9" * 400))])), "hidden_size", timed=True),
    Case("config-deep-nesting", "resource", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "config.json", b"[" * 100_000 + b"]" * 100_000).parent])),
         "config.json", timed=True),
    # --- source configs
    Case("config-not-mapping", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "config.json", b"[1, 2]").parent])),
         "config.json: expected a JSON object"),
    Case("config-not-json", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "config.json", b"{'a': 1}").parent])), "config.json:1:2: not valid JSON"),
    Case("config-not-utf8", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "config.json", b'{"model_type": "ll\xe9ama"}').parent])),
         "config.json: not UTF-8"),
    Case("config-missing-key", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _config(_copy(s[1], w), hidden_size=_DROP)])), "hidden_size: expected an integer"),
    Case("config-wrong-type", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _config(_copy(s[1], w), num_attention_heads="4")])), "num_attention_heads: expected an integer"),
    Case("config-flag-wrong-type", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _config(_copy(s[1], w), tie_word_embeddings="false")])), "tie_word_embeddings: expected true"),
    Case("config-model-type-missing", "config", lambda w, s: _merge(w, _native(
        w, [s[0], _config(_copy(s[1], w), model_type=_DROP)])), "model_type: expected a string"),
    # --- weight files
    Case("index-broken-json", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "model.safetensors.index.json", b'{"weight_map": ').parent])),
         "model.safetensors.index.json:1:16: not valid JSON"),
    Case("index-no-weight-map", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "model.safetensors.index.json", b'{"metadata": {}}').parent])),
         "weight_map: expected a mapping"),
    Case("index-path-escape", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _bytes(_copy(s[1], w) / "model.safetensors.index.json",
                         b'{"weight_map": {"a": "../../x.safetensors"}}').parent])),
         "weight_map: expected file names in the index's folder"),
    Case("bin-not-state-dict", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _bin(_copy(s[1], w), [1, 2, 3])])), "pytorch_model.bin: expected a state dict"),
    Case("bin-training-checkpoint", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _bin(_copy(s[1], w), {"model": {"w": torch.ones(2)}, "step": torch.tensor(3)})])),
         "(it holds a dict under 'model'"),
    Case("safetensors-truncated", "weights", lambda w, s: _merge(w, _native(
        w, [s[0], _cut(_copy(s[1], w) / "model.safetensors")])), "model.safetensors: cannot open safetensors file"),
    Case("gguf-truncated", "weights", lambda w, s: _merge(w, _native(w, [_truncated_gguf(w), s[1]])),
         "m.gguf: cannot read the GGUF metadata"),
    Case("integer-tensor", "weights", lambda w, s: _merge(w, _native(w, [s[0], _tensors(
        _copy(s[1], w), lambda t: t.update({k: t[k].int() for k in ["model.layers.1.mlp.up_proj.weight"]}))])),
         "models[1]: tensor 'model.layers.1.mlp.up_proj.weight' holds int32 values"),
    Case("bool-tensor", "weights", lambda w, s: _merge(w, _native(w, [s[0], _tensors(
        _copy(s[1], w), lambda t: t.update({k: t[k] > 0 for k in ["model.layers.1.input_layernorm.weight"]}))])),
         "tensor 'model.layers.1.input_layernorm.weight' holds bool values"),
    Case("tensor-shape-disagrees", "weights", lambda w, s: _merge(w, _native(w, [s[0], _tensors(
        _copy(s[1], w), lambda t: t.update({k: t[k][:100] for k in ["model.layers.1.mlp.up_proj.weight"]}))])),
         "tensor 'model.layers.1.mlp.up_proj.weight' has shape (100, 64), the config says (128, 64)"),
    Case("eval-weights-disagree-with-config", "weights", lambda w, s: [
        "eval", _config(_copy(s[0], w), vocab_size=66), "--data", _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "/bad: tensor 'model.embed_tokens.weight' has shape (64, 64), the config says (66, 64)"),
    Case("eval-recipe-weights-disagree-with-config", "weights", lambda w, s: [
        "eval", _native(w, [_config(_copy(s[0], w), vocab_size=66), s[1]]), "--data",
        _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "/bad: tensor 'model.embed_tokens.weight' has shape (64, 64), the config says (66, 64)"),
    Case("evolve-weights-disagree-with-config", "weights", lambda w, s: [
        "evolve", _search(w, [_config(_copy(s[0], w), vocab_size=66), s[1]]), "--out", w / "run", "--quiet"],
         "/bad: tensor 'model.embed_tokens.weight' has shape (64, 64), the config says (66, 64)"),
    Case("eval-compact-missing-tensor", "weights", lambda w, s: [  # found by the fifth pass (scored random weights)
        "eval", _tensors(_compact(s[0], w), lambda t: t.pop("model.dfs_layers.0.self_attn.q_proj.weight")),
        "--data", _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "1 tensor(s) the config describes are missing from the weights, e.g. 'model.dfs_layers.0.self_attn.q_proj"),
    # a compact folder whose hop table disagrees with itself or its tensors: one line, from eval and flatten alike
    Case("eval-compact-hops-garbage", "weights", lambda w, s: [
        "eval", _config(_compact(s[0], w), dfs_hops="garbage"), "--data", _text(w / "d.jsonl", '{"text": "a b"}\n')],
         "compact: config.json: dfs_hops: expected a list of [stored layer, scale kind, bias kind]"),
    Case("flatten-compact-hop-out-of-range", "weights", lambda w, s: [
        "flatten", _config(_compact(s[0], w), dfs_hops=[[0, None, None], [5, "scalar", None]]), w / "out"],
         "compact: config.json: dfs_hops[1]: expected a stored layer in [0, 2), got 5"),
    Case("eval-compact-num-hidden-layers", "weights", lambda w, s: [
        "eval", _config(_compact(s[0], w), num_hidden_layers=1), "--data", _text(w / "d.jsonl", '{"text": "a b"}\n')],
         "compact: config.json: num_hidden_layers: expected 2, the number of hops in dfs_hops, got 1"),
    Case("flatten-compact-transform-missing", "weights", lambda w, s: [
        "flatten", _tensors(_compact(s[0], w), lambda t: t.pop("model.dfs_transforms.1.scale")), w / "out"],
         "tensor 'model.dfs_transforms.1.scale', which config.json's dfs_hops declares, is missing"),
    Case("flatten-compact-kind-disagrees", "weights", lambda w, s: [
        "flatten", _config(_compact(s[0], w), dfs_hops=[[0, None, None], [1, "vector", None]]), w / "out"],
         "tensor 'model.dfs_transforms.1.scale' has shape (), the config says (64,)"),
    Case("eval-good-then-truncated-compact", "weights", lambda w, s: [
        "eval", s[0], _cut(_compact(s[0], w) / "model.safetensors"), "--data",
        _text(w / "d.jsonl", '{"text": "a b"}\n')], "compact/model.safetensors: cannot open safetensors file"),
    Case("eval-a-weights-file", "weights", lambda w, s: [
        "eval", s[0] / "model.safetensors", "--data", _text(w / "d.jsonl", '{"text": "a b"}\n')],
         "model.safetensors: expected a model folder, a .gguf file or a hub ID, got a file"),
    Case("merge-layer-types-length", "weights", lambda w, s: _merge(w, _native(w, [_config(
        _copy(s[0], w), layer_types=["full_attention"] * 2), s[1]])),
         "layer_types: expected num_hidden_layers = 4 entries (transformers' rule), got 2"),
    Case("flatten-compact-layer-types-length", "weights", lambda w, s: [
        "flatten", _config(_compact(s[0], w), layer_types=["full_attention"] * 3), w / "out"],
         "layer_types: expected num_hidden_layers = 2 entries (transformers' rule), got 3"),
    Case("eval-compact-undeclared-transform", "weights", lambda w, s: [
        "eval", _config(_compact(s[0], w), dfs_hops=[[0, None, None], [1, None, None]]), "--data",
        _text(w / "d.jsonl", '{"text": "a b"}\n')],
         "tensor 'model.dfs_transforms.1.scale' is declared by no hop of config.json's dfs_hops"),
    Case("flatten-compact-kind-unhashable", "weights", lambda w, s: [
        "flatten", _config(_compact(s[0], w), dfs_hops=[[0, None, None], [1, ["scalar"], None]]), w / "out"],
         "dfs_hops[1]: scale kind: expected one of"),
    Case("eval-compact-transform-nan", "weights", lambda w, s: [
        "eval", s[0], _tensors(_compact(s[0], w), lambda t: t["model.dfs_transforms.1.scale"].fill_(float("nan"))),
        "--data", _text(w / "d.jsonl", '{"text": "a b"}\n')],
         "compact: tensor 'model.dfs_transforms.1.scale' holds NaN or infinity"),
    Case("flatten-compact-layers-garbage", "weights", lambda w, s: [
        "flatten", _config(_compact(s[0], w), dfs_layers=[["x", None], [1.5, -7]]), w / "out"],
         "dfs_layers: expected a list of [model, layer] pairs of indices"),
    Case("merge-chat-template-not-utf8", "options", lambda w, s: _with_tokenizer_file(
        w, s, "chat_template.jinja", b"{{ \xff }}"),
         "chat_template.jinja: not a tokenizer file transformers can read: not UTF-8 text"),
    Case("eval-integer-weight", "weights", lambda w, s: [  # found by the fifth hostile pass (a traceback)
        "eval", _tensors(_copy(s[0], w), lambda t: t.update({k: t[k].to(torch.int16) for k in [
            "model.layers.0.input_layernorm.weight"]})), "--data", _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "tensor 'model.layers.0.input_layernorm.weight' holds int16 values"),
    Case("float16-overflow", "weights", lambda w, s: _merge(w, _native(
        w, s[:2], "[{model: 0, layer: 0}, {model: 1, layer: 1, scale: 1.0e+6}]"), "--dtype", "float16"),
         "model.layers.0.mlp.down_proj.weight: value"),
    # --- options
    Case("shard-size-garbage", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--max-shard-size", "5 gigs"),
         "max_shard_size: expected a size like 5GB"),
    Case("shard-size-huge", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--max-shard-size", "9" * 400 + "GB"),
         "max_shard_size"),
    Case("shard-size-zero", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--max-shard-size", "0"),
         "max_shard_size"),
    Case("device-bogus", "options", lambda w, s: _merge(w, _native(
        w, [s[0], _cut(_copy(s[1], w) / "model.safetensors")]), "--device", "bogus"),
         "device: expected cpu, cuda, cuda:N or mps, got 'bogus'"),
    Case("device-cuda-without-gpu", "options", lambda w, s: _no_gpu() + _merge(w, _native(
        w, [s[0], _cut(_copy(s[1], w) / "model.safetensors")]), "--device", "cuda"),
         "device: 'cuda' is not on this machine"),
    Case("eval-device-bogus", "options", lambda w, s: ["eval", s[0], "--data", _text(w / "d.jsonl", '{"text": "a"}\n'),
                                                       "--device", "gpu0"], "device: expected cpu"),
    # found by the hostile pass
    Case("dtype-choice", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--dtype", "int8"),
         "error: --dtype: expected one of bfloat16, float16, float32, got 'int8'"),
    Case("format-choice", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--format", "huge"),
         "error: --format: expected one of flat, compact, got 'huge'"),
    Case("flatten-dtype-choice", "options", lambda w, s: ["flatten", s[0], w / "out", "--dtype", "fp8"],
         "error: --dtype: expected one of bfloat16, float16, float32, got 'fp8'"),
    Case("shard-size-negative", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--max-shard-size", "-5GB"),
         "error: --max-shard-size: expected a value (one that starts with '-' is written --max-shard-size=VALUE)"),
    Case("shard-size-negative-attached", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--max-shard-size=-5GB"),
         "max_shard_size: expected a size like 5GB"),
    Case("option-missing", "options", lambda w, s: ["evolve", _search(w, s)], "error: --out: missing"),
    Case("option-unknown", "options", lambda w, s: _merge(w, _native(w, s[:2]), "--shard", "1GB"),
         "error: --shard 1GB: unknown argument"),
    Case("option-not-integer", "options", lambda w, s: ["eval", s[0], "--batch-size", "x"],
         "error: --batch-size: expected an integer, got 'x'"),
    Case("eval-batch-size-zero", "options", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", '{"text": "the cat"}\n'), "--batch-size", "0"], "batch_size: expected an integer >= 1, got 0"),
    Case("eval-tokenizer-garbage", "options", lambda w, s: ["eval", _bytes(
        _copy(s[0], w) / "tokenizer.json", b"garbage").parent, "--data", _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "bad: cannot load the tokenizer (tokenizer.json, tokenizer_config.json): "),  # the error differs by version
    Case("eval-tokenizer-missing", "options", lambda w, s: ["eval", _gone(_copy(s[0], w) / "tokenizer.json"), "--data",
                                                            _text(w / "d.jsonl", '{"text": "the cat"}\n')],
         "bad: cannot load the tokenizer (tokenizer_config.json)"),
    # (end of the hostile pass's block)
    Case("storage-driver-missing", "options", lambda w, s: ["evolve", _search(w, s), "--out", w / "run", "--quiet",
                                                            "--storage", "mysql://u@localhost/db"],
         "its database driver MySQLdb is not installed"),
    # --- evaluator data, found before any candidate runs
    Case("data-not-utf8", "evaluator data", lambda w, s: ["eval", s[0], "--data", _bytes(
        w / "d.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n')], "d.jsonl:2: not UTF-8"),
    Case("data-wrong-type", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", '{"text": "a"}\n\n{"text": 5}\n')], "d.jsonl:3: text: expected str, got 5"),
    Case("data-choices-not-list", "evaluator data", lambda w, s: [
        "eval", s[0], "--evaluator", "choice", "--data",
        _text(w / "d.jsonl", '{"prompt": "a", "choices": "bc", "answer": 0}\n')], "d.jsonl:1: choices: expected list"),
    Case("data-answer-bool", "evaluator data", lambda w, s: [
        "eval", s[0], "--evaluator", "choice", "--data",
        _text(w / "d.jsonl", '{"prompt": "a", "choices": ["b"], "answer": true}\n')], "d.jsonl:1: answer"),
    Case("data-not-object", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(w / "d.jsonl", '"a"\n')],
         "d.jsonl:1: expected a JSON object"),
    Case("data-deep-nesting", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", "[" * 100_000 + "\n")], "d.jsonl:1", timed=True),
    Case("search-data-wrong-type", "evaluator data", lambda w, s: [
        "evolve", _search(w, s, '{"text": ["a"]}\n'), "--out", w / "run", "--quiet"], "d.jsonl:1: text: expected str"),
    # found by the hostile pass
    Case("data-text-empty", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", '{"text": "the cat"}\n{"text": ""}\n')],
         "d.jsonl:2: text: expected text that is not empty or white space, got ''"),
    Case("data-text-blank", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", '{"text": "   "}\n')], "d.jsonl:1: text: expected text that is not empty or white space"),
    Case("data-text-one-token", "evaluator data", lambda w, s: ["eval", s[0], "--data", _text(
        w / "d.jsonl", '{"text": "the cat"}\n{"text": "cat"}\n')],
         "d.jsonl:2: text: expected text with at least 2 tokens, got 'cat' (1)"),
    Case("data-prompt-empty", "evaluator data", lambda w, s: ["eval", s[0], "--evaluator", "generate", "--data", _text(
        w / "d.jsonl", '{"prompt": "", "answer": "1"}\n')], "d.jsonl:1: prompt: expected text that is not empty"),
    Case("data-choices-empty", "evaluator data", lambda w, s: ["eval", s[0], "--evaluator", "choice", "--data", _text(
        w / "d.jsonl", '{"prompt": "a", "choices": ["", ""], "answer": 0}\n')],
         "d.jsonl:1: choices: expected texts that are not empty or white space"),
    Case("data-choice-no-token", "evaluator data", lambda w, s: ["eval", s[0], "--evaluator", "choice", "--data", _text(
        w / "d.jsonl", '{"prompt": "", "choices": ["cat", "dog"], "answer": 0}\n')],
         "d.jsonl:1: prompt: expected text with at least 1 token, got '' (0)"),
    Case("search-data-blank", "evaluator data", lambda w, s: [
        "evolve", _search(w, s, '{"text": "the cat"}\n{"text": " "}\n'), "--out", w / "run", "--quiet"],
         "d.jsonl:2: text: expected text that is not empty"),
    Case("search-data-one-token", "evaluator data", lambda w, s: [  # found with the tokenizers, before any trial
        "evolve", _search(w, s, '{"text": "the cat"}\n{"text": "cat"}\n'), "--out", w / "run", "--quiet"],
         "d.jsonl:2: text: expected text with at least 2 tokens, got 'cat' (1)"),
    Case("python-evaluator-signature", "evaluator data", lambda w, s: [
        "evolve", _python_search(w, s, "ev_sig", "def score(model):\n    return 1.0\n"), "--out", w / "run",
        "--quiet"], "evaluator.python: ev_sig:score must take (model, tokenizer, examples); its signature is (model)"),
    Case("python-evaluator-syntax", "evaluator data", lambda w, s: [
        "evolve", _python_search(w, s, "ev_syntax", "def score(:\n"), "--out", w / "run", "--quiet"],
         "evaluator.python: cannot import 'ev_syntax': SyntaxError"),
    Case("python-evaluator-not-a-number", "evaluator data", lambda w, s: [
        "eval", s[0], "--search", _python_search(w, s, "ev_text", "def score(m, t, e):\n    return 'good'\n")],
         "python: ev_text:score returned 'good'; expected a finite number"),
    # (end of the hostile pass's block)
    # --- the output path
    Case("force-onto-a-source", "output path", lambda w, s: ["merge", _native(w, s[:2]), s[1], "--force", "--quiet"],
         "is the source"),
    Case("target-inside-a-source", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), s[0] / "merged", "--quiet"], "lies inside the source"),
    Case("target-contains-a-source", "output path", lambda w, s: [
        "merge", _native(w, [_copy(s[0], w / "models", "a"), s[1]]), w / "models", "--force", "--quiet"],
         "contains the source"),
    Case("target-through-symlink-into-source", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _link(w / "link", s[0]) / "merged", "--quiet"], "lies inside the source"),
    Case("force-onto-the-folder-a-source-links-to", "output path", lambda w, s: [  # found by the fourth pass
        "merge", _native(w, [_linked(s[0], w), s[1]]), w / "victim", "--force", "--quiet"],
         "/links (whose files lie in /"),
    Case("target-inside-the-folder-a-source-links-to", "output path", lambda w, s: [
        "merge", _native(w, [_linked(s[0], w), s[1]]), w / "victim" / "sub", "--quiet"],
         "/victim/sub lies inside the source "),
    Case("force-onto-a-folder-in-a-chain-of-links", "output path", lambda w, s: [  # found by the fifth pass
        "merge", _native(w, [_linked(_linked(s[0], w), w, "chain"), s[1]]), w / "links", "--force", "--quiet"],
         "/links is the source "),
    Case("flatten-onto-its-input", "output path", lambda w, s: ["flatten", s[0], s[0], "--force", "--quiet"],
         "is the source"),
    Case("merge-best-into-a-source", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--merge-best", s[0], "--quiet"], "is the source"),
    Case("target-is-a-file", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _text(w / "out", "mine"), "--force", "--quiet"], "exists and is not a folder"),
    Case("target-below-a-file", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _text(w / "f", "mine") / "out", "--quiet"], "is not a folder"),
    Case("target-dangling-symlink", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _link(w / "out", w / "gone"), "--force", "--quiet"], "is a symbolic link"),
    Case("target-symlink-to-folder", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _link(w / "out", _dir(w / "real")), "--force", "--quiet"], "is a symbolic link"),
    Case("target-exists", "output path", lambda w, s: ["merge", _native(w, s[:2]), _dir(w / "out"), "--quiet"],
         "already exists; pass --force"),
    Case("force-onto-a-non-model-folder", "output path", lambda w, s: [
        "merge", _native(w, s[:2]), _text(_dir(w / "home") / "notes.txt", "mine").parent, "--force", "--quiet"],
         "is not a model folder"),
    Case("target-empty", "output path", lambda w, s: ["merge", _native(w, s[:2]), "", "--quiet"],
         "output: the output path is empty"),
    # found by the hostile pass: a search's run folder and storage obey the same rule as outputs (check_apart),
    # and a search that cannot start leaves nothing behind
    Case("evolve-out-is-a-source", "output path", lambda w, s: ["evolve", _search(w, s), "--out", s[0], "--quiet"],
         "out: "),
    Case("evolve-out-inside-a-source", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", s[0] / "run", "--quiet"], "lies inside the source"),
    Case("evolve-out-contains-the-sources", "output path", lambda w, s: [
        "evolve", _search(w, [_copy(s[0], w / "models", "a"), _copy(s[1], w / "models", "b")]), "--out",
        w / "models", "--quiet"], "contains the source"),
    Case("evolve-out-empty", "output path", lambda w, s: ["evolve", _search(w, s), "--out", "", "--quiet"],
         "out: the path is empty"),
    Case("evolve-out-a-file", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", _text(w / "f", "mine"), "--quiet"], "out: "),
    Case("evolve-storage-inside-a-source", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--storage", f"sqlite:///{s[0]}/x.db", "--quiet"],
         "storage: "),
    Case("evolve-storage-unknown-scheme", "options", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--storage", "bogus://x", "--quiet"], "storage bogus://x"),
    Case("evolve-device-not-here", "options", lambda w, s: _no_gpu() + [
        "evolve", _text(_search(w, s), _search(w, s).read_text() + "device: cuda\n"), "--out", w / "run",
        "--quiet"], "device: 'cuda' is not on this machine"),
    Case("evolve-widths-differ", "config", lambda w, s: [
        "evolve", _search(w, [s[0], _config(_copy(s[1], w), hidden_size=128)]), "--out", w / "run", "--quiet"],
         "hidden_size"),
    # found by the second hostile pass
    Case("evolve-storage-in-memory", "options", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--storage", "sqlite://", "--quiet"], "storage sqlite://"),
    Case("evolve-storage-driver-spelling-into-a-source", "options", lambda w, s: [  # found by the fifth pass
        "evolve", _search(w, s), "--out", w / "run", "--storage", f"sqlite+pysqlite:///{s[0]}/x.db", "--quiet"],
         "expected sqlite:///FILE"),
    Case("evolve-storage-uri-into-a-source", "options", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--storage", f"sqlite:///file:{s[0]}/y.db?mode=rwc&uri=true",
        "--quiet"], "expected sqlite:///FILE"),
    Case("evolve-scales-near-overflow", "options", lambda w, s: [
        "evolve", _search(w, s, extra="  scales: [0, 1.0e+308]\n"), "--out", w / "run", "--quiet"],
         "search.scales"),
    Case("evolve-source-without-tokenizer", "evaluator data", lambda w, s: [
        "evolve", _search(w, [_untokenized(_copy(s[0], w)), s[1]]), "--out", w / "run", "--quiet"],
         "models[0]: "),
    Case("eval-recipe-input-without-tokenizer", "evaluator data", lambda w, s: [
        "eval", _native(w, [_untokenized(_copy(s[0], w)), s[1]]), "--data", _text(w / "t.jsonl", '{"text": "a b c"}\n')],
         "has no tokenizer files"),
    Case("data-choice-single", "evaluator data", lambda w, s: [
        "eval", s[0], "--evaluator", "choice", "--data",
        _text(w / "d.jsonl", '{"prompt": "Q?", "choices": ["only"], "answer": 0}\n')], "d.jsonl:1: choices"),
    Case("merge-best-is-the-run-folder", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "run", "--merge-best", w / "run", "--quiet"],
         "--merge-best: "),
    Case("merge-best-around-the-run-folder", "output path", lambda w, s: [
        "evolve", _search(w, s), "--out", w / "runs" / "a", "--merge-best", w / "runs", "--quiet"],
         "would replace the run folder"),
]


def _untokenized(folder: Path) -> Path:
    for f in folder.glob("tokenizer*"):
        f.unlink()
    return folder


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _link(path: Path, to: Path) -> Path:
    path.symlink_to(to)
    return path


def _linked(source: Path, work: Path, name: str = "links") -> Path:
    """``work/<name>``: a folder of symbolic links to the files of ``source`` (first a copy, ``work/victim``,
    when ``source`` is not in ``work``)."""
    target = source if source.parent == work else _copy(source, work, "victim")
    links = _dir(work / name)
    for file in target.iterdir():
        (links / file.name).symlink_to(file)
    return links


def _compact(source: Path, work: Path) -> Path:
    """``work/compact``: two hops of ``source`` (one scaled) in the compact format."""
    assert main(["merge", str(_native(work, [source], "[{model: 0, layer: 0}, {model: 0, layer: 1, scale: 0.5}]")),
                 str(work / "compact"), "--format", "compact", "--quiet"]) == 0
    return work / "compact"


def _with_tokenizer_file(work: Path, sources: list[Path], name: str, data: bytes) -> list[str]:
    """``merge`` of a recipe whose input model is a copy of the first source with tokenizer file ``name``
    replaced by ``data``."""
    return _merge(work, _native(work, [_bytes(_copy(sources[0], work) / name, data).parent, sources[1]]))


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _gone(file: Path) -> Path:
    file.unlink()
    return file.parent


def _cut(file: Path) -> Path:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    return file.parent


def _bin(folder: Path, state: object) -> Path:
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def _no_gpu() -> list:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    return []


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_error_line_and_changes_nothing(case, llama_sources, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    argv = case.build(work, llama_sources)
    capsys.readouterr()
    roots = (work, llama_sources[0].parent)
    before = _snapshot(*roots)
    code, err, elapsed = _run(argv, capsys)
    _assert_one_error(code, err, case.field)
    assert _snapshot(*roots) == before
    if case.timed:
        assert elapsed < RESOURCE_SECONDS, f"{case.name} took {elapsed:.2f} s"


@pytest.mark.parametrize("argv, line", [
    (["merge", "r.yml", "out", "--dtype", "int8"], "error: --dtype: expected one of bfloat16, float16, float32, got "
                                                   "'int8'"),
    (["merge", "r.yml"], "error: output: missing (see `dfsmerge merge --help`)"),
    (["frob"], "error: command: expected one of merge, flatten, plan, evolve, eval, got 'frob'"),
    (["evolve", "s.yml", "--out", "run", "--x"], "error: --x: unknown argument (see `dfsmerge --help`)"),
])
def test_argument_errors_are_one_line_without_usage(argv, line, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line + "\n")


def test_error_messages_cut_long_values(llama_sources, tmp_path, capsys):
    _native(tmp_path, llama_sources[:2], extra="input_model: '" + "x" * 100_000 + "'\n")
    line = _assert_one_error(*_run(_merge(tmp_path, tmp_path / "r.yml"), capsys)[:2], "input_model")
    assert len(line) < 200


# ---------------------------------------------------------------------------------------------------- the disk


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable: mode 0555, or for root (whom modes do not stop) the immutable attribute."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(folder)]
    else:
        pytest.skip("root without chattr: cannot make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(undo, check=True)


def test_read_only_parent_is_one_line_and_leaves_nothing(llama_sources, tmp_path, capsys):
    parent = _dir(tmp_path / "ro")
    recipe = _native(tmp_path, llama_sources[:2])
    before = _snapshot(tmp_path)
    with _read_only(parent):
        code, err, _ = _run(["merge", recipe, parent / "out", "--quiet"], capsys)
        _assert_one_error(code, err, f"output: cannot write in {parent}")
    assert _snapshot(tmp_path) == before


def test_full_disk_is_one_line_and_leaves_nothing(llama_sources, tmp_path, capsys):
    """A disk that fills up while the weights are written, made with a file size limit (RLIMIT_FSIZE)."""
    recipe = _native(tmp_path, llama_sources[:2])
    before = _snapshot(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        code, err, _ = _run(["merge", recipe, tmp_path / "out", "--quiet", "--dtype", "float32"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    _assert_one_error(code, err, f"output: writing {tmp_path / 'out'} failed: File too large")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- claims


def test_target_claimed_by_another_merge_is_refused(llama_sources, tmp_path, capsys):
    from dfsmerge.writer import atomic_folder

    recipe = _native(tmp_path, llama_sources[:2])
    with atomic_folder(tmp_path / "out", False, []) as tmp:  # another merge, still writing
        code, err, _ = _run(["merge", recipe, tmp_path / "out", "--quiet"], capsys)
        _assert_one_error(code, err, "another dfsmerge process is writing")
        assert tmp.is_dir()
    assert (tmp_path / "out").is_dir()  # the first one finished normally


def test_folder_that_appears_during_a_merge_is_not_replaced(tmp_path):
    from dfsmerge import RecipeError
    from dfsmerge.writer import atomic_folder

    target = tmp_path / "out"
    with pytest.raises(RecipeError, match="out already exists; pass --force"):
        with atomic_folder(target, False, []) as tmp:
            (tmp / "model.safetensors").write_text("new")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _Merge:
    """``dfsmerge <argv>`` in a process of its own, forked from this one (so it needs no second import of torch
    and transformers), reading each source tensor 50 ms late: a merge that lasts long enough to be interrupted.
    Its stderr goes to a file."""

    def __init__(self, argv: list, folder: Path):
        self.err = folder / f".stderr-{time.monotonic_ns()}"
        self.process = multiprocessing.get_context("fork").Process(target=self._run, args=([str(a) for a in argv],))
        self.process.start()

    def _run(self, argv: list[str]) -> None:
        import dfsmerge.sources

        code = 1
        try:
            os.dup2(os.open(self.err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.stderr = open(2, "w", closefd=False)
            read = dfsmerge.sources.Checkpoint.get
            dfsmerge.sources.Checkpoint.get = lambda checkpoint, name: (time.sleep(0.05), read(checkpoint, name))[1]
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)

    def wait(self) -> tuple[int, str]:
        self.process.join(timeout=300)
        err = self.err.read_text()
        self.err.unlink()
        return self.process.exitcode, err


def _wait_for_temp_folder(parent: Path, merge: _Merge) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and merge.process.is_alive():
        found = list(parent.glob(".out.dfsmerge-tmp-*"))
        if found and any(found[0].iterdir()):
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no temporary folder appeared: {merge.wait()}")


def test_two_merges_into_one_target_one_wins(llama_sources, tmp_path):
    recipe = _native(tmp_path, llama_sources[:2])
    logs = _dir(tmp_path / "logs")
    before = _snapshot(llama_sources[0].parent)
    merges = [_Merge(["merge", recipe, tmp_path / "out", "--quiet", "--dtype", "float32"], logs) for _ in range(2)]
    results = [m.wait() for m in merges]
    assert sorted(code for code, _ in results)[0] == 0 and sorted(code for code, _ in results)[1] != 0, results
    loser = next(err for code, err in results if code != 0)
    _assert_one_error(2, loser, "output:")
    assert "another dfsmerge process is writing" in loser or "already exists" in loser
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "out", "r.yml"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert _snapshot(llama_sources[0].parent) == before


@pytest.mark.parametrize("signum, code, last", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "ctrl-c"])
def test_a_signal_mid_merge_cleans_up(llama_sources, tmp_path, signum, code, last):
    """SIGTERM cleans up like Ctrl-C; each exits with its shell status (128 + the signal) and one last line."""
    recipe = _native(tmp_path, llama_sources[:2])
    logs = _dir(tmp_path / "logs")
    merge = _Merge(["merge", recipe, tmp_path / "out", "--quiet"], logs)
    _wait_for_temp_folder(tmp_path, merge)
    os.kill(merge.process.pid, signum)
    status, err = merge.wait()
    assert status == code and "Traceback" not in err and err.strip().splitlines()[-1] == last, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "r.yml"]


def test_temp_folder_left_by_sigkill_is_removed_by_the_next_run(llama_sources, tmp_path, caplog):
    recipe = _native(tmp_path, llama_sources[:2])
    logs = _dir(tmp_path / "logs")
    merge = _Merge(["merge", recipe, tmp_path / "out", "--quiet"], logs)
    leftover = _wait_for_temp_folder(tmp_path, merge)
    os.kill(merge.process.pid, signal.SIGKILL)
    merge.wait()
    assert leftover.is_dir() and not (tmp_path / "out").exists()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    assert f"removed {leftover}, left by an interrupted dfsmerge run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "out", "r.yml"]


# ---------------------------------------------------------------------------------------------------- weights


def test_nan_in_a_source_tensor_is_a_warning_naming_it(llama_sources, tmp_path, caplog):
    """A tensor read through the process (here: converted from float32 to bfloat16) is scanned; one copied byte
    for byte into an output of its own dtype is not read at all (``copy_bytes``), so it is not."""
    bad = _tensors(_copy(llama_sources[1], tmp_path),
                   lambda t: t["model.layers.1.self_attn.q_proj.weight"].view(-1).__setitem__(5, float("nan")))
    recipe = _native(tmp_path, [llama_sources[0], bad])
    assert main(_merge(tmp_path, recipe, "--dtype", "bfloat16")) == 0
    assert "models[1]: tensor 'model.layers.1.self_attn.q_proj.weight' holds NaN or Inf values" in caplog.text
    written = load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"]
    assert torch.isnan(written.view(-1)[5])


def test_overflow_is_written_as_inf_only_when_allowed(llama_sources, tmp_path, caplog, capsys):
    recipe = _native(tmp_path, llama_sources[:2], "[{model: 0, layer: 0}, {model: 1, layer: 1, scale: 1.0e+6}]")
    line = _assert_one_error(*_run(_merge(tmp_path, recipe, "--dtype", "float16"), capsys)[:2], "value")
    folded = load_file(llama_sources[0] / "model.safetensors")["model.layers.0.mlp.down_proj.weight"] * 1e6
    peak = folded.view(-1)[folded.abs().argmax()]  # the value the error names: the largest one beyond the range
    assert f"value {float(peak):.6g} is beyond the float16 range" in line
    assert main(_merge(tmp_path, recipe, "--dtype", "float16", "--allow-overflow")) == 0
    assert "beyond the float16 range; written as +-inf" in caplog.text
    written = load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    # float16 rounds to nearest: values from 65520 on become inf (between 65504 and 65520 they round down)
    assert torch.isinf(written).any() and torch.equal(torch.isinf(written), folded.abs() >= 65520)


def test_overflow_beside_nan_of_the_source_is_still_refused(llama_sources, tmp_path, caplog, capsys):
    """Found by the fourth hostile pass: a tensor holding NaN (kept, warned) and a value that overflows float16 was
    written with +inf and exit 0."""
    name = "model.layers.0.mlp.down_proj.weight"
    bad = _tensors(_copy(llama_sources[0], tmp_path), lambda t: t[name].view(-1)[:2].copy_(
        torch.tensor([float("nan"), 1e30])))
    recipe = _native(tmp_path, [bad], "[{model: 0, layer: 0}, {model: 0, layer: 1, scale: 0.5}]")
    line = _assert_one_error(*_run(_merge(tmp_path, recipe, "--dtype", "float16"), capsys)[:2], name)
    assert "value 5e+29 is beyond the float16 range (+-65504) after folding; choose --dtype bfloat16 or float32" in line
    assert f"tensor {name!r} holds NaN or Inf values" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_fold_beyond_float32_beside_nan_of_the_source_is_refused(llama_sources, tmp_path, capsys, dtype):
    """Found by the fifth hostile pass: a fold that overflowed float32 itself, in a tensor holding NaN, was kept."""
    name = "model.layers.1.mlp.down_proj.weight"
    bad = _tensors(_copy(llama_sources[0], tmp_path), lambda t: t[name].view(-1)[:2].copy_(
        torch.tensor([float("nan"), 1e6])))
    recipe = _native(tmp_path, [bad], "[{model: 0, layer: 0}, {model: 0, layer: 1}, {model: 0, layer: 2, "
                                      "scale: 3.0e+38}]")
    line = _assert_one_error(*_run(_merge(tmp_path, recipe, "--dtype", dtype), capsys)[:2], name)
    assert "after folding, beyond float32 too; choose smaller scales" in line
    assert not (tmp_path / "out").exists()


def test_overflow_of_a_conversion_names_it_and_a_wider_dtype(llama_sources, tmp_path, capsys):
    name = "model.layers.1.self_attn.q_proj.weight"
    bad = _tensors(_copy(llama_sources[0], tmp_path), lambda t: t[name].view(-1).__setitem__(3, 3.4e38))
    line = _assert_one_error(*_run(_merge(tmp_path, _native(tmp_path, [bad], "[{model: 0, layer: 1}]"),
                                          "--dtype", "bfloat16"), capsys)[:2], name.replace("layers.1", "layers.0"))
    assert "beyond the bfloat16 range" in line and "converted from the source's dtype; choose --dtype float32," in line


def test_a_float8_source_tensor_is_converted(llama_sources, tmp_path):
    """Found by the fourth hostile pass: a float8 tensor crashed the NaN scan (no aminmax kernel for float8)."""
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _tensors(_copy(llama_sources[0], tmp_path), lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    stored = load_file(bad / "model.safetensors")[name]
    assert stored.dtype == torch.float8_e4m3fn
    assert main(_merge(tmp_path, _native(tmp_path, [bad], "[{model: 0, layer: 0}]"), "--dtype", "float32")) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")[name]
    assert written.dtype == torch.float32 and torch.equal(written, stored.float())


# ---------------------------------------------------------------------------------------------------- dtypes


def test_dtype_spellings_are_one_dtype(llama_sources, tmp_path):
    from dfsmerge import merge
    from dfsmerge.space import parse_search
    from dfsmerge.plan import dtype_name

    assert {dtype_name(d) for d in (torch.float16, "float16", "torch.float16")} == {"float16"}
    recipe = _native(tmp_path, llama_sources[:2])
    merge(recipe, tmp_path / "a", dtype=torch.float16, quiet=True)
    merge(recipe, tmp_path / "b", dtype="torch.float16", quiet=True)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float16"
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    doc = {"models": [str(p) for p in llama_sources[:2]], "dtype": "torch.float32",
           "evaluator": {"type": "loglik", "data": "d.jsonl"}}
    assert parse_search(doc, tmp_path).dtype == "float32"


# ---------------------------------------------------------------------------------------------------- interrupts


class _Finalized:
    def __init__(self, interrupt: KeyboardInterrupt):
        self.interrupt = interrupt

    def __del__(self):
        raise self.interrupt  # as a Ctrl-C that arrives while the garbage collector runs a finalizer


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), "terminated"])
def test_interrupt_dropped_by_a_finalizer_is_raised_again(interrupt):
    """Python prints an exception raised in a finalizer ("Exception ignored in") and goes on; a Ctrl-C there would
    be lost (and a later SIGTERM end the run with 143 instead of 130)."""
    from dfsmerge.writer import Terminated, sigterm_as_interrupt

    interrupt = Terminated("terminated by signal 15") if interrupt == "terminated" else interrupt
    with pytest.raises(type(interrupt)):
        with sigterm_as_interrupt():
            _Finalized(interrupt)  # dropped at once
            for _ in range(200):
                time.sleep(0.005)


@pytest.mark.parametrize("signal_name, code, last", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_interrupt_behind_a_library_error_exits_as_the_interrupt(monkeypatch, tmp_path, capsys, signal_name, code, last):
    """A library that fails while it handles the interrupt (Optuna's storage raises UnboundLocalError from its own
    except path when SIGTERM lands in a write) still exits as Ctrl-C / SIGTERM, with one last line."""
    from dfsmerge import cli
    from dfsmerge.writer import Terminated

    def storage_write(args):
        try:
            raise Terminated("terminated by signal 15") if signal_name == "SIGTERM" else KeyboardInterrupt()
        except BaseException:
            raise UnboundLocalError("cannot access local variable 'updated_state'")

    monkeypatch.setattr(cli, "cmd_plan", storage_write)
    recipe = tmp_path / "r.yml"
    recipe.write_text("models: [a]\nhops: [{model: 0, layer: 0}]\n")
    assert cli.main(["plan", str(recipe)]) == code
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == last and "Traceback" not in err


def test_a_second_interrupt_during_cleanup_waits_until_the_temporary_folder_is_gone(llama_sources, tmp_path,
                                                                                     monkeypatch):
    """Found by the fourth hostile pass: a second Ctrl-C while the first one's cleanup ran left the temporary
    folder behind. Here the first interrupt comes from the writer and the second arrives inside the removal."""
    import dfsmerge.writer as writer

    removed, rmtree = [], shutil.rmtree

    def rmtree_interrupted(path, ignore_errors=False):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, in the middle of the cleanup
        time.sleep(0.05)
        rmtree(path, ignore_errors=ignore_errors)
        removed.append(path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    merge_module = importlib.import_module("dfsmerge.merge")  # `dfsmerge.merge` is the function
    monkeypatch.setattr(merge_module, "write_tensors", interrupted)
    monkeypatch.setattr(writer.shutil, "rmtree", rmtree_interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge(_native(tmp_path, llama_sources[:2]), tmp_path / "out", quiet=True)
    assert removed and not any(p.name.startswith(".out.dfsmerge-tmp-") for p in tmp_path.iterdir())


@pytest.mark.parametrize("broken", ["shape", "truncated", "tokenizer", "data", "search-data", "compact-missing"])
def test_eval_checks_every_model_before_scoring_the_first(llama_sources, tmp_path, capsys, broken):
    """``eval GOOD BAD``: BAD is found before GOOD is scored (found by the fifth hostile pass: GOOD was scored,
    its line printed, then BAD failed)."""
    bad = _copy(llama_sources[1], tmp_path)
    if broken == "shape":
        _config(bad, vocab_size=66)
    elif broken == "truncated":
        _cut(bad / "model.safetensors")
    elif broken == "tokenizer":
        _bytes(bad / "tokenizer.json", b"{not json")
    elif broken == "compact-missing":  # a stored layer's tensor gone: found by the headers, not by transformers
        bad = _tensors(_compact(llama_sources[1], tmp_path), lambda t: t.pop("model.dfs_layers.1.mlp.up_proj.weight"))
    else:  # a tokenizer that reads the whole text as one unknown word: nothing to score in it
        tokenizer = json.loads((bad / "tokenizer.json").read_text())
        (bad / "tokenizer.json").write_text(json.dumps({**tokenizer, "pre_tokenizer": None}))
    data = _text(tmp_path / "d.jsonl", '{"text": "the cat sat"}\n')
    where = ["--data", data] if broken != "search-data" else ["--search", _search(tmp_path, llama_sources)]
    code = main([str(a) for a in ["eval", llama_sources[0], bad, *where]])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("error:") == 1 and "Traceback" not in err
    assert str(bad) in err or "expected text with at least 2 tokens" in err


def test_unusual_but_valid_tokenizer_files_and_dangling_links_are_accepted(llama_sources, tmp_path, capsys):
    """A ``tokenizer_class`` of null (transformers reads it) and a dangling link in a source folder (it protects
    where it points, not ``/``: every output was refused) do not stop a merge."""
    source = _copy(llama_sources[0], tmp_path, "src")
    config = json.loads((source / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": None}))
    (source / "notes.txt").symlink_to("/nonexistent/notes.txt")
    out = tmp_path / "out"
    assert main([str(a) for a in ["merge", _native(tmp_path, [source, llama_sources[1]]), out, "--quiet"]]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text()).get("tokenizer_class") is None
    capsys.readouterr()
    assert main([str(a) for a in ["merge", _native(tmp_path, [source, llama_sources[1]]), "/nonexistent/notes.txt",
                                  "--quiet"]]) == 2  # the place the link points to stays the source's
    assert "is the source" in capsys.readouterr().err
