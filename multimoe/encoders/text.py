"""Text encoder: a thin adapter over a transformers encoder (a small BERT from scratch, or any id/path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimoe.config import TextEncoderConfig
from multimoe.encoders.transformers_backbone import load_backbone, train_last_layers
from multimoe.pretrained import Pretrained


class TextEncoder(nn.Module, Pretrained):
    """``forward(input_ids (B, L), attention_mask (B, L)) -> (tokens (B, L, out_dim), mask (B, L))``.

    A transformers backbone comes with its own ``tokenizer``; the scratch BERT reads ids of the project's
    ``WordTokenizer`` (``tokenizer`` is None). ``saved``: the backbone files of a saved encoder, see
    ``multimoe.pretrained`` (the architecture is rebuilt from them and nothing downloads).
    """

    config_class = TextEncoderConfig

    def __init__(self, config: TextEncoderConfig, saved: Path | None = None) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BertConfig, BertModel

        self.config = config
        self.tokenizer: Any = None
        if config.backbone == "scratch":
            if config.vocab_size <= 0:
                raise ValueError(
                    "TextEncoderConfig.vocab_size must be set (from the tokenizer) for backbone 'scratch'"
                )
            bert = BertConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.hidden_size,
                num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads,
                intermediate_size=config.intermediate_size,
                max_position_embeddings=config.max_length,
                pad_token_id=0,  # WordTokenizer's <pad>
                type_vocab_size=1,
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout,
            )
            self.backbone: Any = BertModel(bert, add_pooling_layer=False)
        else:
            self.backbone = load_backbone(config.backbone, saved)
            self.tokenizer = AutoTokenizer.from_pretrained(saved or config.backbone)
        train_last_layers(self.backbone, config.train_layers, "TextEncoderConfig.train_layers")
        self.out_dim: int = self.backbone.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, attention_mask.bool()

    def save_backbone_files(self, folder: Path) -> None:
        if self.tokenizer is not None:
            self.backbone.config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
