"""The encoder: config validation, BERT equivalence, padding invariance, the inference entry."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from uniter_ds.model import TASKS, UniterConfig, UniterForPretraining, UniterModel, build_batch, load_bert_weights

from .helpers import collate, random_sample


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        UniterConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        UniterConfig(num_hidden_layers=-1)
    with pytest.raises(ValueError, match="hidden_dropout_prob"):
        UniterConfig(hidden_dropout_prob=1.5)
    with pytest.raises(ValueError, match=r"unknown UniterConfig key\(s\) \['hiden_size'\]"):
        UniterConfig.from_dict({"hiden_size": 768})
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        UniterConfig.from_preset("huge")


def test_config_json_round_trip_and_presets(tmp_path):
    config = UniterConfig.from_preset("large", img_dim=1024)
    config.to_json_file(tmp_path / "c.json")
    assert UniterConfig.from_json_file(tmp_path / "c.json") == config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert UniterConfig.from_preset("base").vocab_size == 28996


def _bert_pair(tiny_config: UniterConfig, tmp_path):
    torch.manual_seed(0)
    bert_config = BertConfig(
        vocab_size=tiny_config.vocab_size, hidden_size=tiny_config.hidden_size,
        num_hidden_layers=tiny_config.num_hidden_layers, num_attention_heads=tiny_config.num_attention_heads,
        intermediate_size=tiny_config.intermediate_size, max_position_embeddings=tiny_config.max_position_embeddings,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=tiny_config.layer_norm_eps,
    )
    bert = BertModel(bert_config).eval()
    bert.save_pretrained(tmp_path / "bert")
    model = UniterModel(tiny_config).eval()
    report = load_bert_weights(model, tmp_path / "bert")
    return bert, model, report


def test_text_only_matches_huggingface_bert(tiny_config, tmp_path):
    bert, model, report = _bert_pair(tiny_config, tmp_path)
    # BERT has no image side: exactly the image embedding weights are reported missing.
    assert report.missing and all(k.startswith("img_embeddings.") for k in report.missing)
    assert report.unexpected == []

    lengths = [9, 4, 6]
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, tiny_config.vocab_size, (n,), generator=g) for n in lengths]
    no_regions = [torch.zeros(0, tiny_config.img_dim)] * len(ids)
    batch = build_batch(ids, no_regions, [torch.zeros(0, 7)] * len(ids))
    ours = model(batch)

    padded = torch.zeros(len(ids), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, t in enumerate(ids):
        padded[i, : len(t)], mask[i, : len(t)] = t, 1
    with torch.no_grad():
        ref = bert(input_ids=padded, attention_mask=mask)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(ours.sequence_output[i, :n], ref.last_hidden_state[i, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.pooled_output, ref.pooler_output, atol=1e-5, rtol=0)


def _sample_outputs(model: UniterForPretraining, batch, index: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        enc = model.uniter(batch).per_sample()[index]
        result = {"text": enc["text"], "regions": enc["regions"], "pooled": enc["pooled"]}
        for task in TASKS:
            out = model(batch, task)
            result[task] = out.item_losses[out.item_sample == index]
    return result


def test_padding_invariance_for_every_task(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    g = torch.Generator().manual_seed(3)
    short = random_sample(tiny_config, txt_len=5, num_regions=3, generator=g)
    longer = [random_sample(tiny_config, txt_len=12, num_regions=9, generator=g),
              random_sample(tiny_config, txt_len=7, num_regions=11, generator=g)]
    alone = _sample_outputs(model, collate([short], itm_targets=[1]), 0)
    crowded_batch = collate([longer[0], short, longer[1]], itm_targets=[0, 1, 1])
    assert crowded_batch.seq_len > 5 + 3
    crowded = _sample_outputs(model, crowded_batch, 1)
    assert alone.keys() == crowded.keys()
    for key in alone:
        assert alone[key].numel() > 0, key
        torch.testing.assert_close(alone[key], crowded[key], atol=1e-5, rtol=0, msg=key)


def test_compact_layout_puts_padding_only_at_the_end(tiny_config):
    g = torch.Generator().manual_seed(0)
    samples = [random_sample(tiny_config, 4, 3, g), random_sample(tiny_config, 6, 5, g)]
    batch = collate(samples)
    # Sample 0: 4 text slots then its 3 regions, which sit after the 6 padded text slots.
    assert batch.gather_index[0, :7].tolist() == [0, 1, 2, 3, 6, 7, 8]
    assert batch.attn_mask.tolist()[0] == [True] * 7 + [False] * 4
    assert batch.gather_index[1].tolist() == list(range(11))
    assert batch.real_tokens() == 18 and batch.padded_tokens() == 22


def test_encode_returns_unpadded_per_sample_states(tiny_config):
    torch.manual_seed(0)
    model = UniterModel(tiny_config).eval()
    g = torch.Generator().manual_seed(0)
    samples = [random_sample(tiny_config, n, r, g) for n, r in [(5, 3), (9, 7)]]
    both = model.encode([s["input_ids"] for s in samples], [s["img_feat"] for s in samples],
                        [s["img_pos"] for s in samples])
    alone = model.encode([samples[0]["input_ids"]], [samples[0]["img_feat"]], [samples[0]["img_pos"]])
    assert both[0]["text"].shape == (5, tiny_config.hidden_size)
    assert both[0]["regions"].shape == (3, tiny_config.hidden_size)
    assert both[1]["regions"].shape == (7, tiny_config.hidden_size)
    for key in ("text", "regions", "pooled"):
        torch.testing.assert_close(both[0][key], alone[0][key], atol=1e-5, rtol=0)


def test_masked_region_input_is_zeroed_feature_plus_mask_embedding(tiny_config):
    torch.manual_seed(0)
    model = UniterModel(tiny_config).eval()
    g = torch.Generator().manual_seed(0)
    s = random_sample(tiny_config, 6, 5, g)
    masked = build_batch([s["input_ids"]], [s["img_feat"]], [s["img_pos"]], img_masks=[s["img_masks"]])
    by_hand_feat = s["img_feat"].clone()
    by_hand_feat[s["img_masks"]] = model.img_embeddings.mask_embedding.weight[1].detach()
    by_hand = build_batch([s["input_ids"]], [by_hand_feat], [s["img_pos"]])
    unmasked = build_batch([s["input_ids"]], [s["img_feat"]], [s["img_pos"]])
    with torch.no_grad():
        out_masked, out_hand, out_plain = model(masked), model(by_hand), model(unmasked)
    torch.testing.assert_close(out_masked.sequence_output, out_hand.sequence_output, atol=1e-6, rtol=0)
    assert not torch.allclose(out_masked.sequence_output, out_plain.sequence_output, atol=1e-3)
    assert torch.all(model.img_embeddings.mask_embedding.weight[0] == 0)


def test_joint_masking_corrupts_both_modalities_in_one_batch(tiny_config):
    """The paper's ablation: MLM on a batch whose regions are masked too."""
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).eval()
    g = torch.Generator().manual_seed(0)
    samples = [random_sample(tiny_config, 8, 6, g) for _ in range(3)]
    joint = collate(samples)  # text labels and region masks together
    text_only = build_batch([s["input_ids"] for s in samples], [s["img_feat"] for s in samples],
                            [s["img_pos"] for s in samples], txt_labels=[s["txt_labels"] for s in samples])
    with torch.no_grad():
        mlm_joint, mlm_conditional = model(joint, "mlm"), model(text_only, "mlm")
        mrfr_joint = model(joint, "mrfr")
    assert mlm_joint.num_items == mlm_conditional.num_items
    assert not torch.allclose(mlm_joint.item_losses, mlm_conditional.item_losses)
    assert mrfr_joint.num_items == int(joint.img_masks.sum())


def test_activation_checkpointing_gives_the_same_gradients(tiny_config):
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config).train()
    g = torch.Generator().manual_seed(0)
    batch = collate([random_sample(tiny_config, 7, 5, g) for _ in range(2)])
    model(batch, "mlm").loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.uniter.encoder.activation_checkpointing = True
    model(batch, "mlm").loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


def test_unknown_task_and_missing_targets_are_clear_errors(tiny_config):
    model = UniterForPretraining(tiny_config).eval()
    g = torch.Generator().manual_seed(0)
    s = random_sample(tiny_config, 5, 4, g)
    with pytest.raises(ValueError, match="unknown pretraining task 'vqa'"):
        model(collate([s]), "vqa")
    plain = build_batch([s["input_ids"]], [s["img_feat"]], [s["img_pos"]])
    with pytest.raises(ValueError, match=r"task 'mrc-kl' needs batch field\(s\) \['img_masks'"):
        model(plain, "mrc-kl")


def test_mask_embedding_row_zero_stays_out_of_the_gradient(tiny_config):
    model = UniterForPretraining(tiny_config).train()
    g = torch.Generator().manual_seed(0)
    batch = collate([random_sample(tiny_config, 6, 7, g) for _ in range(2)])
    model(batch, "mrfr").loss.backward()
    grad = model.uniter.img_embeddings.mask_embedding.weight.grad
    assert grad[1].abs().sum() > 0 and grad[0].abs().sum() == 0
