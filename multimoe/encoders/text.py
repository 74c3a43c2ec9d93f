"""Text encoder: a thin adapter over a transformers encoder (a small BERT from scratch, or any id/path)."""

from __future__ import annotations

import torch
from torch import nn

from multimoe.config import TextEncoderConfig


class TextEncoder(nn.Module):
    """``forward(input_ids (B, L), attention_mask (B, L)) -> (tokens (B, L, out_dim), mask (B, L))``."""

    def __init__(self, config: TextEncoderConfig, pad_id: int = 0) -> None:
        super().__init__()
        from transformers import AutoModel, BertConfig, BertModel

        self.config = config
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
                pad_token_id=pad_id,
                type_vocab_size=1,
            )
            self.backbone = BertModel(bert, add_pooling_layer=False)
        else:
            self.backbone = AutoModel.from_pretrained(config.backbone)
        self.out_dim: int = self.backbone.config.hidden_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state, attention_mask.bool()
