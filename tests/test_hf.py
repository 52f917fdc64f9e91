"""The Hugging Face contract: keyword-tensor forward, transformers.Trainer fine-tuning, PEFT LoRA round trip."""

from __future__ import annotations

import torch

from uniter_ds.model import UniterConfig, UniterForSequenceClassification, UniterModel, build_batch


def padded_inputs(config: UniterConfig, seed: int = 0, batch: int = 3) -> dict[str, torch.Tensor]:
    """Text and regions each padded at the end, with 0/1 masks, as a Hugging Face collator makes them."""
    g = torch.Generator().manual_seed(seed)
    txt_lens = torch.randint(3, 9, (batch,), generator=g)
    img_lens = torch.randint(2, 7, (batch,), generator=g)
    lt, ni = int(txt_lens.max()), int(img_lens.max())
    attention_mask = (torch.arange(lt) < txt_lens[:, None]).long()
    img_attention_mask = (torch.arange(ni) < img_lens[:, None]).long()
    return {
        "input_ids": torch.randint(5, config.vocab_size, (batch, lt), generator=g) * attention_mask,
        "attention_mask": attention_mask,
        "img_feat": torch.rand(batch, ni, config.img_dim, generator=g) * img_attention_mask[..., None],
        "img_pos": torch.rand(batch, ni, config.img_pos_dim, generator=g) * img_attention_mask[..., None],
        "img_attention_mask": img_attention_mask,
    }


def test_keyword_forward_equals_the_batch_forward(tiny_config):
    torch.manual_seed(0)
    model = UniterModel(tiny_config).eval()
    inputs = padded_inputs(tiny_config)
    txt_lens, img_lens = inputs["attention_mask"].sum(1), inputs["img_attention_mask"].sum(1)
    batch = build_batch([ids[:n] for ids, n in zip(inputs["input_ids"], txt_lens)],
                        [f[:n] for f, n in zip(inputs["img_feat"], img_lens)],
                        [p[:n] for p, n in zip(inputs["img_pos"], img_lens)])
    with torch.no_grad():
        by_keywords, by_batch = model(**inputs), model(batch)
    assert torch.equal(by_keywords.last_hidden_state, by_batch.sequence_output)
    assert torch.equal(by_keywords.pooler_output, by_batch.pooled_output)


class PairDataset(torch.utils.data.Dataset):
    """Label 1 when the caption's first word id is even and the regions are bright: learnable from both sides."""

    def __init__(self, config: UniterConfig, size: int = 32):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for _ in range(size):
            tl, n = int(torch.randint(3, 8, (), generator=g)), int(torch.randint(2, 6, (), generator=g))
            ids = torch.randint(5, config.vocab_size, (tl,), generator=g)
            bright = bool(torch.rand((), generator=g) < 0.5)
            feat = torch.rand(n, config.img_dim, generator=g) + (1.0 if bright else 0.0)
            label = int(bright and int(ids[0]) % 2 == 0)
            self.items.append({"input_ids": ids, "img_feat": feat, "img_pos": torch.rand(n, 7, generator=g),
                               "labels": label})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate_padded(items: list[dict]) -> dict[str, torch.Tensor]:
    """A data collator: each modality padded at the end, with its mask."""
    pad = torch.nn.utils.rnn.pad_sequence
    text = [it["input_ids"] for it in items]
    feats, pos = [it["img_feat"] for it in items], [it["img_pos"] for it in items]
    return {
        "input_ids": pad(text, batch_first=True),
        "attention_mask": pad([torch.ones(len(t), dtype=torch.long) for t in text], batch_first=True),
        "img_feat": pad(feats, batch_first=True), "img_pos": pad(pos, batch_first=True),
        "img_attention_mask": pad([torch.ones(len(f), dtype=torch.long) for f in feats], batch_first=True),
        "labels": torch.tensor([it["labels"] for it in items]),
    }


def test_trainer_fine_tunes_a_classifier_and_the_loss_falls(tiny_config, tmp_path):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    UniterModel(tiny_config).save_pretrained(tmp_path / "encoder")
    model = UniterForSequenceClassification.from_pretrained(tmp_path / "encoder", num_labels=2)
    model.train()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=40, per_device_train_batch_size=8,
                             learning_rate=2e-3, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=PairDataset(tiny_config), data_collator=collate_padded)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) >= 5
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses
    # Without labels the same forward gives logits and no loss (inference).
    batch = collate_padded([PairDataset(tiny_config)[i] for i in range(3)])
    batch.pop("labels")
    out = model.eval()(**batch)
    assert out.loss is None and out.logits.shape == (3, 2)


def test_lora_adapter_round_trip(tiny_config, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    UniterModel(tiny_config).save_pretrained(tmp_path / "base")
    base = UniterModel.from_pretrained(tmp_path / "base")
    inputs = padded_inputs(tiny_config, seed=3)
    with torch.no_grad():
        before = base(**inputs).last_hidden_state.clone()
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "out"]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * tiny_config.num_hidden_layers  # A and B, qkv and out, every layer
    with torch.no_grad():  # as after training: B is zero at init, which would hide a lost adapter
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
        adapted = lora(**inputs).last_hidden_state.clone()
    assert (adapted - before).abs().max() > 1e-3
    lora.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(UniterModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, adapted, atol=1e-6, rtol=0)
