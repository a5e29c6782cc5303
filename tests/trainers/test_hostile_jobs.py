"""YAML jobs as an attacker (or a slip of the keyboard) writes them: anyone who reaches ComfyUI's HTTP API can
send one. Each is refused quickly with a ConfigError of a few hundred characters that names the key or line,
never a raw Python error, never a message that repeats the whole value, and before any work starts."""
import time

import pytest
import yaml

from eridiffusion.trainers.config import ConfigError
from eridiffusion.trainers.job import MAX_JOB_BYTES, MAX_YAML_DEPTH, load_job, parse_job

JOB = """\
job: extension
config:
  name: hostile
  process:
    - type: sd_trainer
      device: cuda:0
      network: {type: lora, linear: 4, linear_alpha: 4, seed: 1}
      datasets:
        - {folder_path: images, caption_ext: txt, resolution: 512}
        - {folder_path: more_images, caption_ext: txt, resolution: 512}
      train: {steps: 10, lr: 1e-4, seed: 2}
      save: {save_every: 5}
      sample: {prompts: ["a photo"], seed: 3, sample_every: 5}
meta: {name: "[name]"}
"""
SHORT = 2500    # characters: a message that quotes values only in part (the longest, an unknown key's, lists
                # the ~120 keys a section knows)


def edited(edit) -> str:
    data = yaml.safe_load(JOB)
    edit(data["config"]["process"][0])
    return yaml.safe_dump(data)


def error_of(text: str, seconds: float = 10.0) -> str:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        parse_job(text, "job.yaml")
    assert time.perf_counter() - start < seconds, "refused without walking what the text expands to"
    message = str(e.value)
    assert message.startswith("job.yaml: ") and len(message) < SHORT, message[:SHORT]
    return message


def laughs(levels: int, indent: str = "") -> str:
    """Billion laughs: anchor l<i> is a list of nine l<i-1>, so l9 stands for 9**9 (387 million) strings."""
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]"
                                 for i in range(1, levels + 1)]
    return "\n".join(indent + line for line in lines)


def with_laughs(levels: int, old: str, new: str) -> str:
    """The job with the anchors first (under meta) and `old` replaced by `new`, which aliases them."""
    return "meta:\n" + laughs(levels, "  ") + "\n" + JOB.replace('meta: {name: "[name]"}\n', "").replace(old, new)


# ------------------------------------------------------------------------------------------------ the YAML
def test_the_base_job_of_these_tests_loads():
    job = parse_job(JOB, "job.yaml")
    assert (job.name, job.network.seed, job.settings.seed, job.sample.seed) == ("hostile", 1, 2, 3)
    assert not job.ignored


@pytest.mark.parametrize("levels, old, new", [
    (9, "steps: 10", "steps: *l9"),                       # the reported case: 640 bytes, a 312 MB message
    (9, "train: {", "train: {ema_config: *l9, "),        # an ignored key: its value went into the warning
    (10, "steps: 10", "steps: *l10"),                     # one level more killed the server
    (9, "    - type: sd_trainer", "    - type: sd_trainer\n      trigger_word: *l9"),
])
def test_billion_laughs_is_refused_while_reading_the_yaml(levels, old, new):
    text = with_laughs(levels, old, new)
    assert len(text) < 1100 and new in text
    message = error_of(text)
    assert "aliases expand to more than 20,000 values (line" in message and "write the values out" in message


def test_an_alias_counts_as_all_it_repeats_where_it_is_used():
    # l0..l4 hold 7,381 values; each use of *l4 repeats 6,561 more: the second use passes 20,000
    text = with_laughs(4, "train: {", "train: {ema_config: *l4, max_grad_norm: *l4, ")
    line = 1 + next(i for i, t in enumerate(text.splitlines()) if t.startswith("      train: {ema_config: *l4"))
    assert f"aliases expand to more than 20,000 values (line {line})" in error_of(text)


def test_aliases_of_a_sane_size_still_load():
    text = JOB.replace("        - {folder_path: images, caption_ext: txt, resolution: 512}\n"
                       "        - {folder_path: more_images, caption_ext: txt, resolution: 512}\n",
                       "        - &set {folder_path: images, caption_ext: txt, resolution: 512}\n"
                       "        - {<<: *set, folder_path: more_images}\n")
    job = parse_job(text.replace("prompts: [\"a photo\"]", "prompts: [&p \"a photo\", *p, *p]"), "job.yaml")
    assert [d.folder_path for d in job.datasets] == ["images", "more_images"]
    assert job.sample.prompts == ("a photo",) * 3


def test_an_alias_inside_the_value_it_names_is_refused():
    assert "alias inside the value it refers to (line 1)" in error_of("meta: &a [1, *a]\n")


@pytest.mark.parametrize("text", ["[" * 50_000, "{a: " * 50_000, "a: " + "[" * 1000 + "]" * 1000])
def test_deep_nesting_is_a_config_error_naming_the_line_not_a_recursion_error(text):
    message = error_of(text)
    assert f"nested more than {MAX_YAML_DEPTH} levels deep (line 1)" in message


def test_nesting_is_refused_exactly_past_the_limit():
    def meta_nested(depth):    # the document's mapping, then meta's, then lists: `depth` collections in all
        return JOB.replace('meta: {name: "[name]"}', "meta: {deep: " + "[" * (depth - 2) + "]" * (depth - 2) + "}")
    deep, lists = parse_job(meta_nested(MAX_YAML_DEPTH), "job.yaml").meta["deep"], 0
    while isinstance(deep, list):
        deep, lists = (deep[0] if deep else None), lists + 1
    assert lists == MAX_YAML_DEPTH - 2
    assert "nested more than" in error_of(meta_nested(MAX_YAML_DEPTH + 1))


def test_many_values_without_aliases_are_refused_too():
    message = error_of("meta: [" + "0," * 100_001 + "]\n")
    assert "has more than 20,000 values" in message


def test_aliases_of_long_text_are_refused_by_the_characters_they_expand_to():
    text = 'meta:\n  s: &s "' + "x" * 100_000 + '"\n  many: [' + ", ".join(["*s"] * 50) + "]\n"
    assert "aliases expand to more than 4,194,304 characters" in error_of(text)


def test_a_job_text_over_1_mib_is_refused_before_it_is_parsed():
    message = error_of("#" * (MAX_JOB_BYTES + 1))
    assert "1,048,577 characters long; a job is at most 1,048,576 (1 MiB)" in message


def test_a_job_file_over_1_mib_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "wb") as f:
        f.truncate(1 << 30)         # sparse: 1 GiB that reading would have to allocate
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"is 1,073,741,824 bytes; a job is at most 1,048,576 bytes"):
        load_job(str(path))
    assert time.perf_counter() - start < 1.0


def test_a_job_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(JOB.replace("hostile", "h\xf6stile").encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_job(str(path))


@pytest.mark.parametrize("number", ["0x" + "f" * 5000, "1" * 5000])
def test_an_overlong_number_is_a_config_error_not_a_raw_value_error(number):
    message = error_of(JOB.replace("steps: 10", f"steps: {number}"))
    assert "is 5,00" in message and "a number in a job has at most 64" in message


@pytest.mark.parametrize("value", ["!!int abc", "!!float abc", "!!timestamp abc", "!!bool abc"])
def test_a_value_that_does_not_fit_its_tag_is_a_config_error(value):
    assert "not valid YAML" in error_of(JOB.replace("steps: 10", f"steps: {value}"))


def test_python_objects_are_never_built():
    assert "not valid YAML" in error_of("meta: !!python/object/apply:os.system ['echo hacked']\n")


# ------------------------------------------------------------------------------------------------ the values
@pytest.mark.parametrize("section", ["network", "train", "sample"])
def test_seeds_are_32_bit_and_a_larger_one_is_an_error_naming_its_key(section):
    top = parse_job(edited(lambda p: p[section].update(seed=2**32 - 1)), "job.yaml")
    assert {"network": top.network.seed, "train": top.settings.seed, "sample": top.sample.seed}[section] == 2**32 - 1
    message = error_of(edited(lambda p: p[section].update(seed=2**70)))
    assert f"config.process[0].{section}.seed must be between 0 and 4294967295, got {2**70}" in message


@pytest.mark.parametrize("section, key", [("train", "warmup_steps"), ("save", "save_every"),
                                          ("save", "max_step_saves_to_keep"), ("sample", "sample_every"),
                                          ("sample", "sample_start_step"), ("network", "lokr_factor")])
def test_every_whole_number_has_an_upper_bound_named_in_its_error(section, key):
    message = error_of(edited(lambda p: p[section].update({key: 2**70})))
    assert f"config.process[0].{section}.{key} must be between" in message


@pytest.mark.parametrize("name, problem", [
    ("a\x00b", "control or invisible characters"),
    ("a\nb", "control or invisible characters"),
    ("a\u202eb", "control or invisible characters"),        # right-to-left override
    ("a" * 10_000, "10,000 bytes long (UTF-8); it may be at most 100"),
    ("é" * 51, "102 bytes long"),
    ("a/b", "plain name"), ("a\\b", "plain name"), ("..", "plain name"), (".", "plain name"),
    ("", "is required"),
])
def test_config_name_is_a_short_plain_name_refused_when_read_not_when_saving(name, problem):
    message = error_of(named(name))
    assert message.startswith("job.yaml: config.name ") and problem in message, message


@pytest.mark.parametrize("name", ["my_lora-v1.2", "ñandú lora", "a" * 100, "  padded  "])
def test_plain_names_load(name):
    assert parse_job(named(name), "job.yaml").name == name.strip()


def named(name: str) -> str:
    data = yaml.safe_load(JOB)
    data["config"]["name"] = name
    return yaml.safe_dump(data)


def test_a_caption_extension_that_climbs_out_of_the_dataset_is_reported_under_its_key():
    message = error_of(edited(lambda p: p["datasets"][1].update(caption_ext="./../../../secret.txt")))
    assert "config.process[0].datasets[1].caption_ext" in message


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:3", True), ("CUDA:0", True),
                                        ("cuda:x", False), ("tpu", False), ("cuda:0; rm -rf /", False)])
def test_the_device_is_checked_when_the_job_is_read(device, ok):
    text = edited(lambda p: p.update(device=device))
    if ok:
        assert parse_job(text, "job.yaml").device == device.lower()
    else:
        assert "config.process[0].device must be cpu, cuda or cuda:N" in error_of(text)


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.update(trigger_word="t" * 201), ["config.process[0].trigger_word is 201 characters long"]),
    (lambda p: p["datasets"][1].update(trigger_word="t" * 201), ["datasets[1].trigger_word is 201 characters"]),
    (lambda p: p["datasets"][0].update(default_caption="c" * 8193), ["datasets[0].default_caption", "8,193"]),
    (lambda p: p["sample"].update(prompts=["p"] * 1001), ["sample.prompts: 1,001 prompts"]),
    (lambda p: p["sample"].update(neg="n" * 8193), ["sample.neg is 8,193 characters long"]),
    # 1,000 triggers of 200 characters: 200,000 characters once replaced, although the prompt is 9,000
    (lambda p: (p.update(trigger_word="t" * 200), p["sample"].update(prompts=["[trigger]" * 1000])),
     ["sample.prompts: prompt 0 is 200,000 characters long (with the trigger word)"]),
])
def test_text_that_is_repeated_per_prompt_or_image_is_bounded(edit, words):
    message = error_of(edited(edit))
    assert all(w in message for w in words), message


def test_text_at_its_bounds_loads():
    job = parse_job(edited(lambda p: (p.update(trigger_word="t" * 200), p["sample"].update(
        prompts=["[trigger] " + "p" * 7000] + ["[trigger] short"] * 999, neg="n" * 8192),
        p["datasets"][0].update(default_caption="c" * 8192))), "job.yaml")
    assert len(job.sample.prompts) == 1000 and job.sample.prompts[0].startswith("t" * 200 + " p")
    assert job.datasets[0].configs[0].default_caption == "c" * 8192


HUGE = "x" * 100_000


@pytest.mark.parametrize("edit, words", [
    (lambda p: p["train"].update(optimizer=HUGE), ["train.optimizer", "100,000 characters"]),
    (lambda p: p["train"].update({HUGE: 1}), ["unknown key", "characters"]),
    (lambda p: p["network"].update(type=["lora"] * 15_000), ["network.type must be text"]),
    (lambda p: p["sample"].update(sampler=HUGE), ["sample.sampler"]),
    (lambda p: p["sample"].update(samples=[HUGE]), ["sample.samples[0] must be a mapping"]),
    (lambda p: p.update(datasets=HUGE), ["datasets must be a list"]),
    (lambda p: p["datasets"][0].update(resolution=[HUGE]), ["datasets[0].resolution"]),
    (lambda p: p["train"].update(optimizer_params=HUGE), ["optimizer_params must be a mapping"]),
    (lambda p: p.update(model={"arch": HUGE}), ["model.arch"]),
    (lambda p: p.update(type=HUGE), ["type must be one of sd_trainer"]),
    (lambda p: p["train"].update(steps=HUGE), ["train.steps must be a whole number"]),
    (lambda p: p["train"].update(gradient_checkpointing={"k": HUGE}), ["gradient_checkpointing"]),
])
def test_a_long_value_is_quoted_only_in_part(edit, words):
    message = error_of(edited(edit))
    assert all(w in message for w in words), message


def test_a_long_or_wide_value_of_an_ignored_setting_is_listed_in_part_in_one_entry():
    job = parse_job(edited(lambda p: p["train"].update(
        ema_config={"use_ema": True, "use_feedback": HUGE},
        optimizer_params={"weight_decay": 0.1, **{f"beta{i}": i for i in range(5000)}})), "job.yaml")
    assert job.settings.weight_decay == 0.1
    assert [entry.split(":")[0] for entry in job.ignored] == ["config.process[0].train.optimizer_params",
                                                              "config.process[0].train.ema_config.use_feedback"]
    assert all(len(entry) < 300 for entry in job.ignored), job.ignored
    assert job.ignored[1].startswith("config.process[0].train.ema_config.use_feedback: 'xxxxx")
    assert job.ignored[0].startswith("config.process[0].train.optimizer_params: {'beta0': 0, 'beta1': 1")
    assert len(job.ignored_warning()) < 1000


# ------------------------------------------------------------------------------------------------ the node
@pytest.fixture
def job_node(comfy_folders):
    from eridiffusion.nodes.job import EriLoadTrainingJob
    (comfy_folders["input"] / "images").mkdir()
    (comfy_folders["input"] / "more_images").mkdir()
    return EriLoadTrainingJob


def test_the_queue_check_passes_a_good_job_and_a_linked_one(job_node, comfy_folders):
    (comfy_folders["input"] / "jobs").mkdir()
    (comfy_folders["input"] / "jobs" / "good.yaml").write_text(JOB)
    assert job_node.validate_inputs(job=JOB) is True
    assert job_node.validate_inputs(job="jobs/good.yaml") is True
    assert job_node.validate_inputs(job=None) is True


@pytest.mark.parametrize("job, words", [
    (with_laughs(9, "steps: 10", "steps: *l9"), ["job: ", "aliases expand to more than 20,000 values"]),
    ("[" * 50_000, ["nested more than 64 levels"]),
    (JOB.replace("seed: 2", f"seed: {2**70}"), ["config.process[0].train.seed"]),
    (JOB.replace("name: hostile", "name: \"a\\0b\""), ["config.name"]),
    (JOB.replace("folder_path: more_images", "folder_path: ../../etc"), ["datasets[1].folder_path", "outside"]),
    (JOB.replace("folder_path: more_images", "folder_path: missing"),
     ["datasets[1].folder_path 'missing' does not exist in ComfyUI's input folder"]),
    ("x" * 5000 + ".yaml", ["job file name", "5,005 characters long"]),
    ("../outside.yaml", ["points outside"]),
])
def test_the_queue_check_refuses_a_bad_job_with_a_short_message(job_node, job, words):
    start = time.perf_counter()
    verdict = job_node.validate_inputs(job=job)
    assert time.perf_counter() - start < 10
    assert isinstance(verdict, str) and len(verdict) < SHORT, verdict
    assert all(w in verdict for w in words), verdict


def test_the_queue_check_refuses_an_oversized_job_file_unread(job_node, comfy_folders):
    with open(comfy_folders["input"] / "huge.yaml", "wb") as f:
        f.truncate(1 << 30)
    verdict = job_node.validate_inputs(job="huge.yaml")
    assert "'huge.yaml' is 1,073,741,824 bytes; a job is at most 1,048,576 bytes" in verdict


def test_billion_laughs_in_a_job_file_fails_the_node_fast_with_a_short_error(job_node, comfy_folders):
    # a linked job is not seen at Queue: executing reads it as boundedly (the job is read before the MODEL is used)
    (comfy_folders["input"] / "laughs.yaml").write_text(with_laughs(9, "train: {", "train: {ema_config: *l9, "))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        job_node.execute(model=None, job="laughs.yaml")
    assert "aliases expand to more than 20,000 values" in str(e.value) and len(str(e.value)) < SHORT
    assert job_node.fingerprint_inputs(model=None, job="laughs.yaml")
    assert time.perf_counter() - start < 10
