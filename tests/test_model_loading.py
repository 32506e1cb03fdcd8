"""Every weights format `score` accepts, loaded through the one safe gateway."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipguard.errors import ModelLoadError
from clipguard.model.loading import ModelSpec, load_model, sha256_file
from conftest import TINY_MODEL


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_safetensors_file(tmp_path, tiny_loaded):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_loaded.model.state_dict().items()}, str(path))
    loaded = load_model(ModelSpec(TINY_MODEL, pretrained=str(path)))
    assert same_weights(loaded.model, tiny_loaded.model)
    assert loaded.info.weights_sha256 == sha256_file(path) and loaded.info.weights_source == "file"


def test_plain_state_dict_pt(tmp_path, tiny_loaded):
    path = tmp_path / "w.pt"
    torch.save(tiny_loaded.model.state_dict(), path)
    assert same_weights(load_model(ModelSpec(TINY_MODEL, pretrained=str(path))).model, tiny_loaded.model)


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path, tiny_loaded):
    path = tmp_path / "epoch_3.pt"
    state = {f"module.{k}": v for k, v in tiny_loaded.model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {}}, path)
    assert same_weights(load_model(ModelSpec(TINY_MODEL, pretrained=str(path))).model, tiny_loaded.model)


class _Holder(torch.nn.Module):
    """Rebuilds a dotted state dict as nested modules, the way OpenAI's TorchScript archive holds it."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        children: dict[str, dict] = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = value
            else:
                self.register_buffer(head, value.clone())
        for name, sub in children.items():
            self.add_module(name, _Holder(sub))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_openai_torchscript_archive(tmp_path, tiny_loaded):
    # OpenAI's archives use QuickGELU, which has no weights, so the same tensors serve.
    state = dict(tiny_loaded.model.state_dict())
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(32), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(_Holder(state)), str(path))
    loaded = load_model(ModelSpec(TINY_MODEL, pretrained=str(path)))
    assert same_weights(loaded.model, tiny_loaded.model)
    activations = [type(m).__name__ for m in loaded.model.modules()]
    assert "QuickGELU" in activations


def test_custom_architecture_from_json_with_random_weights(tmp_path):
    config = json.loads((Path(__file__).parents[1] / "clipguard/model/configs/clipguard-tiny-victim.json").read_text())
    config["vision_cfg"]["layers"] = 1
    config["text_cfg"]["layers"] = 1
    path = tmp_path / "my-micro-clip.json"
    path.write_text(json.dumps(config))
    loaded = load_model(ModelSpec(name="ignored", pretrained=None, model_config=path))
    assert loaded.info.architecture == "my-micro-clip" and loaded.info.weights_source == "random"
    assert len(loaded.model.visual.transformer.resblocks) == 1


def test_bad_model_config_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"embed_dim": 8}')
    with pytest.raises(ModelLoadError, match="vision_cfg"):
        load_model(ModelSpec(pretrained=None, model_config=path))


def test_malicious_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned.txt"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "pwned"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"state_dict": Evil()}, handle)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model(ModelSpec(TINY_MODEL, pretrained=str(path)))
    assert not marker.exists()


def test_weights_for_another_architecture_are_rejected(tmp_path, tiny_loaded):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_loaded.model.state_dict().items()}, str(path))
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model(ModelSpec("clipguard-tiny-reference", pretrained=str(path)))


def test_offline_hub_tag_fails_fast_and_says_what_to_do():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelSpec("ViT-B-32", pretrained="openai"))
    assert time.perf_counter() - started < 10
    assert "--pretrained PATH" in str(error.value) and "clipguard-reference" in str(error.value)


def test_unknown_tag_and_unknown_architecture():
    with pytest.raises(ModelLoadError, match="known tags"):
        load_model(ModelSpec("ViT-B-32", pretrained="no-such-tag"))
    with pytest.raises(ModelLoadError, match="unknown model architecture"):
        load_model(ModelSpec("ViT-Z-99", pretrained=None))


def test_missing_weights_file():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(TINY_MODEL, pretrained="/nonexistent/weights.safetensors"))
