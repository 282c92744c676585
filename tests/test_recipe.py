"""Recipe validation: every key checked before work starts, one-line errors naming the key."""
import pytest

from schemas.errors import MatesError
from schemas.method_options import METHOD_OPTIONS
from schemas.recipe import load_recipe, recipe_from_dict
from tests.conftest import MICRO_RECIPE

BASE = {"data": "/tmp/d", "run": "/tmp/r"}


def error_of(raw: dict) -> str:
    with pytest.raises(MatesError) as info:
        recipe_from_dict({**BASE, **raw})
    message = str(info.value)
    assert "\n" not in message
    return message


def test_packaged_recipes_validate():
    recipe = load_recipe(MICRO_RECIPE)
    assert recipe.ingest.seq_len == 64 == recipe.model.max_seq_len  # ${seq_len} interpolated as int
    assert recipe.stage_batches == [30, 20] and recipe.total_batches == 50
    assert recipe.checkpoint_url == "./mates-runs/micro/checkpoints"


def test_unknown_key_names_key_and_allowed_keys():
    message = error_of({"model": {"d_modle": 64}})
    assert "`model.d_modle`" in message and "d_model" in message


def test_unknown_top_level_key():
    assert "`optimiser`" in error_of({"optimiser": {}})


def test_wrong_type_names_key():
    message = error_of({"train_loader": {"batch_size": "sixteen"}})
    assert "`train_loader.batch_size`" in message and "int" in message


def test_unknown_method_lists_allowed():
    message = error_of({"stages": {"method": "magic"}})
    assert "`stages.method`" in message
    for name in METHOD_OPTIONS:
        assert name in message


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_selection_ratio_outside_unit_interval(ratio):
    assert "`stages.selection_ratio`" in error_of({"stages": {"selection_ratio": ratio}})


@pytest.mark.parametrize("seconds", [0, -5, "soon"])
def test_dist_timeout_must_be_positive_seconds(seconds):
    assert "`dist_timeout_s`" in error_of({"dist_timeout_s": seconds})
    assert recipe_from_dict({**BASE, "dist_timeout_s": 30}).dist_timeout_s == 30.0


def test_sequence_longer_than_context():
    assert "`ingest.seq_len`" in error_of({"ingest": {"seq_len": 256}, "model": {"max_seq_len": 128}})


def test_stage_batches_list_must_match_count():
    assert "`stages.batches`" in error_of({"stages": {"count": 3, "batches": [1, 2]}})
    assert recipe_from_dict({**BASE, "stages": {"count": 3, "batches": [5]}}).stage_batches == [5, 5, 5]


def test_method_options_validated_against_method():
    assert "`stages.options.n_probes`" in error_of({"stages": {"method": "random", "options": {"n_probes": 3}}})
    assert "`stages.options.n_probes`" in error_of({"stages": {"method": "mates", "options": {"n_probes": 0}}})
    # per-method blocks: the error names the key inside the block the user wrote
    assert "`stages.options.dsir.n_features`" in error_of(
        {"stages": {"method": "dsir", "options": {"dsir": {"n_features": 0}}}})
    assert "`stages.options.perplexity.band` must be one of 'middle', 'low', 'high'" in error_of(
        {"stages": {"method": "perplexity", "options": {"perplexity": {"band": "top"}}}})


def test_demo_recipe_is_the_bench_recipe_with_method_mates():
    """`make demo` is one of the comparison's runs: the two recipes may differ in these keys only."""
    from jobs.commands import recipe_path
    from schemas.recipe import load_recipe

    bench, demo = (load_recipe(recipe_path(n)).to_dict() for n in ("bench", "demo"))
    assert {k for k in bench if bench[k] != demo[k]} == {"run", "stages"}
    assert {k for k in bench["stages"] if bench["stages"][k] != demo["stages"][k]} == {"method"}
    assert demo["stages"]["method"] == "mates"


def test_missing_required_and_bad_yaml(tmp_path):
    with pytest.raises(MatesError, match="`data` is required"):
        recipe_from_dict({"run": "/tmp/r"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(MatesError, match="not valid YAML"):
        load_recipe(str(bad))


def test_undefined_variable():
    assert "names no variable" in error_of({"run": "${nowhere}/x"})


def test_method_registry_matches_recipe_schema():
    from curation.methods import REGISTRY

    assert set(REGISTRY) == set(METHOD_OPTIONS)


def test_per_method_option_blocks():
    raw = {**BASE, "stages": {"method": "random", "options": {"mates": {"n_probes": 7}, "random": {}}}}
    assert type(recipe_from_dict(raw).method_options).__name__ == "RandomOptions"
    raw["stages"]["method"] = "mates"
    assert recipe_from_dict(raw).method_options.n_probes == 7
    raw["stages"]["options"]["mates"]["n_probs"] = 1
    assert "`stages.options.mates.n_probs`" in error_of({"stages": raw["stages"]})


def test_warmup_ratio_checked():
    assert "`stages.warmup_ratio`" in error_of({"stages": {"warmup_ratio": 0}})
    assert recipe_from_dict(BASE).stages.warmup_ratio == 1.0


def test_backbone_option_of_mates_and_group_mates():
    for method in ("mates", "group_mates"):
        stages = {"method": method, "options": {method: {"backbone": "frozen"}}}
        opts = recipe_from_dict({**BASE, "stages": stages}).method_options
        assert (opts.backbone, opts.head_epochs, opts.embedding_dtype) == ("frozen", 100, "float32")
        stages["options"][method]["backbone"] = "frozn"
        allowed = "'finetune', 'frozen', 'oracle', 'ngram'" if method == "mates" else "'finetune', 'frozen'"
        assert error_of({"stages": stages}) == (f"`stages.options.{method}.backbone` must be one of "
                                                f"{allowed}; got 'frozn'.")
    # the relational model needs every candidate's embedding: the oracle backbone is mates' alone
    oracle = {"method": "group_mates", "options": {"group_mates": {"backbone": "oracle"}}}
    assert "`stages.options.group_mates.backbone` must be one of 'finetune', 'frozen'" in error_of({"stages": oracle})
    assert recipe_from_dict({**BASE, "stages": {"method": "mates"}}).method_options.backbone == "finetune"
    assert "`stages.options.head_epochs`" in error_of({"stages": {"method": "mates", "options": {"head_epochs": 0}}})


def test_forward_oracle_and_trajectory_keys():
    """The forward oracle's and the trajectories' keys: defaults, and one-line errors naming them."""
    opts = recipe_from_dict({**BASE, "stages": {"method": "group_mates"}}).method_options
    assert (opts.reference_batch, opts.forward_derivative, opts.trajectory_batch, opts.trajectory_reference) \
        == (1, "auto", None, None)
    group = {"method": "group_mates", "options": {"probe_method": "forward", "trajectory_batch": 1,
                                                  "trajectory_reference": 16}}
    opts = recipe_from_dict({**BASE, "stages": group}).method_options
    assert (opts.probe_method, opts.trajectory_batch, opts.trajectory_reference) == ("forward", 1, 16)
    assert error_of({"stages": {"method": "mates", "options": {"probe_method": "backward"}}}) == (
        "`stages.options.probe_method` must be one of 'exact', 'first_order', 'preconditioned', 'forward'; "
        "got 'backward'.")
    assert error_of({"stages": {"method": "mates", "options": {"forward_derivative": "fd"}}}) == (
        "`stages.options.forward_derivative` must be one of 'auto', 'central', 'jvp'; got 'fd'.")
    assert "`stages.options.reference_batch` must be >= 1" in error_of(
        {"stages": {"method": "mates", "options": {"reference_batch": 0}}})
    for key in ("trajectory_batch", "trajectory_reference"):
        assert f"`stages.options.group_mates.{key}` must be >= 1 or null" in error_of(
            {"stages": {"method": "group_mates", "options": {"group_mates": {key: 0}}}})
    assert "`stages.options.trajectory_batch`" in error_of(
        {"stages": {"method": "mates", "options": {"trajectory_batch": 2}}})  # not a mates key
