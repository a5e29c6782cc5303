"""Load adapter reads only files inside ComfyUI's loras folders: a link in them that leads out is refused, the
adapter's and its training state's alike, unless the server runs with ERI_ALLOW_ANY_PATH=1."""
import pytest

from helpers import prepared, run, train


@pytest.fixture
def saved(comfy_folders, tiny, tmp_path):
    """An adapter trained 2 steps and saved outside the loras folder (adapter + state)."""
    from eridiffusion.trainers import checkpoint
    p = prepared(comfy_folders, tiny)
    _, adapter, _ = train(p, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    checkpoint.save_adapter(adapter, str(outside / "secret_000002.safetensors"))
    return comfy_folders["loras"], outside


def test_an_adapter_that_links_out_of_the_loras_folder_is_refused_naming_the_input(saved, monkeypatch):
    from eridiffusion.nodes.adapter import EriLoadAdapter
    loras, outside = saved
    (loras / "linked_000002.safetensors").symlink_to(outside / "secret_000002.safetensors")
    with pytest.raises(ValueError, match=r"lora_name 'linked_000002.safetensors': 'linked_000002.safetensors' is a "
                                         r"link to a file outside the loras folders"):
        run(EriLoadAdapter, lora_name="linked_000002.safetensors")
    monkeypatch.setenv("ERI_ALLOW_ANY_PATH", "1")
    assert run(EriLoadAdapter, lora_name="linked_000002.safetensors")[0].step == 2


def test_a_training_state_that_links_out_is_refused_too(saved):
    import shutil
    from eridiffusion.nodes.adapter import EriLoadAdapter
    loras, outside = saved
    shutil.copy(outside / "secret_000002.safetensors", loras / "mine_000002.safetensors")
    (loras / "mine_000002.eri-state").symlink_to(outside / "secret_000002.eri-state")
    with pytest.raises(ValueError, match=r"'mine_000002.eri-state' is a link to a file outside the loras folders"):
        run(EriLoadAdapter, lora_name="mine_000002.safetensors")


def test_a_link_that_stays_inside_the_loras_folder_loads(saved):
    import shutil
    from eridiffusion.nodes.adapter import EriLoadAdapter
    loras, outside = saved
    (loras / "real").mkdir()
    for suffix in (".safetensors", ".eri-state"):
        shutil.copy(outside / f"secret_000002{suffix}", loras / "real" / f"a_000002{suffix}")
        (loras / f"alias_000002{suffix}").symlink_to(loras / "real" / f"a_000002{suffix}")
    assert run(EriLoadAdapter, lora_name="alias_000002.safetensors")[0].step == 2
