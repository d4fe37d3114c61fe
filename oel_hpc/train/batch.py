"""A micro-batch of token rows as tensors, as both backends feed their models (the leaf they share)."""
from __future__ import annotations

import torch


def pad_batch(sequences: list[list[int]], response_lens: list[int], pad_id: int, device):
    """Right-padded ids and attention mask, and the flat indices (into [rows × width]) of the positions that
    predict each response token, rows concatenated."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    positions = []
    for i, (s, n) in enumerate(zip(sequences, response_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        # the token at position p is predicted from position p - 1
        positions.append(torch.arange(len(s) - n - 1, len(s) - 1) + i * width)
    return ids.to(device), attention.to(device), torch.cat(positions).to(device)
