"""Recipe schema: loading, overrides, one-line ConfigErrors naming the dotted key or file, hashing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.recipe import (
    diff_keys,
    load_recipe,
    parse_override,
    recipe_to_yaml,
    stable_hash,
    student_config,
)
from pipeline.schema import Recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _one_line_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_agreed_ones():
    r = load_recipe(None)
    assert isinstance(r, Recipe)
    assert (r.align.weights.ea, r.align.weights.saa, r.align.weights.sfa) == (0.2, 0.1, 0.1)
    assert (r.distill.weights.sta, r.distill.weights.hta) == (0.3, 0.3)
    assert r.align.train.steps == 100 and r.distill.train.steps == 500
    assert r.distill.train.optim.lr == 6e-4 and r.distill.train.optim.betas == [0.9, 0.99]
    assert r.distill.kd.kind == "forward_kl" and r.distill.kd.temperature == 2.0
    assert r.teacher.spec == "smollm2-135m" and r.data.sources == ["bundled"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.run.name == path.stem


# every recipe a user may run: the top-level ones and the study's arms (files starting with "_" are bases)
RUNNABLE = SHIPPED + sorted(p for p in (ROOT / "recipes" / "study").glob("*.yaml") if not p.name.startswith("_"))


def stated(path: Path) -> dict[str, str]:
    """The `# machine:`, `# memory:` and `# time:` lines of a recipe's header comment."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^# (machine|memory|time): +(.+)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_each_runnable_recipe_states_its_machine_memory_and_time(path):
    says = stated(path)
    assert set(says) == {"machine", "memory", "time"}, path
    assert re.search(r"\b\d+ GB\b", says["machine"]), says["machine"]  # the machine's memory
    assert re.search(r"\bGB\b", says["memory"]) and re.search(r"\d", says["time"]), says


@pytest.mark.parametrize("path", RUNNABLE, ids=lambda p: p.name)
def test_each_runnable_recipe_passes_the_preflight_check_offline(path, monkeypatch):
    """On the machine the recipe names (its memory), with no network: the check passes, or for a Hub teacher
    that is not cached says "no network" in one line (never that a path does not exist)."""
    import huggingface_hub.constants

    from pipeline.memory import ENV_AVAILABLE
    from pipeline.runner import plan_stages, preflight
    from teachers import TeacherError
    from teachers.loading import ALIASES

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv(ENV_AVAILABLE, re.search(r"\b(\d+) GB\b", stated(path)["machine"]).group(1) + "G")
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():  # as under a launcher (a DeepSpeed recipe needs one)
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    try:
        preflight(recipe, plan_stages(recipe, None), prepare_runs=True)
    except TeacherError as exc:
        message = str(exc)
        assert recipe.teacher.spec not in ALIASES and "\n" not in message, message
        assert message.startswith(f"{recipe.teacher.spec}: a Hub id that is not in the local cache"), message
        assert "no network" in message and "does not exist" not in message


def test_deepspeed_config_is_relative_to_the_recipe_that_names_it(tmp_path, monkeypatch):
    ds = tmp_path / "cfg" / "ds" / "zero.json"
    ds.parent.mkdir(parents=True)
    ds.write_text("{}")
    (tmp_path / "cfg" / "base.yaml").write_text("distributed: {strategy: deepspeed, deepspeed_config: ds/zero.json}\n")
    child = tmp_path / "elsewhere" / "run.yaml"
    child.parent.mkdir()
    child.write_text("base: ../cfg/base.yaml\nrun: {name: x}\n")
    monkeypatch.chdir(child.parent)  # neither file's folder
    assert Path(load_recipe(child).distributed.deepspeed_config).resolve() == ds.resolve()
    # on the command line a path is relative to the working directory, as everywhere else
    assert load_recipe(child, ["distributed.deepspeed_config=mine.json"]).distributed.deepspeed_config == "mine.json"
    shipped = load_recipe(ROOT / "recipes" / "bispikclm-1b.yaml").distributed.deepspeed_config
    assert Path(shipped).resolve() == ROOT / "recipes" / "deepspeed" / "zero2.json"


def test_shipped_students_are_valid_configs():
    for path in SHIPPED:
        r = load_recipe(path)
        cfg = student_config(r, vocab_size=50272)
        assert cfg.vocab_size == 50272


def test_unknown_key_names_dotted_path(tmp_path):
    msg = _one_line_error(_write(tmp_path, "distill:\n  train:\n    optim:\n      lrr: 0.1\n"))
    assert msg.startswith("distill.train.optim.lrr:") and "unknown key" in msg


def test_unknown_section(tmp_path):
    assert _one_line_error(_write(tmp_path, "trainer: {steps: 3}\n")).startswith("trainer:")


def test_wrong_type(tmp_path):
    msg = _one_line_error(_write(tmp_path, "align:\n  train:\n    steps: many\n"))
    assert msg.startswith("align.train.steps:") and "many" in msg


@pytest.mark.parametrize("override, key", [
    ("distill.train.optim.lr=-0.1", "distill.train.optim.lr"),
    ("align.train.optim.lr=0", "align.train.optim.lr"),
    ("distill.train.batch_size=0", "distill.train.batch_size"),
    ("align.train.batch_size=-2", "align.train.batch_size"),
    ("distill.train.steps=0", "distill.train.steps"),
    ("align.train.steps=-5", "align.train.steps"),
    ("data.seq_len=0", "data.seq_len"),
    ("distill.kd.kind=kl", "distill.kd.kind"),
    ("teacher.dtype=int8", "teacher.dtype"),
    ("distributed.strategy=horovod", "distributed.strategy"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("run.name=a/b", "run.name"),
    ("distill.weights.sta=-1", "distill.weights.sta"),
    ("data.max_train_bytes=0", "data.max_train_bytes"),
    ("teacher_cache.branch_floor=-0.1", "teacher_cache.branch_floor"),
    ("teacher_cache.branch_floor=1.0", "teacher_cache.branch_floor"),
    ("teacher_cache.branch_floor=1e-3", "teacher_cache.branch_floor"),  # the teacher's vocabulary has no branches
    ("teacher_cache.store=sparse", "teacher_cache.store"),
])
def test_bad_values_name_the_key(override, key):
    msg = _one_line_error(None, [override])
    assert msg.startswith(key + ":"), msg


def test_one_data_cap_at_a_time():
    msg = _one_line_error(None, ["data.max_train_tokens=1000", "data.max_train_bytes=4000"])
    assert msg.startswith("data.max_train_bytes: must be null when data.max_train_tokens is set (1000)"), msg
    r = load_recipe(None, ["data.max_train_tokens=null", "data.max_train_bytes=4000"])
    assert (r.data.max_train_tokens, r.data.max_train_bytes) == (None, 4000)


def test_all_zero_weights_rejected_unless_stage_disabled():
    zero = [f"align.weights.{k}=0" for k in ("ea", "saa", "sfa", "sta", "hta")]
    assert _one_line_error(None, zero).startswith("align.weights:")
    assert not load_recipe(None, zero + ["align.enabled=false"]).align.enabled


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_cached_kd_is_forward_kl_only(kind):
    # the cache's tail bucket leaves reverse KL and JSD far from their online forms (bench/kd_cache.py)
    msg = _one_line_error(None, ["teacher_cache.enabled=true", f"distill.kd.kind={kind}"])
    assert msg.startswith("distill.kd.kind:") and "teacher_cache.enabled" in msg, msg
    assert load_recipe(None, ["teacher_cache.enabled=true", "distill.kd.kind=jsd", "distill.kd.jsd_beta=0"])
    assert load_recipe(None, ["teacher_cache.enabled=true", f"distill.kd.kind={kind}",
                              "distill.use_teacher_cache=false"])
    assert load_recipe(None, [f"distill.kd.kind={kind}"]).distill.kd.kind == kind  # online: any kind


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_the_hidden_store_takes_every_kd_kind(kind):
    # it gives the full logits back (teachers.cache), so nothing is lost to a tail bucket
    r = load_recipe(None, ["teacher_cache.enabled=true", "teacher_cache.store=hidden", f"distill.kd.kind={kind}"])
    assert (r.teacher_cache.store, r.distill.kd.kind) == ("hidden", kind)


def test_the_hidden_store_needs_the_teachers_vocabulary():
    msg = _one_line_error(None, ["teacher_cache.enabled=true", "teacher_cache.store=hidden", "student.vocab=bytes"])
    assert msg.startswith("teacher_cache.store: must be topk with student.vocab=bytes"), msg


def test_the_hidden_store_is_hashed_without_k_or_temperature():
    from pipeline.runner import stage_config_hash
    from pipeline.stages import SPECS

    def cache_hash(*extra):
        return stage_config_hash(load_recipe(None, ["teacher_cache.enabled=true", *extra]), "teacher_cache")

    hidden = cache_hash("teacher_cache.store=hidden")
    assert hidden == cache_hash("teacher_cache.store=hidden", "distill.kd.temperature=4", "teacher_cache.k=8")
    assert hidden != cache_hash() and cache_hash() != cache_hash("distill.kd.temperature=4")
    # the default store keeps the hash caches had before the key existed: the study's finished runs stay valid
    r = load_recipe(None, ["teacher_cache.enabled=true"])
    assert "store" not in SPECS["teacher_cache"].sections(r)["teacher_cache"]
    dist = {s: stage_config_hash(load_recipe(None, ["teacher_cache.enabled=true", f"teacher_cache.store={s}"]),
                                 "distill") for s in ("topk", "hidden")}
    assert dist["topk"] != dist["hidden"]


def test_the_teacher_cache_stage_depends_on_the_kd_temperature():
    # the cache holds the teacher at distill.kd.temperature: another tau must rebuild it, never reuse it
    from pipeline.runner import stage_config_hash

    at = {tau: load_recipe(None, ["teacher_cache.enabled=true", f"distill.kd.temperature={tau}"]) for tau in (1, 2)}
    assert stage_config_hash(at[1], "teacher_cache") != stage_config_hash(at[2], "teacher_cache")
    assert stage_config_hash(at[1], "prepare") == stage_config_hash(at[2], "prepare")


def test_the_branch_floor_enters_the_hashes_only_where_it_changes_targets():
    """A floor changes the targets over a derived vocabulary, cached (teacher_cache) or online (distill); at 0,
    the hashes stay those of runs made before the key existed (with the teacher's own vocabulary a floor is
    refused: test_bad_values_name_the_key)."""
    from pipeline.runner import stage_config_hash
    from pipeline.stages import SPECS

    def hashes(*overrides):
        r = load_recipe(None, ["teacher_cache.enabled=true", "align.enabled=false", *overrides])
        return {stage: stage_config_hash(r, stage) for stage in ("prepare", "teacher_cache", "distill")}

    assert "branch_floor" not in SPECS["teacher_cache"].sections(load_recipe(None, []))["teacher_cache"]
    derived = ["student.vocab=subset:300"]
    exact, floored = hashes(*derived), hashes(*derived, "teacher_cache.branch_floor=1e-4")
    assert floored["prepare"] == exact["prepare"]
    assert floored["teacher_cache"] != exact["teacher_cache"]
    online = ["distill.use_teacher_cache=false", "teacher_cache.enabled=false"]
    assert hashes(*derived, *online, "teacher_cache.branch_floor=1e-4")["distill"] != hashes(*derived, *online)["distill"]


def test_deepspeed_needs_a_config_file():
    assert _one_line_error(None, ["distributed.strategy=deepspeed"]).startswith("distributed.deepspeed_config:")


def test_overrides_apply_with_types():
    r = load_recipe(ROOT / "recipes" / "demo.yaml",
                    ["distill.train.steps=7", "distill.kd.kind=jsd", "teacher.layer_map.1=20",
                     "data.sources=[a.txt,b.txt]", "data.max_train_tokens=null", "student.config.n_layer=2",
                     "evaluate.teacher=false"])
    assert r.distill.train.steps == 7 and r.distill.kd.kind == "jsd"
    assert r.teacher.layer_map == {1: 20}
    assert r.data.sources == ["a.txt", "b.txt"] and r.data.max_train_tokens is None
    assert r.student.config == {"n_layer": 2} and r.evaluate.teacher is False


@pytest.mark.parametrize("text", ["distill.train.steps", "=3", "distill..steps=3", "a b=1", "9x=1"])
def test_bad_override_syntax(text):
    msg = _one_line_error(None, [text])
    assert msg.startswith(f"override {text!r}") and "dotted.key=value" in msg


def test_override_unknown_key_and_bad_type():
    assert _one_line_error(None, ["distill.train.stepz=3"]).startswith("distill.train.stepz:")
    msg = _one_line_error(None, ["distill.train.steps=abc"])
    assert msg.startswith("distill.train.steps:") and "override" in msg


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)
    assert parse_override("a.3=x") == (["a", 3], "x")
    assert parse_override("a='1'") == (["a"], "1")


def test_missing_file_and_not_yaml(tmp_path):
    msg = _one_line_error(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in msg and "not found" in msg
    msg = _one_line_error(_write(tmp_path, "run: {name: x\n  seed: [\n"))
    assert "r.yaml" in msg and "not valid YAML" in msg
    assert "YAML mapping" in _one_line_error(_write(tmp_path, "- a\n- b\n"))


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(ROOT / "recipes" / "demo.yaml", ["teacher.layer_map.0=3"])
    again = load_recipe(_write(tmp_path, recipe_to_yaml(r)))
    assert again == r


def test_student_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^student\.config\.nonsense:"):
        student_config(load_recipe(None, ["student.config.nonsense=1"]), 100)
    with pytest.raises(ConfigError, match=r"^student\.config\.n_layer:"):
        student_config(load_recipe(None, ["student.config.n_layer=0"]), 100)
    with pytest.raises(ConfigError, match=r"^student\.config\.vocab_size:"):
        student_config(load_recipe(None, ["student.config.vocab_size=5"]), 100)
    with pytest.raises(ConfigError, match=r"^student\.preset:"):
        student_config(load_recipe(None, ["student.preset=huge"]), 100)


def test_hash_and_diff():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert diff_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]
