"""One base model answering many users at once: cross-user batched generation.

The job's starting model (its task adapter merged, as for training) carries a
:class:`MultiLora` of ``max_rows + 1`` slots. Slot 0 stays all zeros: the base model. Each
batch copies the adapters of its users into slots 1…, routes every row to its user's slot
and runs ONE ``generate`` for all rows; a row's output depends only on the base and its own
adapter, so it is the output that row gets alone. Greedy by default; a row with a
temperature samples its own next token (the others stay greedy).

One batch at a time (a lock): the slots are this object's state.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LogitsProcessor

from cbpo_orch.data.tasks import Decoding
from cbpo_orch.method.config import LoraSettings
from cbpo_orch.training.generation import Completion, RowEnds, generate_batch
from cbpo_orch.training.models import LoadedModel
from cbpo_orch.training.multi_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MultiLora


@dataclass(frozen=True, eq=False)
class UserAdapter:
    """One user's saved adapter, read into tensors on the serving device."""

    user_id: str
    state: dict[str, torch.Tensor]


def load_user_adapter(user_id: str, folder: str | Path, lora: LoraSettings, device: torch.device | str) -> UserAdapter:
    """Read the stock peft adapter in ``folder``; ValueError unless it has the job's LoRA
    layout (rank, alpha, target modules)."""
    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    found = (config.get("r"), config.get("lora_alpha"), sorted(config.get("target_modules") or []))
    wanted = (lora.r, lora.alpha, sorted(lora.target_modules))
    if found != wanted:
        raise ValueError(f"the adapter of user {user_id!r} has (r, alpha, targets) {found}, the job's layout is {wanted}")
    return UserAdapter(user_id, load_file(str(folder / ADAPTER_WEIGHTS), device=str(device)))


@dataclass(frozen=True)
class Row:
    """One request of a batch: its prompt's token ids, its adapter (None: the base model)."""

    prompt_ids: list[int]
    max_tokens: int
    adapter: UserAdapter | None = None
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Chunk:
    """What one generation step added to a row's text; its last chunk holds the completion."""

    text: str
    completion: Completion | None = None


StepCallback = Callable[[list["Chunk | None"]], None]
"""Called after every step with one entry per row: its chunk, or None once the row has ended."""


class BatchedGenerator:
    """``loaded``'s model with ``max_rows`` adapter slots, generating for many users at once,
    every row ended and guarded by the task's ``decoding`` as evaluation's rows are."""

    def __init__(self, loaded: LoadedModel, lora: LoraSettings, max_rows: int, decoding: Decoding = Decoding()):
        if max_rows < 1:
            raise ValueError("max_rows must be ≥ 1")
        self.loaded, self.max_rows, self.decoding = loaded, max_rows, decoding
        self.multi = MultiLora(loaded.model, lora, n_slots=max_rows + 1)
        self._held: list[UserAdapter | None] = [None] * (max_rows + 1)
        self._one_batch_at_a_time = threading.Lock()

    @torch.no_grad()
    def generate(self, rows: list[Row], on_step: StepCallback | None = None) -> list[Completion]:
        """Answer every row in one ``generate``; ``on_step`` sees each step's new text."""
        if not 1 <= len(rows) <= self.max_rows:
            raise ValueError(f"a batch holds 1 to {self.max_rows} rows, not {len(rows)}")
        with self._one_batch_at_a_time:
            return self._generate(rows, on_step)

    def _generate(self, rows: list[Row], on_step: StepCallback | None) -> list[Completion]:
        tokenizer, device = self.loaded.tokenizer, self.loaded.device
        tracker = _Tracker(rows, tokenizer, self.decoding, on_step)
        sampling = [_RowSampling(rows)] if any(row.temperature > 0 for row in rows) else []
        self.loaded.model.eval()
        slots = torch.tensor(self._place(rows), device=device)
        generate_batch(
            self.loaded.model, [row.prompt_ids for row in rows], max(row.max_tokens for row in rows), tokenizer.pad_token_id,
            tokenizer.eos_token_id, device, slots, self.multi, tracker, self.decoding.no_repeat_ngram, sampling,
        )
        return [tracker.completion(i) for i in range(len(rows))]

    def _place(self, rows: list[Row]) -> list[int]:
        """Each row's slot: 0 for the base model, else the slot holding its user's adapter
        (copied in unless a slot still holds that very adapter from an earlier batch)."""
        wanted = list({id(row.adapter): row.adapter for row in rows if row.adapter is not None}.values())
        slot_of = {id(held): slot for slot, held in enumerate(self._held) if any(held is adapter for adapter in wanted)}
        free = [slot for slot in range(1, self.max_rows + 1) if slot not in slot_of.values()]
        for adapter in wanted:
            if id(adapter) not in slot_of:
                slot = free.pop(0)
                self.multi.load_slot(slot, adapter.state)
                self._held[slot] = adapter
                slot_of[id(adapter)] = slot
        return [0 if row.adapter is None else slot_of[id(row.adapter)] for row in rows]


class _Tracker(RowEnds):
    """:class:`RowEnds` that also shows each step's new text of every row to ``on_step``."""

    def __init__(self, rows: list[Row], tokenizer, decoding: Decoding, on_step: StepCallback | None):
        super().__init__(tokenizer, decoding, [row.max_tokens for row in rows], [len(row.prompt_ids) for row in rows])
        self.on_step = on_step
        self.shown = [""] * len(rows)
        self.chunks: list[Chunk | None] = [None] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.chunks = [None] * len(self.budgets)
        done = super().__call__(input_ids, scores, **kwargs)
        if self.on_step is not None:
            self.on_step(self.chunks)
        return done

    def on_token(self, row: int, reason: str | None) -> None:
        """The text row ``row`` adds now. Until the row ends, trailing spaces and incomplete
        characters are held back (the final text is stripped, and a byte-level token may
        be half a character)."""
        completion = None
        if reason is None:
            text = self.raw_text(row).strip().rstrip("\ufffd").rstrip()
        else:
            completion = self.completion(row)
            text = completion.text
        if not text.startswith(self.shown[row]):
            self.chunks[row] = Chunk("", completion)
            return
        added, self.shown[row] = text[len(self.shown[row]) :], text
        self.chunks[row] = Chunk(added, completion)


class _RowSampling(LogitsProcessor):
    """Rows with a temperature draw their next token (top-p nucleus); greedy rows are untouched."""

    def __init__(self, rows: list[Row]):
        self.sampled = [(i, row.temperature, row.top_p) for i, row in enumerate(rows) if row.temperature > 0]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for i, temperature, top_p in self.sampled:
            probs = torch.softmax(scores[i].float() / temperature, dim=-1)
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < top_p
            nucleus = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
            token = torch.multinomial(nucleus, 1)
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores
