"""Recipe parsing: the legacy file format as real files have it, the native format, safety, field errors."""

import collections
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfsmerge.recipe import RecipeError, dump_legacy, dump_native, load_recipe, load_yaml, parse_recipe

LEGACY = """\
model_paths:
- !!python/tuple [org/model-a, null]
- !!python/tuple [org/model-b, abc123]
num_r: 2
layer_mask: &mask
- [[true, false, true], [false, true, false]]
- [[false, false, true], [true, false, false]]
scaling_factors:
- [[0.5, 1.0, 2.0], [1.0, 3.0, 1.0]]
- [[1.0, 1.0, 4.0], [5.0, 1.0, 1.0]]
input_layer_model: 0
output_layer_model: 1
"""


def _write(tmp_path, text, name="r.yml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_legacy_hop_order_scales_and_last_layer(tmp_path):
    recipe = load_recipe(_write(tmp_path, LEGACY))
    got = [(h.model, h.layer, h.transform.scale) for h in recipe.hops]
    # n=0: model 0 layers 0, 2; model 1 layer 1; n=1: model 0 layer 2; model 1 layer 0; then the last layer of
    # output_layer_model (1) with last_layer_scale 1.
    assert got == [(0, 0, 0.5), (0, 2, 2.0), (1, 1, 3.0), (0, 2, 4.0), (1, 0, 5.0), (1, 2, 1.0)]
    assert [(s.path, s.revision) for s in recipe.sources] == [("org/model-a", None), ("org/model-b", "abc123")]
    assert (recipe.input_model, recipe.output_model) == (0, 1)


def test_last_layer_scale_is_a_scale_not_a_bias(tmp_path):
    recipe = load_recipe(_write(tmp_path, LEGACY + "last_layer_scale: 0.7\n"))
    last = recipe.hops[-1].transform
    assert last.scale == pytest.approx(0.7) and not last.has_bias


def test_exponents_without_a_dot_are_numbers_as_in_yaml_1_2(tmp_path):
    """PyYAML (YAML 1.1) reads ``5e-1`` as text; the hostile pass found ``scale: 1e5`` refused as "not a number"."""
    recipe = load_recipe(_write(tmp_path, LEGACY.replace("[0.5, 1.0, 2.0]", "[5e-1, 1E0, 2e+0]")
                                + "last_layer_scale: 7e-1\n"))
    assert [h.transform.scale for h in recipe.hops][:3] == [0.5, 2.0, 3.0]
    assert recipe.hops[-1].transform.scale == pytest.approx(0.7)
    assert load_yaml("a: 1_0e2\nb: e5\nc: 12\n", "x.yml") == {"a": 1000.0, "b": "e5", "c": 12}
    assert yaml.safe_load("a: 1e5") == {"a": "1e5"}  # PyYAML's own loader is left as it is


def test_numbers_follow_the_yaml_1_2_core_schema():
    """The YAML 1.2 core schema's ints and floats (https://yaml.org/spec/1.2.2/#1032-tag-resolution); PyYAML's 1.1
    rules read 010 as 8, 1:30 as 90 and 0b11 as 3, and 1.5e3 as text (the hostile pass)."""
    doc = load_yaml("a: 010\nb: 0o10\nc: 0x10\nd: 1.5e3\ne: -.5e-1\nf: .inf\ng: -.INF\nh: 1:30\ni: 0b11\n"
                    "j: 1.0E2\nk: 1_000\nl: -0x10\nm: +12\nn: !!float 3\no: true\n", "x.yml")
    assert doc == {"a": 10, "b": 8, "c": 16, "d": 1500.0, "e": -0.05, "f": float("inf"), "g": float("-inf"),
                   "h": "1:30", "i": "0b11", "j": 100.0, "k": 1000, "l": "-0x10", "m": 12, "n": 3.0, "o": True}
    assert [type(doc[k]) for k in "abcdn"] == [int, int, int, float, float]
    assert load_yaml("a: .NaN\n", "x.yml")["a"] != load_yaml("a: .NaN\n", "x.yml")["a"]  # NaN
    assert yaml.safe_load("a: 010\nb: 1:30") == {"a": 8, "b": 90}  # PyYAML's own loader is left as it is


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(), st.integers(-(10**30), 10**30), st.booleans(), st.none(),
                          st.text("abcxyz/-_", max_size=8)), max_size=6))
def test_legacy_files_written_by_yaml_dump_load_as_they_were_written(values):
    """``yaml.dump`` (PyYAML, YAML 1.1) writes the legacy format: floats as ``1.0e-05``, ``.inf``, tuples and an
    ``OrderedDict`` tag; the numbers, flags and names it writes load as the values it was given."""
    doc = collections.OrderedDict(model_paths=[("org/a", None)], values=values, pair=tuple(values))
    loaded = load_yaml(yaml.dump(doc), "x.yml")
    expected = {"model_paths": [["org/a", None]], "values": values, "pair": list(values)}
    assert loaded.keys() == expected.keys()
    for key in expected:
        got, want = loaded[key], expected[key]
        assert isinstance(got, list) and len(got) == len(want), key
        # NaN (written .nan) equals nothing, itself included
        assert all((g == w or g != g and w != w) and type(g) is type(w) for g, w in zip(got, want)), (key, got)


@settings(max_examples=200, deadline=None)
@given(st.text("0123456789.:_-+eEbox", min_size=1, max_size=8))
def test_written_recipes_quote_names_that_look_like_numbers(name):
    """A source named ``08`` or ``1e5`` (text by YAML 1.1, a number by 1.2) is written quoted by ``dump_native``
    and ``dump_legacy``, so both loaders read it back as the name."""
    recipe = parse_recipe({"models": [name], "hops": [{"layer": 0}]})
    native = dump_native(recipe)
    legacy = dump_legacy(recipe.sources, [[[True]]], [[[1.0]]])
    assert load_yaml(native, "x.yml")["models"] == yaml.safe_load(native)["models"] == [name]
    assert load_yaml(legacy, "x.yml")["model_paths"] == yaml.safe_load(legacy)["model_paths"] == [[name, None]]


def test_add_last_layer_false(tmp_path):
    recipe = load_recipe(_write(tmp_path, LEGACY + "add_last_layer: false\n"))
    assert len(recipe.hops) == 5


def test_ordered_dict_wrapper_and_anchors_as_yaml_dump_writes_them(tmp_path):
    doc = collections.OrderedDict(
        model_paths=[("a", None), ("b", "main")], num_r=1,
        layer_mask=[[[True, False], [False, True]]],
        scaling_factors=[[[1.0, 2.0], [3.0, [1.0, 2.0, 3.0, 4.0]]]],
        bias_factors=[[[0.0, 0.0], [0.0, [0.1, 0.2, 0.3, 0.4]]]],
        input_layer_model=0, output_layer_model=0, add_last_layer=False)
    text = yaml.dump(doc)  # PyYAML's own output: OrderedDict tag plus !!python/tuple
    assert "!!python/object/apply:collections.OrderedDict" in text and "!!python/tuple" in text
    recipe = load_recipe(_write(tmp_path, text))
    assert [(h.model, h.layer) for h in recipe.hops] == [(0, 0), (1, 1)]
    vector = recipe.hops[1].transform
    assert torch.equal(vector.scale, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(vector.bias, torch.tensor([0.1, 0.2, 0.3, 0.4]))


def test_alias_shares_the_mask(tmp_path):
    text = LEGACY.replace("scaling_factors:\n- [[0.5, 1.0, 2.0], [1.0, 3.0, 1.0]]\n- [[1.0, 1.0, 4.0], [5.0, 1.0, 1.0]]\n",
                          "scaling_factors: *mask\n")
    with pytest.raises(RecipeError, match=r"scaling_factors\[0\]\[0\]\[0\]: expected a number"):
        load_recipe(_write(tmp_path, text))  # booleans are not scales: the alias resolved to the mask


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system [\"touch {p}\"]",
                                 "!!python/name:os.system", "!!python/object:collections.Counter {{}}",
                                 "!!python/object/new:subprocess.Popen [[touch, {p}]]", "!custom 1"])
def test_other_python_tags_are_refused_and_run_nothing(tmp_path, tag):
    marker = tmp_path / "pwned"
    text = LEGACY + "extra: " + tag.format(p=marker) + "\n"
    with pytest.raises(RecipeError, match="unknown tag !custom:" if tag.startswith("!custom") else "refusing"):
        load_recipe(_write(tmp_path, text))
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    (("num_r: 2", "num_r: 3"), r"layer_mask: expected shape \(3, 2, n_layers\), got \(2, 2, 3\)"),
    (("num_r: 2", "num_r: zero"), r"num_r: expected an integer"),
    (("- [[0.5, 1.0, 2.0], [1.0, 3.0, 1.0]]\n", "- [[0.5, 1.0], [1.0, 3.0]]\n"),
     r"scaling_factors: expected shape \(2, 2, 3\)"),
    (("[[1.0, 1.0, 4.0], [5.0, 1.0, 1.0]]", "[[1.0, 1.0, [[1, 2]]], [5.0, 1.0, 1.0]]"),
     r"scaling_factors\[1\]\[0\]\[2\]: expected a number, a length-H vector or an H x H matrix, got shape \(1, 2\)"),
    (("input_layer_model: 0", "input_layer_model: 2"), r"input_layer_model: expected a model index in 0..1, got 2"),
    (("output_layer_model: 1", "output_layer_model: -1"), r"output_layer_model: expected a model index"),
    (("- !!python/tuple [org/model-b, abc123]", "- 42"), r"model_paths\[1\]: expected a path or hub ID"),
    (("input_layer_model: 0", "input_layer_model: 0\nlayer_masks: 1"),
     r"recipe: unknown key 'layer_masks' \(did you mean 'layer_mask'\?\)"),
    (("[[true, false, true], [false, true, false]]", "[[true, false, true], [false, true]]"),
     r"layer_mask: expected shape \(2, 2, n_layers\), got a ragged"),
])
def test_each_malformed_field_has_its_own_error(tmp_path, edit, message):
    assert edit[0] in LEGACY
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, LEGACY.replace(*edit)))


def test_empty_mask_is_an_error(tmp_path):
    text = LEGACY.replace("true", "false") + "add_last_layer: false\n"
    with pytest.raises(RecipeError, match="selects no layer"):
        load_recipe(_write(tmp_path, text))


def test_native_format_and_round_trip(tmp_path):
    text = """\
models: [./a, {path: org/b, revision: v1}]
input_model: 1
output_model: 0
hops:
  - {model: 0, layer: 3}
  - {model: 1, layer: 3, scale: 0.9}
  - {model: 0, layer: 3, scale: [1.0, 2.0], bias: [0.5, 0.5]}
"""
    recipe = load_recipe(_write(tmp_path, text))
    assert [(h.model, h.layer) for h in recipe.hops] == [(0, 3), (1, 3), (0, 3)]
    assert recipe.sources[1].revision == "v1"
    again = parse_recipe(yaml.safe_load(dump_native(recipe)))
    assert [(h.model, h.layer, h.transform.to_yaml()) for h in again.hops] == \
           [(h.model, h.layer, h.transform.to_yaml()) for h in recipe.hops]
    assert (again.input_model, again.output_model) == (1, 0)


@pytest.mark.parametrize("hops, message", [
    ("[{model: 2, layer: 0}]", r"hops\[0\].model: expected a model index in 0..1, got 2"),
    ("[{model: 0, layer: -1}]", r"hops\[0\].layer: expected a layer index >= 0"),
    ("[{model: 0, layer: 0, scale: [1.0, 2.0]}, {model: 0, layer: 1, scale: [1.0, 2.0, 3.0]}]",
     r"different hidden sizes"),
    ("[{model: 0, layer: 0, scal: 2}]", r"hops\[0\]: unknown key 'scal' \(did you mean 'scale'\?\)"),
    ("[{model: 0, layer: 0, scale: .nan}]", r"hops\[0\].scale: contains NaN"),
])
def test_native_errors(tmp_path, hops, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_write(tmp_path, f"models: [a, b]\nhops: {hops}\n"))


def test_legacy_dump_loads_back(tmp_path):
    from dfsmerge.recipe import Source

    text = dump_legacy([Source("a"), Source("b", "r1")], [[[True, False], [True, True]]],
                       [[[0.5, 1.0], [1.5, 2.0]]])
    recipe = load_recipe(_write(tmp_path, text))
    assert [(h.model, h.layer, h.transform.scale) for h in recipe.hops] == [(0, 0, 0.5), (1, 0, 1.5), (1, 1, 2.0)]


# ---------------------------------------------------------------------------------------------------- fuzzing

_KEYS = ["model_paths", "num_r", "layer_mask", "scaling_factors", "bias_factors", "input_layer_model",
         "output_layer_model", "add_last_layer", "last_layer_scale", "classification", "models", "hops", "model",
         "layer", "scale", "bias", "path", "revision", "input_model", "output_model", "layer_masks"]
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.integers(), st.floats(),
                     st.sampled_from(["a", "org/m", "./m", "", "main", "../x", "..", "1e400"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(_KEYS), inner, max_size=4), max_leaves=40)
_DOCUMENTS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=8).map(
    lambda doc: yaml.safe_dump(doc).encode())
_YAML_ALPHABET = "[]{}:,-&*!|>'\"\n\t #0123456789.e+_ablmnorstuy/\\"
_MASK = [[[True, False, True], [False, True, False]]]
_LEGACY_DOCS = st.fixed_dictionaries(
    {"model_paths": st.one_of(st.just([["a", None], ["b", "v1"]]), _VALUES), "num_r": st.one_of(st.just(1), _SCALARS),
     "layer_mask": st.one_of(st.just(_MASK), _VALUES)},
    optional={"scaling_factors": st.one_of(st.just([[[0.5, 1, [1.0, 2.0]], [1, 2, 3]]]), _VALUES),
              "bias_factors": _VALUES, "input_layer_model": _SCALARS, "output_layer_model": _SCALARS,
              "add_last_layer": _SCALARS, "last_layer_scale": _VALUES, "classification": _SCALARS})
_NATIVE_DOCS = st.fixed_dictionaries(
    {"models": st.one_of(st.just(["a", {"path": "b", "revision": "main"}]), _VALUES),
     "hops": st.lists(st.dictionaries(st.sampled_from(["model", "layer", "scale", "bias"]), _VALUES), max_size=4)},
    optional={"input_model": _SCALARS, "output_model": _SCALARS, "classification": _SCALARS})
_SEEDS = [LEGACY.encode(), yaml.dump(collections.OrderedDict(model_paths=[("a", None)], num_r=1,
                                                               layer_mask=[[[True, 1]]])).encode()]
_FUZZ = st.one_of(
    st.binary(max_size=300), _DOCUMENTS, st.text(_YAML_ALPHABET, max_size=300).map(str.encode),
    st.one_of(_LEGACY_DOCS, _NATIVE_DOCS).map(lambda doc: yaml.safe_dump(doc).encode()),
    st.tuples(st.sampled_from(_SEEDS), st.integers(0, 400), st.integers(0, 8), st.binary(max_size=8)).map(
        lambda t: t[0][:t[1]] + t[3] + t[0][t[1] + t[2]:]),  # a real recipe with a few bytes changed
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_FUZZ)
def test_any_bytes_parse_or_give_one_line_recipe_error(data):
    """Whatever the bytes, the parser returns a recipe or raises a one-line RecipeError, within a second."""
    started = time.perf_counter()
    try:
        parse_recipe(load_yaml(data, "fuzz.yml"))
    except RecipeError as exc:
        assert "\n" not in str(exc) and 0 < len(str(exc)) <= 1000
    assert time.perf_counter() - started < 1.0
