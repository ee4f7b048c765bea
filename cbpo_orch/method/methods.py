"""The catalogue of personalization methods (METHOD.md §3, §6): each method is data.

Every method runs through the same trainer. A method names the objective its step descends
(``objective``: sft, kto, bco or cbpo, with C-BPO's variant; none: it trains nothing), and
from it follow whether it compares with the reference model π_ref (the preference
objectives; SFT does not, so its π_ref pass is skipped), whether its reference point also
reads mismatched pairs (KTO) and whether it weighs the auxiliary items by a per-user γ
(C-BPO). It also says whether it reads auxiliary items, which reference point it always uses
(BCO: the joint running mean; others: the job's ``--reference``), its recipe (default epochs:
the paper's SFT 2, preference methods 3; default learning rate and β, chosen per method family
on validation users, docs/benchmarks.md), and what its prompts carry before the asked one
(``workers/prompts.py``: nothing, the user's retrieved items for RAG, a summary of the user
for PAG)."""

from __future__ import annotations

from dataclasses import dataclass


PREFERENCE_OBJECTIVES = ("kto", "bco", "cbpo")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    objective: str | None  # sft | kto | bco | cbpo (``method/objectives.py``); None: trains nothing
    cbpo_variant: str = "nonneg"  # C-BPO's risk: nonneg | raw | nnpu (``objectives.cbpo_loss``)
    uses_aux: bool = True
    reference: str | None = None  # the reference point it always uses ("joint"); None: the job's
    default_epochs: int = 3
    default_lr: float = 3e-3
    default_beta: float = 0.1  # the reward scale; read only by the preference methods
    prompt: str = "plain"  # plain | retrieved | summary: what goes before each prompt

    @property
    def trains(self) -> bool:
        return self.objective is not None

    @property
    def uses_reference(self) -> bool:
        """Its objective compares with π_ref (the preference objectives)."""
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def mismatched(self) -> bool:
        """Its reference point reads π_ref on mismatched pairs (KTO)."""
        return self.objective == "kto"

    @property
    def uses_gamma(self) -> bool:
        """Its objective reads the user's γ (C-BPO, METHOD.md §4)."""
        return self.objective == "cbpo"


METHODS: dict[str, MethodSpec] = {
    method.name: method
    for method in (
        MethodSpec("base", "the untouched starting model (base, or base + task adapter)", None, uses_aux=False),
        MethodSpec("rag", "the starting model, each prompt after the user's k most similar earlier items", None, uses_aux=False, prompt="retrieved"),
        MethodSpec("pag", "the starting model, each prompt after its own summary of the user's history", None, uses_aux=False, prompt="summary"),
        MethodSpec("sft", "OPPU: token cross-entropy on the user's own history", "sft", uses_aux=False, default_epochs=2),
        MethodSpec("sft-aux", "ablation: SFT on the user's history plus the auxiliary items", "sft", default_epochs=2),
        MethodSpec("kto", "KTO: desirable = own history, undesirable = auxiliary items", "kto"),
        MethodSpec("bco", "BCO: binary classifier loss, joint running-mean reference point", "bco", reference="joint"),
        MethodSpec("cbpo", "C-BPO, non-negative PU risk (the default)", "cbpo"),
        MethodSpec("cbpo-raw", "C-BPO, unbiased PU risk without the clamp", "cbpo", cbpo_variant="raw"),
        MethodSpec("cbpo-nnpu", "C-BPO with Kiryo et al.'s nnPU step on a negative bracket", "cbpo", cbpo_variant="nnpu"),
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
