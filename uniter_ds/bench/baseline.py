"""The baseline a user would otherwise pick: the same UNITER, computed the way the reference code
and a plain Hugging Face stack compute it.

- A ``transformers`` ``BertModel`` encoder with eager attention over the PADDED ``cat(text, regions)``
  layout (text padded to the longest caption, then regions padded to the largest region count:
  padding in the middle of the sequence, masked out), instead of our compact layout.
- Heads over the full sequence (the 28996-way decoder on every position), targets picked afterwards.
- Meant to be trained with torch AMP and a plain ``torch.optim.AdamW`` (see benchmarks/).

Same parameters, same maths: on the same batch and weights it computes the same losses as
:class:`UniterForPretraining` (tested), so a speed comparison is like for like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from ..model import UniterForPretraining, to_original_state_dict
from ..model.inputs import IGNORE_INDEX, UniterBatch
from ..model.modeling import ImageEmbeddings, MlmHead, MrcHead, MrfrHead, TaskOutput
from ..model.ot import wra_distance
from ..model.tasks import REGION_TASKS


class BaselineUniter(nn.Module):
    def __init__(self, pretrain: UniterForPretraining):
        super().__init__()
        config = pretrain.config
        self.config = config
        bert_config = BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
            hidden_dropout_prob=config.hidden_dropout_prob,
            attention_probs_dropout_prob=config.attention_probs_dropout_prob,
            max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.layer_norm_eps, attn_implementation="eager",
        )
        self.bert = BertModel(bert_config)
        self.img_embeddings = ImageEmbeddings(config)
        self.mlm_head = MlmHead(config, self.bert.embeddings.word_embeddings.weight)
        self.mrfr_head = MrfrHead(config, self.img_embeddings.img_linear.weight)
        self.mrc_head = MrcHead(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.wra_weight, self.mrc_kl = pretrain.wra_weight, pretrain.mrc_kl
        self.ipot = pretrain.ipot | {"compiled": False}  # a copy: the baseline stays eager under --compile

    @classmethod
    def from_uniter(cls, pretrain: UniterForPretraining) -> BaselineUniter:
        """The same weights: BERT's names are the original UNITER names without ``uniter.``."""
        baseline = cls(pretrain)
        original = to_original_state_dict(pretrain)
        bert_state = {k[len("uniter."):]: v for k, v in original.items()
                      if k.startswith("uniter.") and not k.startswith("uniter.img_embeddings.")}
        missing, unexpected = baseline.bert.load_state_dict(bert_state, strict=False)
        if unexpected or [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]:
            raise RuntimeError(f"baseline weights: missing {missing}, unexpected {unexpected}")
        baseline.img_embeddings.load_state_dict(pretrain.uniter.img_embeddings.state_dict())
        for name in ("mlm_head", "mrfr_head", "mrc_head", "itm_head"):
            own = getattr(baseline, name)
            own.load_state_dict({k: v for k, v in getattr(pretrain, name).state_dict().items()
                                 if k in own.state_dict()}, strict=False)
        baseline.mlm_head.transform.load_state_dict(pretrain.mlm_head.transform.state_dict())
        baseline.mlm_head.bias.data.copy_(pretrain.mlm_head.bias.data)
        baseline.mrfr_head.regress.bias.data.copy_(pretrain.mrfr_head.regress.bias.data)
        return baseline

    @staticmethod
    def sequence_length(batch: UniterBatch) -> int:
        return batch.input_ids.size(1) + batch.img_feat.size(1)

    def encode(self, batch: UniterBatch) -> tuple[Tensor, Tensor, Tensor]:
        max_txt, max_img = batch.input_ids.size(1), batch.img_feat.size(1)
        device = batch.input_ids.device
        text_mask = torch.arange(max_txt, device=device) < batch.txt_lens.unsqueeze(1)
        region_mask = torch.arange(max_img, device=device) < batch.img_lens.unsqueeze(1)
        text = self.bert.embeddings(input_ids=batch.input_ids, token_type_ids=torch.zeros_like(batch.input_ids))
        image_type = self.bert.embeddings.token_type_embeddings(torch.ones(1, 1, dtype=torch.long, device=device))
        regions = self.img_embeddings(batch.img_feat.to(text.dtype), batch.img_pos.to(text.dtype), image_type,
                                      batch.img_masks)
        mask = torch.cat([text_mask, region_mask], dim=1)
        # BERT's additive mask: 0 on real keys, the dtype's minimum on padding.
        additive = (~mask)[:, None, None, :].to(text.dtype) * torch.finfo(text.dtype).min
        sequence = self.bert.encoder(torch.cat([text, regions], dim=1), attention_mask=additive)[0]
        return sequence, text_mask, region_mask

    def forward(self, batch: UniterBatch, task: str) -> TaskOutput:
        sequence, text_mask, region_mask = self.encode(batch)
        max_txt, max_img = batch.input_ids.size(1), batch.img_feat.size(1)
        if task == "mlm":
            logits = self.mlm_head(sequence[:, :max_txt]).float()  # every position, as the baseline does
            labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
            rows, cols = batch.mlm_positions // batch.seq_len, batch.mlm_positions % batch.seq_len
            labels[rows, cols] = batch.mlm_labels
            losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            losses = losses[labels.flatten() != IGNORE_INDEX]
            return TaskOutput(task, losses.mean(), losses, rows)
        if task in REGION_TASKS:
            region_states = sequence[:, max_txt:]
            rows, cols = batch.mrm_img_index // max_img, batch.mrm_img_index % max_img
            if task == "mrfr":
                prediction = self.mrfr_head(region_states).float()[rows, cols]
                target = batch.img_feat.float()[rows, cols]
                losses = F.mse_loss(prediction, target, reduction="none").mean(-1)
                return TaskOutput(task, losses.mean(), losses, rows)
            logits = self.mrc_head(region_states).float()[rows, cols]
            soft = batch.mrm_soft_labels.float()
            if task == "mrc":
                losses = F.cross_entropy(logits, soft[:, 1:].argmax(-1) + 1, reduction="none")
            else:
                losses = F.kl_div(F.log_softmax(logits, -1), soft, reduction="none").sum(-1)
                if self.mrc_kl == "original":
                    losses = losses / soft.size(-1)
            return TaskOutput(task, losses.mean(), losses, rows)
        pooled = self.bert.pooler(sequence)
        logits = self.itm_head(pooled).float()
        losses = F.cross_entropy(logits, batch.itm_targets, reduction="none")
        if self.wra_weight:
            text_states = sequence[:, :max_txt] * text_mask.unsqueeze(-1)
            region_states = sequence[:, max_txt:] * region_mask.unsqueeze(-1)
            distance = wra_distance(text_states, region_states, text_mask, region_mask, **self.ipot)
            losses = losses + self.wra_weight * torch.where(batch.itm_targets == 1, distance, -distance)
        return TaskOutput("itm", losses.mean(), losses, torch.arange(len(losses), device=losses.device))
