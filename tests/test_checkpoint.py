"""Conversion to and from the original UNITER layout, BERT initialisation, parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining

from uniter_ds.model import (
    TASKS,
    UniterConfig,
    UniterForPretraining,
    UniterModel,
    load_bert_weights,
    load_original_state_dict,
    to_original_state_dict,
)

from .helpers import collate, random_sample

# The reference list, kept in the repository so the test does not depend on the workspace layout.
REFERENCE_COPY = Path(__file__).with_name("data") / "uniter-base-state-dict.txt"


def _reference_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in REFERENCE_COPY.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split()
            shapes[name] = tuple(int(x) for x in shape.split("x"))
    return shapes


def test_base_export_has_exactly_the_reference_names_and_shapes():
    with torch.device("meta"):
        model = UniterForPretraining(UniterConfig.from_preset("base"))
    exported = {k: tuple(v.shape) for k, v in to_original_state_dict(model).items()}
    reference = _reference_shapes()
    assert len(reference) == 230
    assert sorted(exported) == sorted(reference)
    assert {k: v for k, v in exported.items() if reference[k] != v} == {}


def _outputs(model, batch):
    with torch.no_grad():
        return {task: model(batch, task).item_losses for task in TASKS} | {
            "pooled": model.uniter(batch).pooled_output}


def test_round_trip_through_original_layout_is_exact_and_keeps_ties(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    original = to_original_state_dict(model)
    torch.manual_seed(1)
    restored = UniterForPretraining(tiny_config).eval()
    report = load_original_state_dict(restored, original)
    assert report.missing == [] and report.unexpected == []
    g = torch.Generator().manual_seed(0)
    batch = collate([random_sample(tiny_config, 7, 5, g), random_sample(tiny_config, 4, 9, g)], [1, 0])
    before, after = _outputs(model, batch), _outputs(restored, batch)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # Still one Parameter each: an update to the embedding is an update to the decoder.
    assert restored.mlm_head.decoder.weight is restored.uniter.embeddings.word_embeddings.weight
    assert restored.mrfr_head.regress.weight is restored.uniter.img_embeddings.img_linear.weight
    assert len(list(restored.parameters())) == len(list(model.parameters()))


def test_encoder_only_model_loads_a_pretraining_checkpoint(tiny_config):
    torch.manual_seed(0)
    pretrain = UniterForPretraining(tiny_config).eval()
    original = to_original_state_dict(pretrain)
    encoder = UniterModel(tiny_config).eval()
    report = load_original_state_dict(encoder, original, strict=False)
    assert report.missing == []
    assert "itm_output.weight" in report.unexpected and "feat_regress.weight" in report.unexpected
    assert all(not k.startswith("uniter.") for k in report.unexpected)
    g = torch.Generator().manual_seed(0)
    batch = collate([random_sample(tiny_config, 6, 4, g)])
    with torch.no_grad():
        assert torch.equal(encoder(batch).pooled_output, pretrain.uniter(batch).pooled_output)
    # An encoder-only export has only the uniter.* names.
    assert all(k.startswith("uniter.") for k in to_original_state_dict(encoder))
    with pytest.raises(ValueError, match="unexpected keys"):
        load_original_state_dict(UniterModel(tiny_config), original, strict=True)


def test_wild_variants_prefixes_and_gamma_beta_load(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config)
    original = to_original_state_dict(model)
    variant = {
        "module." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in original.items()
    }
    restored = UniterForPretraining(tiny_config)
    assert load_original_state_dict(restored, variant).missing == []
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_shape_mismatch_and_incomplete_qkv_are_named(tiny_config):
    model = UniterForPretraining(tiny_config)
    original = to_original_state_dict(model)
    bad = dict(original)
    bad["uniter.pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"shape mismatch for 'uniter.pooler.weight'.*\(3, 3\)"):
        load_original_state_dict(UniterForPretraining(tiny_config), bad)
    partial = dict(original)
    del partial["uniter.encoder.layer.1.attention.self.key.weight"]
    report = load_original_state_dict(UniterForPretraining(tiny_config), partial, strict=False)
    assert "uniter.encoder.layers.1.attn.qkv.weight" in report.missing
    assert "uniter.encoder.layer.1.attention.self.query.weight" in report.unexpected


def _bert_for_pretraining(config: UniterConfig) -> BertForPreTraining:
    torch.manual_seed(0)
    return BertForPreTraining(BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, layer_norm_eps=config.layer_norm_eps,
    )).eval()


def test_bert_for_pretraining_initialises_encoder_and_mlm_head(tiny_config, tmp_path):
    bert = _bert_for_pretraining(tiny_config)
    folder = tmp_path / "bert"
    folder.mkdir()
    bert.config.to_json_file(folder / "config.json")
    # The legacy format: pytorch_model.bin with TF-port gamma/beta LayerNorm names.
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in bert.state_dict().items()}
    torch.save(legacy, folder / "pytorch_model.bin")
    model = UniterForPretraining(tiny_config).eval()
    report = load_bert_weights(model, folder)
    assert sorted(report.unexpected) == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert {k.split(".")[0] for k in report.missing} == {"uniter", "mrfr_head", "mrc_head", "itm_head"}
    assert all(k.startswith("uniter.img_embeddings.") for k in report.missing if k.startswith("uniter."))

    ids = torch.tensor([[1, 17, 23, 99, 2]])
    batch = collate([{**random_sample(tiny_config, 5, 0, torch.Generator().manual_seed(0)), "input_ids": ids[0]}])
    with torch.no_grad():
        ref = bert(input_ids=ids).prediction_logits[0]
        ours = model.mlm_head(model.uniter(batch).sequence_output[0, :5])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_bert_folder_mismatches_are_errors_naming_the_key(tiny_config, tmp_path):
    bert = _bert_for_pretraining(tiny_config)
    folder = tmp_path / "bert"
    bert.save_pretrained(folder)
    wrong = UniterConfig.from_preset("tiny", intermediate_size=256)
    with pytest.raises(ValueError, match="intermediate_size is 128, but the UNITER config has 256"):
        load_bert_weights(UniterModel(wrong), folder)
    # Without a config.json the shapes decide, and the error names the tensor.
    (folder / "config.json").unlink()
    expected = r"shape mismatch for 'encoder.layers.0.ffn_in.\w+' \(from bert.encoder.layer.0.intermediate.dense"
    with pytest.raises(ValueError, match=expected):
        load_bert_weights(UniterModel(wrong), folder)
    (folder / "model.safetensors").unlink()
    save_file({"bert.pooler.dense.weight": torch.zeros(64, 64)}, str(folder / "model.safetensors"))
    report = load_bert_weights(UniterModel(tiny_config), folder)
    assert "encoder.layers.0.attn.qkv.weight" in report.missing and report.unexpected == []
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_bert_weights(UniterModel(tiny_config), tmp_path)


@pytest.mark.parametrize(("preset", "paper_millions"), [("base", 86), ("large", 303)])
def test_parameter_counts_match_the_paper(preset, paper_millions, capsys):
    """The paper's 86M / 303M count the transformer layers and the pooler: no embeddings, no heads."""
    with torch.device("meta"):
        model = UniterForPretraining(UniterConfig.from_preset(preset))
    encoder = sum(p.numel() for n, p in model.uniter.named_parameters() if n.startswith(("encoder.", "pooler")))
    embeddings = sum(p.numel() for n, p in model.uniter.named_parameters() if "embeddings" in n)
    total = sum(p.numel() for p in model.parameters())  # shared tensors counted once
    with capsys.disabled():
        print(f"\n{preset}: transformer+pooler {encoder / 1e6:.2f}M (paper {paper_millions}M), "
              f"embeddings {embeddings / 1e6:.2f}M, with pretraining heads {total / 1e6:.2f}M")
    assert abs(encoder / 1e6 - paper_millions) / paper_millions < 0.01


def test_save_pretrained_round_trip_and_encoder_from_pretraining_folder(tiny_config, tmp_path):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["UniterForPretraining"] and config["hidden_size"] == tiny_config.hidden_size
    restored = UniterForPretraining.from_pretrained(tmp_path / "export").eval()
    assert restored.mlm_head.decoder.weight is restored.uniter.embeddings.word_embeddings.weight
    g = torch.Generator().manual_seed(0)
    batch = collate([random_sample(tiny_config, 7, 5, g), random_sample(tiny_config, 4, 9, g)], [1, 0])
    before, after = _outputs(model, batch), _outputs(restored, batch)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    encoder = UniterModel.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert torch.equal(encoder(batch).pooled_output, before["pooled"])
    # The other way, an encoder folder gives the heads fresh weights, and says which.
    encoder.save_pretrained(tmp_path / "encoder")
    _, info = UniterForPretraining.from_pretrained(tmp_path / "encoder", output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"mlm_head", "mrfr_head", "mrc_head", "itm_head"}
    assert not any(k.endswith("decoder.weight") or k.endswith("regress.weight") for k in info["missing_keys"])
