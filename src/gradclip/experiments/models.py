"""The experiments' models: small, CPU-friendly, and written to be read."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LSTMPredictor(nn.Module):
    """LSTM (input 1, hidden 50) and a linear head: predicts the next value of a series."""

    def __init__(self, hidden_size: int = 50) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(batch, seq, 1)`` inputs to ``(batch, seq, 1)`` next-value predictions."""
        out, _ = self.lstm(x)
        prediction: Tensor = self.head(out)
        return prediction


class MLP(nn.Module):
    """A feed-forward classifier: Linear–ReLU layers and a linear output layer."""

    def __init__(self, inputs: int, hidden: tuple[int, ...], classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(batch, classes)``."""
        logits: Tensor = self.net(x)
        return logits


class TanhRNNCell(nn.Module):
    """The vanilla RNN cell, written out: ``h' = tanh(W_xh x + W_hh h + b)``.

    No ``nn.RNN``: the recurrence is plain matrix products, so the exploding-gradient
    mechanism (repeated multiplication by ``W_hh`` through time) is in plain sight.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.w_xh = nn.Parameter(torch.empty(hidden_size, input_size))
        self.w_hh = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        nn.init.xavier_uniform_(self.w_xh)
        nn.init.orthogonal_(self.w_hh)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """One step: ``x`` is ``(batch, input)``, ``h`` is ``(batch, hidden)``."""
        return torch.tanh(x @ self.w_xh.T + h @ self.w_hh.T + self.bias)


class CharRNN(nn.Module):
    """A character-level language model on :class:`TanhRNNCell`."""

    def __init__(self, vocab: int, hidden_size: int = 128, embed: int = 32) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(vocab, embed)
        self.cell = TanhRNNCell(embed, hidden_size)
        self.head = nn.Linear(hidden_size, vocab)

    def initial_state(self, batch: int, device: torch.device | None = None) -> Tensor:
        """Zeros of shape ``(batch, hidden)``."""
        return torch.zeros(batch, self.hidden_size, device=device)

    def forward(self, tokens: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Logits ``(batch, seq, vocab)`` for ``tokens`` ``(batch, seq)``, and the last state."""
        inputs = self.embed(tokens)
        outputs = []
        for t in range(tokens.shape[1]):
            h = self.cell(inputs[:, t], h)
            outputs.append(h)
        logits: Tensor = self.head(torch.stack(outputs, dim=1))
        return logits, h

    @torch.no_grad()
    def sample(
        self, start: Tensor, length: int, generator: torch.Generator, temperature: float = 0.8
    ) -> list[int]:
        """Sample ``length`` token ids after the prompt ``start`` (1-D ids)."""
        h = self.initial_state(1, start.device)
        logits, h = self(start[None], h)
        out: list[int] = []
        for _ in range(length):
            probs = torch.softmax(logits[0, -1] / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)
            out.append(int(token))
            logits, h = self(token[None], h)
        return out
