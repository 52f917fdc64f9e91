"""UNITER: a single-stream transformer over word tokens and image regions (arXiv 1909.11740).

Read top to bottom: embeddings for each modality, a BERT (post-LN) encoder over the compact
sequence ``[CLS] words [SEP] regions <pad>``, the pooler, then the pretraining heads and losses, then
a classification head for fine-tuning. Self-attention and its packed forms are in attention.py;
compile and CUDA graphs (which change how the encoder runs, not what it computes) in acceleration.py.
Batches come from :func:`uniter_ds.model.inputs.build_batch`; the Hugging Face entry
(``model(input_ids=..., attention_mask=..., img_feat=..., ...)``) takes padded keyword tensors instead.

The models are Hugging Face ``PreTrainedModel`` s. This package (config, inputs, kernels, ot, tasks,
attention, modeling) imports nothing else from ``uniter_ds``: ``save_pretrained`` copies it beside the
weights, and ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads it where uniter_ds is
not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .attention import LengthBuckets, SelfAttention, packed_key_mask, resolve_packed_attention
from .config import UniterConfig
from .inputs import UniterBatch, batch_from_masks, build_batch
from .kernels import layer_norm
from .ot import wra_distance
from .tasks import REGION_TASKS, check_task

# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


class TextEmbeddings(nn.Module):
    """word + position + token type 0, LayerNorm, dropout (BERT's embeddings)."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor) -> Tensor:
        # Every table is read by calling its module (not by indexing .weight): ZeRO-3 gathers a
        # module's parameters in that module's forward hook only.
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(input_ids))
        )
        return self.dropout(self.LayerNorm(x))


class ImageEmbeddings(nn.Module):
    """LN(W_f feat) + LN(W_p pos) + token type 1, LayerNorm, dropout.

    Masked regions (MRM tasks) have their feature zeroed and the learned mask embedding added
    before the projection; row 0 of ``mask_embedding`` is the "not masked" row and stays zero.
    """

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        self.img_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.pos_linear = nn.Linear(config.img_pos_dim, config.hidden_size)
        self.pos_layer_norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, img_feat: Tensor, img_pos: Tensor, type_embedding: Tensor,
                img_masks: Tensor | None = None) -> Tensor:
        if img_masks is not None:
            masked = img_masks.unsqueeze(-1)
            # Row 1 on masked regions; the product keeps row 0 out of the sum and out of the gradient.
            mask_rows = self.mask_embedding(img_masks.long()) * masked
            img_feat = img_feat.masked_fill(masked, 0.0) + mask_rows.to(img_feat.dtype)
        x = (
            self.img_layer_norm(self.img_linear(img_feat))
            + self.pos_layer_norm(self.pos_linear(img_pos))
            + type_embedding
        )
        return self.dropout(self.LayerNorm(x))


# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
    """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ffn_norm = layer_norm(config.hidden_size, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, key_mask)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Encoder(nn.Module):
    """The layer stack. Options set on it: ``activation_checkpointing``, ``packed_attention``, and
    ``graphs`` (training steps replayed from CUDA graphs); model/options.py applies them from a config."""

    def __init__(self, config: UniterConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.activation_checkpointing = False
        # The packed layout's attention: auto, nested, mask or buckets (attention.py).
        self.packed_attention = "auto"
        # Training steps replay the layers from CUDA graphs when set (model/acceleration.py).
        self.graphs: Callable[[Tensor, Tensor], Tensor | None] | None = None

    def packed_attention_form(self, x: Tensor) -> str:
        """How packed rows of ``x`` attend: "nested", "mask" or "buckets" (``packed_attention`` with auto
        resolved for ``x``'s device)."""
        return resolve_packed_attention(self.packed_attention, x.is_cuda, self.graphs is not None)

    def forward(self, x: Tensor, attn_mask: Tensor | LengthBuckets) -> Tensor:
        """``attn_mask``: [B, L] (True on real tokens: every query sees them), [B, L, L] (which keys each
        query sees: the packed layout's block diagonal), [S + 1] offsets (the packed layout's
        sequences in the flattened rows, for the nested attention), or :class:`LengthBuckets`."""
        key_mask = attn_mask
        if isinstance(attn_mask, Tensor) and attn_mask.dim() > 1:  # broadcast over heads (and queries for [B, L])
            key_mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask[:, None]
        if self.graphs is not None and self.training and torch.is_grad_enabled():
            replayed = self.graphs(x, key_mask)
            if replayed is not None:
                return replayed
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        return x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class UniterOutput:
    sequence_output: Tensor  # [B, L, H] compact layout
    pooled_output: Tensor  # [B, H]
    attn_mask: Tensor  # [B, L] bool
    text_states: Tensor  # [B, Lt, H], zero on padding
    text_mask: Tensor  # [B, Lt] bool
    region_states: Tensor  # [B, Ni, H], zero on padding
    region_mask: Tensor  # [B, Ni] bool

    @property
    def last_hidden_state(self) -> Tensor:  # Hugging Face's name
        return self.sequence_output

    @property
    def pooler_output(self) -> Tensor:  # Hugging Face's name
        return self.pooled_output

    def per_sample(self) -> list[dict[str, Tensor]]:
        """One dict per sample: ``text`` [tl, H], ``regions`` [nr, H], ``pooled`` [H]; no padding."""
        txt_lens, img_lens = self.text_mask.sum(1).tolist(), self.region_mask.sum(1).tolist()
        return [
            {"text": self.text_states[i, :tl], "regions": self.region_states[i, :nr],
             "pooled": self.pooled_output[i]}
            for i, (tl, nr) in enumerate(zip(txt_lens, img_lens))
        ]


# Every Auto class one export folder serves (its config.json's auto_map; the code files travel with it).
AUTO_MAP = {
    "AutoConfig": "config.UniterConfig",
    "AutoModel": "modeling.UniterModel",
    "AutoModelForPreTraining": "modeling.UniterForPretraining",
    "AutoModelForSequenceClassification": "modeling.UniterForSequenceClassification",
}


class UniterPreTrainedModel(PreTrainedModel):
    """Shared by every UNITER model: BERT's initialisation, and Hugging Face's ``save_pretrained`` /
    ``from_pretrained`` (``config.json`` + safetensors, sharded above ``max_shard_size``). An encoder
    loads from a pretraining export (the heads are dropped); a head model loads an encoder export (its
    head starts from BERT's initialisation, which Hugging Face reports as missing weights)."""

    config_class = UniterConfig
    base_model_prefix = "uniter"
    main_input_name = "input_ids"
    _no_split_modules = ["EncoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])  # the mask embedding's "not masked" row
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif "LayerNorm" in type(module).__name__:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (MlmHead, TransposedLinear)):
            nn.init.zeros_(module.bias)

    def _adjust_bias(self, output_embeddings: nn.Module, input_embeddings: nn.Module) -> None:
        # After tying, Hugging Face cuts a head's bias to its weight's first dim: right for an LM decoder,
        # wrong for the MRFR layer, which reads its [H, img_dim] weight transposed (bias: img_dim).
        if not isinstance(output_embeddings, TransposedLinear):
            super()._adjust_bias(output_embeddings, input_embeddings)

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """Hugging Face's, with the modeling code and an ``auto_map`` for every UNITER Auto class."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)


class UniterModel(UniterPreTrainedModel):
    """The UNITER encoder: embeddings, transformer, pooler. Input: a :class:`UniterBatch`."""

    _auto_class = "AutoModel"
    # Loading the encoder from a pretraining export drops its heads, as intended: not worth a warning.
    _keys_to_ignore_on_load_unexpected = [r"^(mlm|mrfr|mrc|itm)_head\."]

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.embeddings = TextEmbeddings(config)
        self.img_embeddings = ImageEmbeddings(config)
        self.encoder = Encoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, batch: UniterBatch | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, img_feat: Tensor | None = None, img_pos: Tensor | None = None,
                img_attention_mask: Tensor | None = None, img_masks: Tensor | None = None) -> UniterOutput:
        """``batch``: a :class:`UniterBatch` (training, no host sync); or Hugging Face-style keyword
        tensors, text and regions each padded at the end: ``input_ids`` [B, Lt] with ``attention_mask``
        [B, Lt], ``img_feat`` [B, Ni, img_dim] and ``img_pos`` [B, Ni, 7] with ``img_attention_mask``
        [B, Ni] (optional ``img_masks`` [B, Ni] for masked regions)."""
        if batch is None:
            if input_ids is None or img_feat is None or img_pos is None:
                raise ValueError("UniterModel needs a UniterBatch or input_ids, img_feat and img_pos")
            batch = batch_from_masks(input_ids=input_ids, attention_mask=attention_mask, img_feat=img_feat,
                                     img_pos=img_pos, img_attention_mask=img_attention_mask, img_masks=img_masks)
        text = self.embeddings(batch.input_ids)
        image_type = torch.ones(1, 1, dtype=torch.long, device=text.device)
        regions = self.img_embeddings(
            batch.img_feat.to(text.dtype), batch.img_pos.to(text.dtype),
            self.embeddings.token_type_embeddings(image_type), batch.img_masks,
        )
        both = torch.cat([text, regions], dim=1)
        index = batch.gather_index.unsqueeze(-1).expand(-1, -1, both.size(-1))
        x = torch.gather(both, 1, index)
        if batch.pack_index is None:
            x = self.encoder(x, batch.attn_mask)
        else:  # rows of several samples, each token attending to its own sample's only
            hidden = x.size(-1)
            within = packed_key_mask(batch, self.encoder.packed_attention_form(x))
            rows = self.encoder(x.reshape(-1, hidden)[batch.pack_index], within)
            x = rows.reshape(-1, hidden)[batch.unpack_index]
        pooled = torch.tanh(self.pooler(x[:, 0]))

        max_txt, max_img = batch.input_ids.size(1), batch.img_feat.size(1)
        text_mask = torch.arange(max_txt, device=x.device) < batch.txt_lens.unsqueeze(1)
        region_mask = torch.arange(max_img, device=x.device) < batch.img_lens.unsqueeze(1)
        # Text occupies compact positions [0, tl); the regions follow at [tl, tl + nr).
        text_states = x[:, :max_txt] * text_mask.unsqueeze(-1)
        region_index = (batch.txt_lens.unsqueeze(1) + torch.arange(max_img, device=x.device))
        region_index = region_index.clamp(max=x.size(1) - 1)
        region_states = torch.gather(x, 1, region_index.unsqueeze(-1).expand(-1, -1, x.size(-1)))
        region_states = region_states * region_mask.unsqueeze(-1)
        return UniterOutput(x, pooled, batch.attn_mask, text_states, text_mask, region_states, region_mask)

    @torch.no_grad()
    def encode(
        self,
        input_ids: Sequence[Tensor],
        img_feat: Sequence[Tensor],
        img_pos: Sequence[Tensor],
    ) -> list[dict[str, Tensor]]:
        """Inference entry for fine-tuning code.

        input_ids[i]: [tl] token ids with [CLS]/[SEP]; img_feat[i]: [n, img_dim]; img_pos[i]: [n, 7].
        Returns per sample ``{"text": [tl, H], "regions": [n, H], "pooled": [H]}`` with no padding.
        Use ``forward(build_batch(...))`` instead to keep gradients for fine-tuning.
        """
        device = next(self.parameters()).device
        return self(build_batch(input_ids, img_feat, img_pos).to(device)).per_sample()


# ---------------------------------------------------------------------------------------------
# Pretraining heads and losses
# ---------------------------------------------------------------------------------------------


class HeadTransform(nn.Sequential):
    """dense -> GELU -> LayerNorm, the shared shape of the MLM and MRM heads."""

    def __init__(self, config: UniterConfig):
        super().__init__(
            nn.Linear(config.hidden_size, config.hidden_size),
            nn.GELU(),
            layer_norm(config.hidden_size, config.layer_norm_eps),
        )


class MlmHead(nn.Module):
    """BERT LM head; the decoder's weight IS the word embedding table (one Parameter, two names)."""

    def __init__(self, config: UniterConfig, word_embeddings: nn.Parameter):
        super().__init__()
        self.transform = HeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class TransposedLinear(nn.Module):
    """y = x W^T^T + b with W shared from an [out_features_of_W, in] Linear: the MRFR output layer."""

    def __init__(self, weight: nn.Parameter, bias_size: int):
        super().__init__()
        self.weight = weight  # [H, img_dim], the image projection's own Parameter
        self.bias = nn.Parameter(torch.zeros(bias_size))

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias


class MrfrHead(nn.Module):
    def __init__(self, config: UniterConfig, img_linear_weight: nn.Parameter):
        super().__init__()
        self.transform = HeadTransform(config)
        self.regress = TransposedLinear(img_linear_weight, config.img_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.regress(self.transform(x))


class MrcHead(nn.Module):
    def __init__(self, config: UniterConfig):
        super().__init__()
        self.transform = HeadTransform(config)
        self.classifier = nn.Linear(config.hidden_size, config.img_label_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.transform(x))


@dataclass
class TaskOutput:
    """One task's loss on a batch.

    ``loss`` is the mean of ``item_losses`` (items: masked tokens for MLM, masked regions for MRM,
    pairs for ITM). ``item_sample`` says which sample each item came from. ``num_correct`` counts
    argmax hits where the task has classes (MLM, MRC, ITM), for accuracy metrics.
    """

    task: str
    loss: Tensor
    item_losses: Tensor
    item_sample: Tensor
    num_correct: Tensor | None = None
    logits: Tensor | None = None
    parts: dict[str, Tensor] | None = None

    @property
    def num_items(self) -> int:
        return self.item_losses.numel()


MRC_KL_OBJECTIVES = ("original", "per_region")


class UniterForPretraining(UniterPreTrainedModel):
    """UNITER with the MLM, MRFR, MRC / MRC-kl and ITM (+ WRA) heads. One task per forward.

    WRA runs on ITM batches: item loss = CE + ``wra_weight`` * (+d if matched, -d if swapped),
    d the IPOT distance between the pair's word and region states; ``wra_weight=0`` is plain ITM.

    MRC-kl: ``mrc_kl="original"`` (default) trains on the reference's objective, the mean of the
    elementwise KL terms over masked regions AND classes, i.e. each region's KL divided by the number of
    classes (1601 for real features); ``"per_region"`` trains on each region's whole KL, 1601x larger
    against the other tasks. Either way ``parts["kl_per_region"]`` is the per-region KL, the number the
    reference's validation reports.
    """

    _auto_class = "AutoModelForPreTraining"
    # One Parameter, two names: loading re-ties them (the MRFR output layer uses the image projection's
    # weight transposed, as the reference does).
    _tied_weights_keys = {"mlm_head.decoder.weight": "uniter.embeddings.word_embeddings.weight",
                          "mrfr_head.regress.weight": "uniter.img_embeddings.img_linear.weight"}

    def __init__(self, config: UniterConfig, wra_weight: float = 0.1, ipot_beta: float = 0.5,
                 ipot_iterations: int = 50, ipot_inner_steps: int = 1, mrc_kl: str = "original"):
        super().__init__(config)
        if mrc_kl not in MRC_KL_OBJECTIVES:
            raise ValueError(f"mrc_kl={mrc_kl!r}: expected one of {', '.join(MRC_KL_OBJECTIVES)}")
        self.mrc_kl = mrc_kl
        self.uniter = UniterModel(config)
        self.mlm_head = MlmHead(config, self.uniter.embeddings.word_embeddings.weight)
        self.mrfr_head = MrfrHead(config, self.uniter.img_embeddings.img_linear.weight)
        self.mrc_head = MrcHead(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.wra_weight = wra_weight
        self.ipot = dict(beta=ipot_beta, iterations=ipot_iterations, inner_steps=ipot_inner_steps, compiled=False)
        self.post_init()  # the encoder initialised itself; this initialises the heads' own layers

    def forward(self, batch: UniterBatch, task: str) -> TaskOutput:
        check_task(task)
        out = self.uniter(batch)
        if task == "mlm":
            return self.mlm_loss(out, batch)
        if task in REGION_TASKS:
            return self.mrm_loss(out, batch, task)
        return self.itm_loss(out, batch)

    def mlm_loss(self, out: UniterOutput, batch: UniterBatch) -> TaskOutput:
        _require(batch, "mlm", "mlm_positions", "mlm_labels")
        hidden = out.sequence_output.flatten(0, 1).index_select(0, batch.mlm_positions)
        logits = self.mlm_head(hidden).float()
        losses = F.cross_entropy(logits, batch.mlm_labels, reduction="none")
        correct = (logits.argmax(-1) == batch.mlm_labels).sum()
        return TaskOutput("mlm", losses.mean(), losses, batch.mlm_positions // batch.seq_len, correct)

    def mrm_loss(self, out: UniterOutput, batch: UniterBatch, task: str) -> TaskOutput:
        _require(batch, task, "img_masks", "mrm_positions", "mrm_img_index")
        hidden = out.sequence_output.flatten(0, 1).index_select(0, batch.mrm_positions)
        sample = batch.mrm_img_index // batch.img_feat.size(1)
        if task == "mrfr":
            target = batch.img_feat.flatten(0, 1).index_select(0, batch.mrm_img_index).float()
            prediction = self.mrfr_head(hidden).float()
            losses = F.mse_loss(prediction, target, reduction="none").mean(-1)
            return TaskOutput(task, losses.mean(), losses, sample)
        _require(batch, task, "mrm_soft_labels")
        soft = batch.mrm_soft_labels.float()
        logits = self.mrc_head(hidden).float()
        # The detector's top non-background class (class 0 is background and never a target).
        hard = soft[:, 1:].argmax(-1) + 1
        parts = None
        if task == "mrc":
            losses = F.cross_entropy(logits, hard, reduction="none")
        else:  # KL(detector distribution || predicted distribution)
            kl_per_region = F.kl_div(F.log_softmax(logits, -1), soft, reduction="none").sum(-1)
            losses = kl_per_region / soft.size(-1) if self.mrc_kl == "original" else kl_per_region
            parts = {"kl_per_region": kl_per_region.mean()}
        if task == "mrc":  # accuracy over the object classes, as the target: background is never the answer
            correct = (logits[:, 1:].argmax(-1) + 1 == hard).sum()
        else:  # the reference's MRC-kl accuracy: argmax over every class, background included
            correct = (logits.argmax(-1) == soft.argmax(-1)).sum()
        return TaskOutput(task, losses.mean(), losses, sample, correct, parts=parts)

    def itm_loss(self, out: UniterOutput, batch: UniterBatch) -> TaskOutput:
        _require(batch, "itm", "itm_targets")
        logits = self.itm_head(out.pooled_output).float()
        ce = F.cross_entropy(logits, batch.itm_targets, reduction="none")
        losses, parts = ce, {"itm_ce": ce.mean()}
        if self.wra_weight:
            distance = wra_distance(out.text_states, out.region_states, out.text_mask, out.region_mask,
                                    **self.ipot)
            signed = torch.where(batch.itm_targets == 1, distance, -distance)
            losses = ce + self.wra_weight * signed
            parts["wra_ot"] = signed.mean()
        correct = (logits.argmax(-1) == batch.itm_targets).sum()
        sample = torch.arange(batch.batch_size, device=logits.device)
        return TaskOutput("itm", losses.mean(), losses, sample, correct, logits, parts)


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


class UniterForSequenceClassification(UniterPreTrainedModel):
    """A classifier over the pooled [CLS] state (``config.num_labels`` outputs), Hugging Face's
    sequence-classification contract: keyword tensors in, ``loss`` when ``labels`` are given
    (cross-entropy; MSE for one label; BCE for ``problem_type="multi_label_classification"``, as VQA's
    soft scores), so ``transformers.Trainer`` fine-tunes it with a data collator."""

    _auto_class = "AutoModelForSequenceClassification"
    _keys_to_ignore_on_load_unexpected = [r"^(mlm|mrfr|mrc|itm)_head\."]

    def __init__(self, config: UniterConfig):
        super().__init__(config)
        self.uniter = UniterModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, batch: UniterBatch | None = None, input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, img_feat: Tensor | None = None, img_pos: Tensor | None = None,
                img_attention_mask: Tensor | None = None, labels: Tensor | None = None) -> SequenceClassifierOutput:
        out = self.uniter(batch, input_ids=input_ids, attention_mask=attention_mask, img_feat=img_feat,
                          img_pos=img_pos, img_attention_mask=img_attention_mask)
        logits = self.classifier(self.dropout(out.pooled_output))
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif self.config.problem_type == "multi_label_classification":
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.long())
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=None, attentions=None)


def tied_parameter_names(model: nn.Module) -> list[set[str]]:
    """Groups of state-dict names that share one tensor (the MLM decoder and the word embeddings, ...)."""
    groups: dict[int, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def _require(batch: UniterBatch, task: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(batch, f) is None]
    if missing:
        raise ValueError(f"task {task!r} needs batch field(s) {missing}; build the batch with the "
                         f"matching build_batch arguments")
