"""Recipes, ``--set`` overrides and config files give typed, validated RunConfigs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from scpretrain_dist import config, recipes
from scpretrain_dist.config import ConfigError, RunConfig


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_builds_a_complete_config(name):
    cfg = recipes.get(name)
    assert isinstance(cfg, RunConfig)
    # every section is its own typed dataclass, and the whole thing serialises
    for f in dataclasses.fields(RunConfig):
        value = getattr(cfg, f.name)
        if f.name != "work_dir":
            assert dataclasses.is_dataclass(value), f.name
    data = json.loads(cfg.to_json())
    assert set(data) == {f.name for f in dataclasses.fields(RunConfig)}
    # a recipe survives a round trip through merge unchanged
    assert config.merge(RunConfig(), cfg.to_dict()) == cfg


def test_recipe_values():
    assert recipes.get("paper") == RunConfig()
    tiny = recipes.get("tiny")
    assert tiny.evaluate.targets == ("demo_03",)
    assert tiny.pretrain.iterations == 2
    assert tiny.finetune.seeds == (0,)
    gpu = recipes.get("atlas_8gpu")
    assert gpu.pretrain.use_gpu is True and gpu.pseudolabel.use_gpu is True
    assert gpu.pretrain.num_workers == 8


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ConfigError, match="tiny"):
        recipes.get("no_such_recipe")


def test_overrides_give_typed_values():
    base = recipes.get("tiny")
    cfg = config.resolve(
        base,
        overrides=[
            "pretrain.epochs=3",
            'evaluate.targets=["a","b"]',
            "pretrain.use_gpu=true",
            "pseudolabel.use_gpu=false",
            "pretrain.lr=1e-2",
            "pseudolabel.cluster_sizes=[10, 20]",
            "finetune.seeds=[4]",
            "tracking.experiment=my-exp",
            "work_dir=/tmp/somewhere/else",
        ],
    )
    assert cfg.pretrain.epochs == 3 and type(cfg.pretrain.epochs) is int
    assert cfg.evaluate.targets == ("a", "b") and isinstance(cfg.evaluate.targets, tuple)
    assert cfg.pretrain.use_gpu is True
    assert cfg.pseudolabel.use_gpu is False
    assert cfg.pretrain.lr == pytest.approx(0.01) and type(cfg.pretrain.lr) is float
    assert cfg.pseudolabel.cluster_sizes == (10, 20)
    assert all(type(k) is int for k in cfg.pseudolabel.cluster_sizes)
    assert cfg.finetune.seeds == (4,)
    assert cfg.tracking.experiment == "my-exp"
    assert cfg.work_dir == "/tmp/somewhere/else"
    # the rest of the recipe is kept (deep merge, not a section reset)
    assert cfg.pretrain.batch_size == base.pretrain.batch_size == 128
    assert cfg.pretrain.iterations == base.pretrain.iterations
    assert cfg.pseudolabel.niter == base.pseudolabel.niter
    # the base is frozen and untouched
    assert base.pretrain.epochs == 6


@pytest.mark.parametrize(
    "override, expected",
    [
        ("evaluate.targets=demo_03", ("demo_03",)),
        ("evaluate.targets=a,b", ("a", "b")),
        ('evaluate.targets=["x"]', ("x",)),
        ("evaluate.targets=[]", ()),
    ],
)
def test_tuple_overrides_from_plain_text(override, expected):
    cfg = config.resolve(recipes.get("tiny"), overrides=[override])
    assert cfg.evaluate.targets == expected


def test_float_field_accepts_an_integer_and_int_field_an_integral_float():
    cfg = config.resolve(RunConfig(), overrides=["pretrain.lr=1", "pretrain.epochs=4.0"])
    assert cfg.pretrain.lr == 1.0 and type(cfg.pretrain.lr) is float
    assert cfg.pretrain.epochs == 4 and type(cfg.pretrain.epochs) is int


def test_later_override_wins():
    cfg = config.resolve(RunConfig(), overrides=["pretrain.epochs=3", "pretrain.epochs=9"])
    assert cfg.pretrain.epochs == 9


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.epoch=3", "pretrain.epoch"),
        ("no_section.epochs=3", "no_section"),
        ("model.hidden=3", "model.hidden"),
        ("not_a_key=1", "not_a_key"),
    ],
)
def test_unknown_keys_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        config.resolve(RunConfig(), overrides=[override])
    assert key in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("pretrain.epochs=abc", "pretrain.epochs"),
        ("pretrain.epochs=2.5", "pretrain.epochs"),
        ("pretrain.epochs=true", "pretrain.epochs"),
        ("pretrain.lr=fast", "pretrain.lr"),
        ("pretrain.use_gpu=maybe", "pretrain.use_gpu"),
        ('pseudolabel.cluster_sizes=["big"]', "pseudolabel.cluster_sizes"),
        ("pretrain=3", "pretrain"),
        ("pretrain.epochs.inner=3", "pretrain.epochs"),
    ],
)
def test_wrong_types_raise_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        config.resolve(RunConfig(), overrides=[override])
    assert key in str(info.value)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        config.parse_override("pretrain.epochs")


def test_parse_override_nests_and_parses_toml():
    assert config.parse_override("pretrain.epochs=5") == {"pretrain": {"epochs": 5}}
    assert config.parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}
    assert config.parse_override("store.uri=s3://bucket/atlas") == {
        "store": {"uri": "s3://bucket/atlas"}
    }


def test_toml_file_is_applied_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'work_dir = "from_file"\n'
        "[pretrain]\nepochs = 7\nuse_gpu = true\nexclude_datasets = [\"d1\", \"d2\"]\n"
        "[evaluate]\ntargets = [\"x\"]\n"
        "[pseudolabel]\ncluster_sizes = [30, 60]\n"
    )
    base = recipes.get("tiny")
    cfg = config.resolve(base, file=path)
    assert cfg.work_dir == "from_file"
    assert cfg.pretrain.epochs == 7
    assert cfg.pretrain.use_gpu is True
    assert cfg.pretrain.exclude_datasets == ("d1", "d2")
    assert cfg.evaluate.targets == ("x",)
    assert cfg.pseudolabel.cluster_sizes == (30, 60)
    assert cfg.pretrain.batch_size == base.pretrain.batch_size  # untouched settings kept
    # command-line overrides come after the file
    cfg2 = config.resolve(base, file=path, overrides=["pretrain.epochs=2"])
    assert cfg2.pretrain.epochs == 2
    assert cfg2.evaluate.targets == ("x",)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve(RunConfig(), file=tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[pretrain\nepochs = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.resolve(RunConfig(), file=broken)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[pretrain]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="pretrain.epochz"):
        config.resolve(RunConfig(), file=unknown)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[finetune]\nmax_epochs = "lots"\n')
    with pytest.raises(ConfigError, match="finetune.max_epochs"):
        config.resolve(RunConfig(), file=wrong)


def test_derived_locations(tmp_path):
    cfg = config.resolve(RunConfig(), overrides=[f'work_dir="{tmp_path}"'])
    assert cfg.store_uri == str(tmp_path / "atlas.soma")
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("mlflow.db")
    cfg = config.resolve(cfg, overrides=['store.uri="/data/x.soma"', 'tracking.tracking_uri="http://h:5000"'])
    assert cfg.store_uri == "/data/x.soma"
    assert cfg.tracking_uri == "http://h:5000"


def test_encoder_cache_key_tracks_what_changes_the_encoder():
    from scpretrain_dist.pipeline import pretrain_key

    base = recipes.get("tiny")
    key = pretrain_key(base, ["a", "b"])
    assert pretrain_key(base, ["b", "a"]) == key  # the order datasets are named in does not matter
    assert pretrain_key(base, ["a"]) != key
    assert pretrain_key(config.resolve(base, overrides=["pretrain.lr=0.5"]), ["a", "b"]) != key
    # exclusions are already in the dataset list; stream settings only matter when streaming
    assert pretrain_key(config.resolve(base, overrides=['pretrain.exclude_datasets=["c"]']), ["a", "b"]) == key
    assert pretrain_key(config.resolve(base, overrides=["stream.buffer_cells=1024"]), ["a", "b"]) == key
    stream = config.resolve(base, overrides=['pretrain.loader="stream"'])
    assert pretrain_key(stream, ["a", "b"]) != key
    assert pretrain_key(config.resolve(stream, overrides=["stream.buffer_cells=1024"]), ["a", "b"]) != pretrain_key(stream, ["a", "b"])
    assert pretrain_key(config.resolve(stream, overrides=["stream.prefetch_buffers=3"]), ["a", "b"]) == pretrain_key(stream, ["a", "b"])
    # how a run copes with failures changes nothing it computes
    assert pretrain_key(config.resolve(base, overrides=["pretrain.max_failures=0", "pseudolabel.actor_restarts=5"]),
                        ["a", "b"]) == key
    # nor where the workers run, or with which resources
    assert pretrain_key(config.resolve(base, overrides=["pretrain.placement=SPREAD", "pretrain.cpus_per_worker=2",
                                                        "pretrain.resources_per_worker={a100 = 1}"]), ["a", "b"]) == key
    # the gradient exchange's dtype: in the key only when it is not the float32 every earlier encoder had
    assert pretrain_key(config.resolve(base, overrides=['pretrain.gradient_sync_dtype="float32"']), ["a", "b"]) == key
    assert pretrain_key(config.resolve(base, overrides=['pretrain.gradient_sync_dtype="bfloat16"']), ["a", "b"]) != key
    # the first phase's PCA settings: in the key only when it clusters in the PCA space
    expression = config.resolve(base, overrides=['pseudolabel.phase1_space="expression"'])
    pca = config.resolve(base, overrides=['pseudolabel.phase1_space="pca"'])
    for space, changes in ((expression, False), (pca, True)):
        other = config.resolve(space, overrides=["pseudolabel.pca_genes=123"])
        assert (pretrain_key(other, ["a", "b"]) != pretrain_key(space, ["a", "b"])) is changes


def test_placement_settings_are_checked_where_declared():
    cfg = config.resolve(recipes.get("tiny"), overrides=["pretrain.placement=SPREAD",
                                                         "pretrain.resources_per_worker={memory = 8e9, a100 = 1}"])
    assert cfg.pretrain.placement == "SPREAD" and cfg.pretrain.resources_per_worker == {"memory": 8e9, "a100": 1}
    for override, message in (("pretrain.placement=spread", "use one of PACK, SPREAD"),
                              ("pretrain.resources_per_worker={CPU = 2}", "pretrain.cpus_per_worker instead"),
                              ("pretrain.resources_per_worker={GPU = 1}", "pretrain.use_gpu instead"),
                              ("pretrain.resources_per_worker={a100 = -1}", "must be a number >= 0"),
                              ('pretrain.resources_per_worker={a100 = "x"}', "must be a number >= 0"),
                              ("pretrain.resources_per_worker=3", "expected a table")):
        with pytest.raises(ConfigError, match=message):
            config.resolve(recipes.get("tiny"), overrides=[override])


def test_mlflow_and_ray_users_environment_is_honoured(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cfg = recipes.configure("tiny", work_dir=str(tmp_path))
    assert cfg.tracking_uri == "http://mlflow.example:5000" and cfg.ray.address == "10.0.0.1:6379"
    # a setting given explicitly wins over the environment
    cfg = recipes.configure("tiny", overrides=['tracking.tracking_uri="sqlite:///x.db"', 'ray.address="auto"'])
    assert cfg.tracking_uri == "sqlite:///x.db" and cfg.ray.address == "auto"
    # an http:// RAY_ADDRESS is where jobs are submitted, not a cluster to join
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = recipes.configure("tiny", work_dir=str(tmp_path))
    assert cfg.ray.address == "" and cfg.tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"


@pytest.mark.parametrize(("overrides", "uri", "backend"), [
    ([], "atlas.soma", "soma"),
    (["store.backend=zarr"], "atlas.zarr", "zarr"),
    (['store.uri="/data/atlas.zarr"'], "/data/atlas.zarr", "zarr"),
    (['store.uri="/data/atlas.zarr/"'], "/data/atlas.zarr", "zarr"),
    (['store.uri="/data/cells"', "store.backend=zarr"], "/data/cells", "zarr"),
    (['store.uri="/data/atlas.zarr"', "store.backend=soma"], "/data/atlas.zarr", "soma"),
])
def test_the_store_backend_comes_from_the_setting_or_the_uri(overrides, uri, backend, tmp_path):
    from scpretrain_dist.store.atlas import backend_of

    cfg = config.resolve(recipes.get("tiny"), overrides=[f'work_dir="{tmp_path}"', *overrides])
    assert cfg.store_uri.rstrip("/").endswith(uri)
    assert backend_of(cfg.store_uri, cfg.store.backend) == backend
    with pytest.raises(ConfigError, match="store.backend.*one of"):
        config.resolve(recipes.get("tiny"), overrides=["store.backend=hdf5"])
