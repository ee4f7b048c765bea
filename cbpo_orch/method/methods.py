"""The catalogue of personalization methods (METHOD.md §3, §6).

Every method runs through the same trainer; a method only decides whether it trains,
whether it reads auxiliary items, whether its objective compares with the reference model
π_ref (the preference methods; SFT does not, so its π_ref pass is skipped), which objective
its step descends, its recipe (default epochs: the paper's SFT 2, preference methods 3;
default learning rate and β, chosen per method family on validation users, docs/benchmarks.md),
whether its reference point also reads mismatched pairs (KTO), whether its
objective weighs the auxiliary items by a per-user γ (C-BPO), and what its prompts carry
before the asked one (``workers/prompts.py``: nothing, the user's retrieved items for RAG, a
summary of the user for PAG).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    trains: bool = True
    uses_aux: bool = True
    uses_reference: bool = True
    default_epochs: int = 3
    default_lr: float = 3e-3
    default_beta: float = 0.1  # the reward scale; read only by the preference methods
    mismatched: bool = False  # its reference point reads π_ref on mismatched pairs (KTO)
    uses_gamma: bool = False  # its objective reads the user's γ (C-BPO, METHOD.md §4)
    prompt: str = "plain"  # plain | retrieved | summary: what goes before each prompt


METHODS: dict[str, MethodSpec] = {
    method.name: method
    for method in (
        MethodSpec("base", "the untouched starting model (base, or base + task adapter)", trains=False, uses_aux=False, uses_reference=False),
        MethodSpec("rag", "the starting model, each prompt after the user's k most similar earlier items", trains=False, uses_aux=False, uses_reference=False, prompt="retrieved"),
        MethodSpec("pag", "the starting model, each prompt after its own summary of the user's history", trains=False, uses_aux=False, uses_reference=False, prompt="summary"),
        MethodSpec("sft", "OPPU: token cross-entropy on the user's own history", uses_aux=False, uses_reference=False, default_epochs=2),
        MethodSpec("sft-aux", "ablation: SFT on the user's history plus the auxiliary items", uses_reference=False, default_epochs=2),
        MethodSpec("kto", "KTO: desirable = own history, undesirable = auxiliary items", mismatched=True),
        MethodSpec("bco", "BCO: binary classifier loss, joint running-mean reference point"),
        MethodSpec("cbpo", "C-BPO, non-negative PU risk (the default)", uses_gamma=True),
        MethodSpec("cbpo-raw", "C-BPO, unbiased PU risk without the clamp", uses_gamma=True),
        MethodSpec("cbpo-nnpu", "C-BPO with Kiryo et al.'s nnPU step on a negative bracket", uses_gamma=True),
    )
}

METHOD_CHOICES = "; ".join(f"{method.name}: {method.summary}" for method in METHODS.values())
"""Every method with its summary, for help texts."""


class UnknownMethod(ValueError):
    """A method name that is not in the catalogue."""


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def mismatched_pairs(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """KTO's mismatched (x, y′) pairs of a user's training pairs (METHOD.md §3): each prompt
    with the next pair's completion, cyclically."""
    n = len(pairs)
    return [(pairs[i][0], pairs[(i + 1) % n][1]) for i in range(n)]
