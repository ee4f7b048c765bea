"""Many users' LoRA adapters on one frozen base model, trained in one forward/backward.

peft refuses batches that mix adapters while training, so the adapters are held here as
stacked tensors: every target linear layer gets ``lora_A`` [N, r, in] and ``lora_B``
[N, out, r], one slice per *slot*, and each batch row is routed to the slot of the user
it belongs to. A row's output depends only on the base weights and its own slot, so a
user trained in a slot is exactly as independent as one trained alone.

Conventions (all as peft's ``LoraConfig`` + ``get_peft_model`` for one adapter does):

- targets: a module whose name equals, or ends with ``"." +``, an entry of
  ``LoraSettings.target_modules``; each must be an ``nn.Linear``;
- the adapter tensors are fp32 over an fp16/bf16 base (peft's ``autocast_adapter_dtype``)
  and in the base dtype otherwise; the layer input is cast to that dtype, dropout is
  applied to the LoRA input path only, the delta ``B(A(x)) · alpha / r`` is added to the
  base output and the sum cast back to the base output's dtype;
- a fresh slot gets the A that peft draws for one adapter right after
  ``torch.manual_seed(seed)``, and B = 0 (:func:`peft_initial_a`);
- a slot exports as a stock peft adapter folder (:meth:`MultiLora.export_slot`).

Dropout masks are drawn from torch's global RNG over the packed batch, so with dropout > 0
a packed user sees different (equally distributed) masks than one trained alone.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from cbpo_orch.method.config import LoraSettings

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY_PREFIX = "base_model.model."
"""peft's state-dict keys are ``base_model.model.<module name>.lora_{A,B}.weight``."""


def peft_key(layer: str, part: str) -> str:
    """The name peft saves a LoRA layer's ``A`` or ``B`` weight under."""
    return f"{PEFT_KEY_PREFIX}{layer}.lora_{part}.weight"


def is_target(name: str, target_modules: tuple[str, ...]) -> bool:
    """Whether module ``name`` is a LoRA target (peft's rule for a list of names)."""
    return any(name == target or name.endswith("." + target) for target in target_modules)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype peft gives an adapter over a base of ``base_dtype``: fp32 for narrower floats."""
    return torch.float32 if base_dtype.itemsize < 4 else base_dtype


def peft_initial_a(shapes: list[tuple[int, int, int]], seed: int) -> list[Tensor]:
    """The A matrices peft draws for one fresh adapter right after ``torch.manual_seed(seed)``.

    ``shapes`` holds (r, in_features, out_features) per target module in
    ``model.named_modules()`` order, the order peft creates them in. For each module peft
    builds ``nn.Linear(in, r)`` (a kaiming-uniform draw for A), then ``nn.Linear(r, out)``
    (a draw for B, overwritten with zeros) and then redraws A in
    ``reset_lora_parameters``; all three draws come from the CPU generator, whatever the
    device. The draws here use a private generator, so torch's global RNG is untouched.
    """
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for r, in_features, out_features in shapes:
        a, b = torch.empty(r, in_features), torch.empty(out_features, r)
        for tensor in (a, b, a):
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        draws.append(a)
    return draws


class _Routing:
    """What every wrapped layer reads at forward time: each row's slot (or one slot for
    every row), and whether LoRA is on."""

    def __init__(self) -> None:
        self.slots: Tensor | int | None = None
        self.enabled = True


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA adapter per slot, applied row by row."""

    def __init__(self, base_layer: nn.Linear, n_slots: int, lora: LoraSettings, routing: _Routing):
        super().__init__()
        self.base_layer = base_layer
        self.routing = routing
        self.scaling = lora.alpha / lora.r
        self.dropout = nn.Dropout(lora.dropout) if lora.dropout > 0 else nn.Identity()
        weight = base_layer.weight
        like = {"dtype": adapter_dtype(weight.dtype), "device": weight.device}
        self.lora_A = nn.Parameter(torch.zeros(n_slots, lora.r, base_layer.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(n_slots, base_layer.out_features, lora.r, **like))

    def forward(self, x: Tensor) -> Tensor:
        result = self.base_layer(x)
        if not self.routing.enabled:
            return result
        slots = self.routing.slots
        if slots is None:
            raise RuntimeError("no row routing set: run the forward inside MultiLora.routed(slots) or .only(slot)")
        if isinstance(slots, int):
            h = self.dropout(x.to(self.lora_A.dtype))
            delta = (h @ self.lora_A[slots].T) @ self.lora_B[slots].T * self.scaling
            return (result + delta).to(result.dtype)
        if slots.shape[0] != x.shape[0]:
            raise ValueError(f"routing holds {slots.shape[0]} rows but the batch has {x.shape[0]}")
        h = self.dropout(x.to(self.lora_A.dtype)).reshape(x.shape[0], -1, x.shape[-1])
        down = torch.bmm(h, self.lora_A[slots].transpose(1, 2))
        delta = torch.bmm(down, self.lora_B[slots].transpose(1, 2)) * self.scaling
        return (result + delta.reshape(*result.shape[:-1], -1)).to(result.dtype)


class MultiLora:
    """``n_slots`` LoRA adapters on ``model``'s target layers; the base weights are frozen.

    The model is changed in place (its target layers are wrapped) until :meth:`unload`.
    Run a forward of ``model`` inside :meth:`routed` to say which slot each row uses, or
    inside :meth:`disabled` for the base model alone (π_ref). Slots start at A = B = 0
    (the base model); :meth:`init_slot` gives one a fresh adapter.
    """

    def __init__(self, model: nn.Module, lora: LoraSettings, n_slots: int):
        if n_slots < 1:
            raise ValueError("n_slots must be ≥ 1")
        self.model, self.lora, self.n_slots = model, lora, n_slots
        self._routing = _Routing()
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        self.layers: dict[str, MultiLoraLinear] = {}
        for name, module in list(model.named_modules()):
            if not is_target(name, lora.target_modules):
                continue
            if not isinstance(module, nn.Linear):
                raise TypeError(f"LoRA target {name!r} is a {type(module).__name__}, not an nn.Linear")
            layer = MultiLoraLinear(module, n_slots, lora, self._routing)
            _set_submodule(model, name, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no module of the model matches the LoRA targets {list(lora.target_modules)}")

    def parameters(self) -> list[nn.Parameter]:
        """The stacked adapter tensors, A then B of each layer in module order (peft's order)."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    @contextmanager
    def routed(self, slots: Tensor) -> Iterator[nn.Module]:
        """Forwards of the model in this block route row ``i`` to slot ``slots[i]``.

        Under :meth:`checkpointed` a layer's recomputation in the backward is routed as its
        forward was, wherever the backward is called."""
        if slots.dim() != 1 or slots.dtype != torch.long:
            raise ValueError("slots must be a 1-D LongTensor with one slot per batch row")
        if slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < self.n_slots:
            raise ValueError(f"slots must lie in 0..{self.n_slots - 1}")
        with self._routing_set(slots=slots):
            yield self.model

    @contextmanager
    def only(self, slot: int) -> Iterator[nn.Module]:
        """Forwards of the model in this block use ``slot`` for every row, whatever the batch
        size (one user's generation or held-out scoring)."""
        if not 0 <= slot < self.n_slots:
            raise ValueError(f"slot must lie in 0..{self.n_slots - 1}")
        with self._routing_set(slots=int(slot)):
            yield self.model

    @contextmanager
    def disabled(self) -> Iterator[nn.Module]:
        """Forwards of the model in this block use the base weights alone (like peft's ``disable_adapter``)."""
        with self._routing_set(enabled=False):
            yield self.model

    @contextmanager
    def _routing_set(self, **values) -> Iterator[None]:
        """The routing's fields (``slots``, ``enabled``) set to ``values`` inside the block,
        restored after it."""
        previous = {field: getattr(self._routing, field) for field in values}
        for field, value in values.items():
            setattr(self._routing, field, value)
        try:
            yield
        finally:
            for field, value in previous.items():
                setattr(self._routing, field, value)

    @contextmanager
    def checkpointed(self, on: bool = True) -> Iterator[nn.Module]:
        """With ``on``, training forwards in this block keep only each decoder layer's input
        and run the layer again in the backward (transformers' activation checkpointing,
        non-reentrant): a layer's activations then live from its recomputation to its
        backward, not from the forward to the end of the backward.

        The recomputation reads the routing (each row's slot, LoRA on or off) that was set
        when the layer ran forward, not whatever is set when the backward runs: a pass's
        backward may come after its ``routed`` block has closed (``trainer.backward_by_rows``)
        and must still reach each row's own slot. Non-reentrant checkpointing needs no input
        that requires grad, so transformers' hook that makes the embeddings' output require
        it is removed: left on, a backward would also differentiate the frozen layers down to
        the embeddings, and any later forward with grad enabled would build a graph."""
        if not on:
            yield self.model
            return
        self.model.activation_checkpointing_enable({"use_reentrant": False, "context_fn": self._routing_replay})
        self.model.disable_input_require_grads()
        try:
            yield self.model
        finally:
            self.model.activation_checkpointing_disable()

    def _routing_replay(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """``torch.utils.checkpoint``'s context pair for one checkpointed layer: nothing in
        the forward, the forward's routing restored around the recomputation."""
        return nullcontext(), self._routing_set(slots=self._routing.slots, enabled=self._routing.enabled)

    @torch.no_grad()
    def init_slot(self, slot: int, seed: int) -> None:
        """Give ``slot`` the fresh adapter peft creates after ``torch.manual_seed(seed)``:
        peft's A (rounded through the base dtype, as peft's cast to it and back does), B = 0."""
        shapes = [(self.lora.r, layer.base_layer.in_features, layer.base_layer.out_features) for layer in self.layers.values()]
        for layer, a in zip(self.layers.values(), peft_initial_a(shapes, seed)):
            base_dtype = layer.base_layer.weight.dtype
            layer.lora_A[slot].copy_(a.to(base_dtype).to(layer.lora_A.dtype))
            layer.lora_B[slot].zero_()

    @torch.no_grad()
    def reset_slot(self, slot: int, seed: int) -> None:
        """Refill ``slot`` for the next user mid-run: :meth:`init_slot`, and any gradient the
        slot still holds from its previous user is cleared."""
        self.init_slot(slot, seed)
        for param in self.parameters():
            if param.grad is not None:
                param.grad[slot] = 0

    def slot_state(self, slot: int) -> dict[str, Tensor]:
        """``slot``'s adapter as peft's saved state dict: its key names, copies of the values."""
        state = {}
        for name, layer in self.layers.items():
            state[peft_key(name, "A")] = layer.lora_A[slot].detach().clone()
            state[peft_key(name, "B")] = layer.lora_B[slot].detach().clone()
        return state

    @torch.no_grad()
    def load_slot(self, slot: int, state: dict[str, Tensor]) -> None:
        """Put a saved adapter (peft's state dict, as :meth:`slot_state` gives it) into ``slot``;
        ValueError unless it holds exactly this layout's tensors, in their shapes."""
        expected = {peft_key(name, part) for name in self.layers for part in "AB"}
        if set(state) != expected:
            missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"the adapter does not fit these LoRA layers: missing {missing[:3]}, unknown {unknown[:3]}")
        for name, layer in self.layers.items():
            for part, stacked in (("A", layer.lora_A), ("B", layer.lora_B)):
                value = state[peft_key(name, part)]
                if value.shape != stacked.shape[1:]:
                    raise ValueError(f"{name}.lora_{part} is {tuple(value.shape)} in the adapter but {tuple(stacked.shape[1:])} here")
                stacked[slot].copy_(value)

    def export_slot(self, slot: int) -> dict[str, bytes]:
        """``slot``'s adapter as the files of a stock peft adapter folder (``adapter_config.json``
        and ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``."""
        weights = {key: value.cpu().contiguous() for key, value in self.slot_state(slot).items()}
        return {ADAPTER_CONFIG: self._config_bytes(), ADAPTER_WEIGHTS: safetensors_bytes(weights, metadata={"format": "pt"})}

    def _config_bytes(self) -> bytes:
        """The adapter config as peft writes it on ``save_pretrained`` (inference mode on)."""
        config = LoraConfig(
            r=self.lora.r,
            lora_alpha=self.lora.alpha,
            lora_dropout=self.lora.dropout,
            target_modules=list(self.lora.target_modules),
            task_type="CAUSAL_LM",
            base_model_name_or_path=getattr(self.model, "name_or_path", None) or None,
            inference_mode=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)
            return (Path(tmp) / ADAPTER_CONFIG).read_bytes()

    def unload(self) -> nn.Module:
        """Put the original layers and trainability back; the model is the base model again."""
        for name, layer in self.layers.items():
            _set_submodule(self.model, name, layer.base_layer)
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._requires_grad[name])
        self.layers = {}
        return self.model


@contextmanager
def attached_multi_lora(model: nn.Module, lora: LoraSettings, n_slots: int) -> Iterator[MultiLora]:
    """``n_slots`` adapters on ``model`` for the duration of the block; the base model comes
    back untouched afterwards, so one loaded model serves user after user."""
    multi = MultiLora(model, lora, n_slots)
    try:
        yield multi
    finally:
        multi.unload()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
