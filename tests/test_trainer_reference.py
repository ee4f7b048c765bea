"""The π_ref pass runs once per user trained, for the methods whose objective compares with π_ref
only: SFT never reads it, so it is not computed; a pair is computed once however many users
and calls share it (tiny random-weight model)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.multi_lora import MultiLora, attached_multi_lora
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.trainer import train_adapters
from tests.helpers import LORA, user_work


@pytest.mark.parametrize("method, passes", [("sft", 0), ("sft-aux", 0), ("kto", 1), ("bco", 1), ("cbpo", 1)])
def test_the_reference_pass_runs_only_where_the_objective_reads_it(loaded, monkeypatch, method, passes):  # noqa: F811
    entered = []
    disabled = MultiLora.disabled

    def counted(self):
        entered.append(method)
        return disabled(self)

    monkeypatch.setattr(MultiLora, "disabled", counted)
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    work = [user_work(tokenizer, u, 4, 3, method, pad_id, loaded.model) for u in range(2)]
    for user in work:
        user.validate = None
    config = TrainConfig(method=method, epochs=1, lr=1e-2, batch_size=4, lora=LORA)
    with attached_multi_lora(loaded.model, LORA, len(work)) as multi:
        results = train_adapters(multi, tokenizer, work, config, "cpu")
    assert len(entered) == passes * len(work)
    assert all(r.steps > 0 and r.losses for r in results)
    assert all((r.reference_seconds > 0) == bool(passes) for r in results)  # each user's own pass is timed
    assert all(r.reference_seconds < r.seconds for r in results)


def test_a_pair_shared_by_users_or_by_calls_goes_through_pi_ref_once(loaded):  # noqa: F811
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    config = TrainConfig(method="cbpo", epochs=2, lr=1e-2, batch_size=4, lora=LORA)
    a, b = (user_work(tokenizer, u, 4, 3, "cbpo", pad_id, loaded.model) for u in range(2))
    a.validate = b.validate = None
    b.samples = b.samples[:4] + [replace(s, positive=False) for s in a.samples[:3]]  # a's items are b's aux, as in a job
    distinct = {s.pair for s in a.samples + b.samples}
    memo = ReferenceLogps()
    with attached_multi_lora(loaded.model, LORA, 2) as multi:
        together = train_adapters(multi, tokenizer, [a, b], config, "cpu", reference=memo)
    assert memo.computed == len(distinct) == len(a.samples) + len(b.samples) - 3
    with attached_multi_lora(loaded.model, LORA, 1) as multi:
        [again] = train_adapters(multi, tokenizer, [b], config, "cpu", reference=memo)
    assert memo.computed == len(distinct), "a later call (another method, the next pack) computes nothing seen"
    with attached_multi_lora(loaded.model, LORA, 1) as multi:
        [alone] = train_adapters(multi, tokenizer, [b], config, "cpu")
    for result in (together[1], again):
        assert result.losses == pytest.approx(alone.losses, rel=1e-5, abs=1e-6)
