"""Quality benchmark: C-BPO against SFT (OPPU), BCO, KTO and the ablations, on real users.

Every arm runs through `cbpo-orch submit`, so the benchmark exercises the product.
Arms that share training options share one job (the same users, the same auxiliary
samples); each ablation that changes an option is its own job. Jobs are remembered in a
state file per (data, model), so an interrupted benchmark resumes instead of starting over,
and reports that share runs (another --name, more --seeds) train them once. Every finished
run's scores are filed in a ledger committed beside the results (DATA-MODEL.run.runs.json),
with the task adapters the runs started from (results/task-adapters/), so that a later
session, on a machine whose bench/.home is empty, trains only the runs the ledger lacks.

    # 1. tune on validation users (--validation of them, drawn at random among users no larger
    #    than the reported ones' 90th percentile of history size), never reported
    python bench/quality.py tune --task commit-subject --data ../shared/data/numpy-commit-subject \
        --model ../shared/models/commit-lm-17m --validation 5 --grid lr=1e-4,1e-3 --grid beta=0.1,1.0
    # 2. report every arm on the remaining users with the chosen options
    python bench/quality.py run --task commit-subject --data ../shared/data/numpy-commit-subject \
        --model ../shared/models/commit-lm-17m --validation 5 --set lr=1e-3 --set beta=0.1
    # 3. the same tables from the runs finished so far (while 2 runs, or after it was
    #    stopped): the same arguments with `report`; it starts and resumes nothing
    python bench/quality.py report --task commit-subject ...
    #    (`report` with tune's arguments, --grid included, files and prints the tune's rows)

The protocol is one for every arm: each user is scored on the split's queries and on its
--eval-items newest history items (never trained on; default 8), its score the mean over
them; the spec's epochs per method family (no selection unless an arm asks for it); the same
decoding (the task's stop and repetition guard). --min-items keeps users with at least that
many history items.

Outputs under bench/results/: NAME.json (per-user ROUGE and γ per arm, means, paired
bootstrap 95% CIs of arm − sft and arm − base, optimizer steps and the share of outputs that
ran to the token budget per arm, and the "protocol"), NAME.md (the table) and NAME.png (bars
with CIs; γ vs gain). With several --seeds, each (user, arm) scores the mean over seeds, and
the CIs are over users.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import random
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.training.evaluation import paired_bootstrap_ci

HERE = Path(__file__).parent
CLI = [sys.executable, "-m", "cbpo_orch"]
TASK_ADAPTERS = HERE / "results" / "task-adapters"
TASK_ADAPTER_KEY = re.compile(r"[0-9a-f]{24}")  # the driver's task_adapter_key: a staging folder never matches

# arm name -> (method, extra training options)
ARMS: dict[str, tuple[str, dict[str, str]]] = {
    "base": ("base", {}),
    "sft": ("sft", {}),
    "kto": ("kto", {}),
    "bco": ("bco", {}),
    "cbpo": ("cbpo", {}),
    "sft-aux": ("sft-aux", {}),
    "cbpo-gamma0": ("cbpo", {"gamma": "0"}),
    "cbpo-joint-reference": ("cbpo", {"reference": "joint"}),
    "cbpo-gamma0.2": ("cbpo", {"gamma": "0.2"}),
    "cbpo-gamma0.5": ("cbpo", {"gamma": "0.5"}),
    "cbpo-gamma0.8": ("cbpo", {"gamma": "0.8"}),
    "cbpo-nearest": ("cbpo", {"aux_strategy": "nearest"}),
    "cbpo-farthest": ("cbpo", {"aux_strategy": "farthest"}),
    "cbpo-resample": ("cbpo", {"aux_resample": "on"}),
    "cbpo-selection": ("cbpo", {"selection": "on"}),
    "sft-selection": ("sft", {"selection": "on"}),
    "rag": ("rag", {}),
    "pag": ("pag", {}),
    "sft-retrieve": ("sft", {"retrieve": "4"}),
    "cbpo-retrieve": ("cbpo", {"retrieve": "4"}),
}
EVALUATION_KEYS = ("steps", "hit_budget", "n_scored")  # a run's extra.evaluation the report reads
COST_KEYS = ("seconds",)  # a run's cost the report reads: its seconds, every phase (a results row's)
VALIDATION_SEED = 0


def parse_pairs(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"expected KEY=VALUE, got {item!r}")
        pairs[key.strip().replace("-", "_")] = value.strip()
    return pairs


def seed_list(text: str) -> list[int]:
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cli_flags(options: dict[str, str]) -> list[str]:
    """``--key value`` per option; a switch's value ``on`` / ``off`` gives ``--key`` / ``--no-key``."""
    flags = []
    for key, value in sorted(options.items()):
        name = key.replace("_", "-")
        flags += {"on": [f"--{name}"], "off": [f"--no-{name}"]}.get(value, [f"--{name}", value])
    return flags


def split_users(args) -> tuple[list[str], list[str]]:
    """(validation users, reported users) among the users with at least --min-items history
    items: --validation of them drawn at random (a fixed seed) among those no larger than the
    90th percentile of history size, so that tuning sees users like the reported ones and
    never the largest; the others are reported (at most --users, in file order)."""
    sizes = {u: len(user.profile) for u, user in load_split(args.data, args.split, load_task(args.task)).users.items()}
    return draw_validation(sizes, args.validation, args.min_items, args.users)


def draw_validation(sizes: dict[str, int], n: int, min_items: int = 0, n_report: int | None = None) -> tuple[list[str], list[str]]:
    """``split_users`` over users' history sizes (in file order)."""
    users = [u for u, size in sizes.items() if size >= min_items]
    if not users:
        raise SystemExit(f"no user has at least {min_items} history items")
    ordered = sorted(sizes[u] for u in users)
    cap = ordered[min(len(ordered) - 1, math.floor(0.9 * len(ordered)))]
    candidates = [u for u in users if sizes[u] <= cap]
    validation = random.Random(VALIDATION_SEED).sample(candidates, min(n, len(candidates)))
    report = [u for u in users if u not in validation]
    return validation, report[:n_report] if n_report else report


class Ledger:
    """Every finished run of a (data, model), committed as ``results/DATA-MODEL.run.runs.json``.

    A session's ``bench/.home`` (registry and adapters) ends with its machine; the ledger
    does not. A later session reads the scores of the runs it holds and trains only the
    others, so a report grows across sessions by users, arms and seeds. Runs are filed by
    group (the job options, seed, split and task adapter) and ``method/user``, each with the
    scores a report uses and the job that made it.
    """

    def __init__(self, path: Path):
        self.path = path
        self.groups: dict[str, dict[str, dict]] = json.loads(path.read_text()) if path.exists() else {}

    def scores(self, key: str) -> dict[tuple[str, str], dict]:
        """(user, method) → scores of the runs filed under group ``key``."""
        return {tuple(reversed(run.split("/", 1))): entry["scores"] for run, entry in self.groups.get(key, {}).items()}

    def file(self, key: str, job: str, rows: list[dict]) -> None:
        """File the finished runs ``rows`` of ``job`` (``results`` rows) that are not filed yet;
        the scores are read now, while the run's adapter folder is on this machine."""
        group = self.groups.setdefault(key, {})
        added = False
        for row in rows:
            run = f"{row['method']}/{row['user_id']}"
            if run not in group:
                scores = {"rouge1": row["rouge1"], "rougeL": row["rougeL"], "gamma": row["gamma"], **trainer_state(row["adapter_path"]),
                          **{k: row[k] for k in (*EVALUATION_KEYS, *COST_KEYS) if row.get(k) is not None}}
                group[run] = {"job": job, "scores": scores}
                added = True
        if added:
            self._write()

    def _write(self) -> None:
        """Merge this process's runs into the file as it is now, under a lock: two benchmarks
        of one (data, model) running at once (a tune beside a run) each keep the other's runs."""
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text()) if self.path.exists() else {}
            for key, runs in self.groups.items():
                on_disk.setdefault(key, {}).update(runs)
            self.groups = {k: dict(sorted(v.items())) for k, v in sorted(on_disk.items())}
            self.path.write_text(json.dumps(self.groups, indent=1) + "\n")


def pin_task_adapters(home: Path, committed: Path) -> None:
    """Keep the task adapters that runs started from in ``committed`` (a few MB each).

    The driver adopts a task adapter folder it finds at its key in the home's artifacts,
    so a fresh home given the committed ones starts every run from the same model as the
    ledger's runs did, instead of training another. Folders new in the home are committed;
    a home whose task adapter differs from the committed one at the same key cannot join the
    ledger's runs and stops the benchmark."""
    local = home / "artifacts" / "task-adapters"
    for source, target in ((committed, local), (local, committed)):
        for folder in sorted(source.glob("*")):
            if not (TASK_ADAPTER_KEY.fullmatch(folder.name) and folder.is_dir()):
                continue
            twin = target / folder.name
            if not twin.exists():
                shutil.copytree(folder, twin)
            elif directory_sha256(twin) != directory_sha256(folder):
                raise SystemExit(f"the task adapter {local / folder.name} differs from the committed {committed / folder.name}: "
                                 "its runs started from another model than the ledger's; use another --home")


def missing_runs(users: list[str], methods: list[str], covered: set[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    """The (user, method) runs not in ``covered``, as jobs of (users, methods): methods that
    lack the same users share one job (the same auxiliary samples), and no job asks for a run
    that is covered (a job is the cross product of its users and methods)."""
    jobs: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for method in methods:
        lacking = tuple(u for u in users if (u, method) not in covered)
        if lacking:
            jobs[lacking].append(method)
    return [(list(lacking), grouped) for lacking, grouped in jobs.items()]


class Jobs:
    """Submits (or resumes) the jobs of each group of arms, remembers their ids and files
    their finished runs in the ledger.

    A group's state is a list of {job, users, methods}: asking for (user, method) runs that
    neither the ledger nor a job of the group covers submits one more job for just those,
    so a report grows by users or arms without rerunning what it has.
    """

    def __init__(self, args, state_file: Path, ledger: Ledger):
        self.args = args
        self.state_file = state_file
        self.state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.ledger = ledger

    def key(self, options: dict[str, str], seed: int) -> str:
        return json.dumps({"options": options, "seed": seed, "split": self.args.split, "task_adapter": self.args.task_adapter}, sort_keys=True)

    def scores(self, methods: list[str], users: list[str], options: dict[str, str], seed: int, submit: bool) -> dict[tuple[str, str], dict]:
        """(user, method) → scores of every finished run of the group, the ledger's and this
        home's jobs' (filed in the ledger now); with ``submit``, the missing runs are trained
        first (unfinished jobs resumed, one new job for the rest)."""
        key = self.key(options, seed)
        entries = self.state.setdefault(key, [])
        if submit:
            self._train(key, entries, methods, users, options, seed)
            pin_task_adapters(self.args.home, TASK_ADAPTERS)
        for entry in entries:
            self.ledger.file(key, entry["job"], self.results(entry["job"]))
        return self.ledger.scores(key)

    def _train(self, key: str, entries: list[dict], methods: list[str], users: list[str], options: dict[str, str], seed: int) -> None:
        common = ["--home", str(self.args.home), "--workers", str(self.args.workers)]
        live = []
        for entry in entries:
            status = json.loads(subprocess.run(CLI + ["status", entry["job"], "--json", "--home", str(self.args.home)], capture_output=True, text=True, check=True).stdout)[0]
            if status["state"] == "cancelled":  # its finished runs count; the others go to a new job
                self.ledger.file(key, entry["job"], self.results(entry["job"]))
                continue
            live.append(entry)
            if status["state"] != "succeeded":
                print(f"[{key}] resuming job {entry['job']}", flush=True)
                subprocess.run(CLI + ["resume", entry["job"], *common], stdout=subprocess.DEVNULL)
        covered = {(u, m) for entry in live for u in entry["users"] for m in entry["methods"]} | set(self.ledger.scores(key))
        for new_users, new_methods in missing_runs(users, methods, covered):
            command = CLI + [
                "submit", "--task", self.args.task, "--data", str(self.args.data), "--model", str(self.args.model),
                "--split", self.args.split, "--users", ",".join(new_users), "--method", ",".join(new_methods),
                "--task-adapter", self.args.task_adapter, "--seed", str(seed), *common, *cli_flags(options),
            ]
            print(f"[{key}] {' '.join(command[2:])}", flush=True)
            process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            entries.append({"job": process.stdout.readline().strip(), "users": new_users, "methods": new_methods})
            self.state_file.write_text(json.dumps(self.state, indent=2))
            process.communicate()

    def results(self, job: str) -> list[dict]:
        """The job's finished runs (``cbpo-orch results``), whether or not the job is done, each
        with its optimizer steps, outputs that ran to the budget and items scored (the run's
        ``extra.evaluation``)."""
        from cbpo_orch.orchestrator.workspace import Workspace

        out = subprocess.run(CLI + ["results", job, "--format", "json", "--home", str(self.args.home)], capture_output=True, text=True, check=True)
        extras = Workspace.open(self.args.home).registry.extras(job)
        return [{**row, **extras.get((row["user_id"], row["method"]), {}).get("evaluation", {})} for row in json.loads(out.stdout)]


def run_arms(jobs: Jobs, arms: dict[str, tuple[str, dict[str, str]]], users: list[str], shared: dict[str, str], seed: int, submit: bool = True) -> dict[str, dict[str, dict]]:
    """Per arm, per user: {rouge1, rougeL, gamma, …} of one seed; with ``submit`` off, only
    the runs that have finished so far (nothing is started)."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    options_of: dict[str, dict[str, str]] = {}
    for arm, (method, extra) in arms.items():
        options = {**shared, **extra}
        key = json.dumps(options, sort_keys=True)
        groups[key].append((arm, method))
        options_of[key] = options
    per_arm: dict[str, dict[str, dict]] = {}
    for key, members in groups.items():
        found = jobs.scores([method for _, method in members], users, options_of[key], seed, submit)
        for arm, method in members:
            per_arm[arm] = {user: found[user, method] for user in users if (user, method) in found}
    return per_arm


def tune_rows(jobs: Jobs, grid: dict[str, str], shared: dict[str, str], methods: list[str], users: list[str], seeds: list[int], submit: bool = True) -> list[dict]:
    """One row per (grid point, method): its mean ROUGE over the validation users, each user's
    score its mean over the seeds. With ``submit`` off only finished runs count, and a point
    that lacks a user is printed as partial and left out of the rows (a mean over fewer users
    is not comparable)."""
    rows = []
    for values in itertools.product(*(v.split(",") for v in grid.values())):
        options = {**shared, **dict(zip(grid, values))}
        arms = {m: (m, options) for m in methods}
        per_arm = average_seeds({seed: run_arms(jobs, arms, users, {}, seed, submit) for seed in seeds})
        for method in methods:
            scores = per_arm.get(method, {})
            if len(scores) < len(users):
                print(f"{method:6s} {options}  partial: {len(scores)} of {len(users)} users finished", flush=True)
                continue
            mean = {m: sum(s[m] for s in scores.values()) / len(scores) for m in ("rouge1", "rougeL")}
            rows.append({"options": options, "method": method, **mean})
            print(f"{method:6s} {options}  R-1 {mean['rouge1']:.4f}  R-L {mean['rougeL']:.4f}", flush=True)
    return rows


def trainer_state(adapter_path: str | None) -> dict[str, float]:
    """What the run's ``trainer_state.json`` kept: the epoch selection chose (0 = the
    starting model), and the final EMA reward means m₊ (own items), m_U (aux) and δ.

    Rewards are β·log(π_θ/π_ref); m₊ − m_U is how far training pushed the user's own
    items above the auxiliary ones, m_U how far it pushed shared text down.
    """
    state_file = Path(adapter_path or "") / "trainer_state.json"
    if not adapter_path or not state_file.exists():
        return {}
    saved = json.loads(state_file.read_text())
    kept = {} if saved.get("selected_epoch") is None else {"selected_epoch": saved["selected_epoch"]}
    state = saved.get("reference_state") or {}
    if state.get("kind") != "ema" or not (state["init_pos"][0] and state["init_aux"][0]):
        return kept
    m_pos, m_aux = state["m_pos"][0], state["m_aux"][0]
    return {**kept, "m_pos": m_pos, "m_aux": m_aux, "delta": (m_pos + m_aux) / 2}


def average_seeds(per_seed: dict[int, dict[str, dict[str, dict]]]) -> dict[str, dict[str, dict]]:
    """Per arm, per user: the mean over seeds of every score that each seed has for that user."""
    first, *rest = per_seed.values()
    averaged: dict[str, dict[str, dict]] = {}
    for arm, scores in first.items():
        averaged[arm] = {}
        for user in scores:
            runs = [scores[user]] + [other[arm][user] for other in rest if user in other.get(arm, {})]
            if len(runs) == len(per_seed):
                keys = [k for k in runs[0] if all(k in run and run[k] is not None for run in runs)]
                averaged[arm][user] = {k: sum(run[k] for run in runs) / len(runs) for k in keys}
    return averaged


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation; None where it is undefined (a constant input)."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(a, b).statistic)
    return None if math.isnan(rho) else rho


def summarize(per_seed: dict[int, dict[str, dict[str, dict]]], users: list[str]) -> dict:
    per_arm = average_seeds(per_seed)
    complete = [u for u in users if all(u in scores for scores in per_arm.values())]
    arms = {}
    for arm, scores in per_arm.items():
        entry = {
            metric: sum(scores[u][metric] for u in complete) / len(complete) for metric in ("rouge1", "rougeL")
        }
        for baseline in ("sft", "base"):
            if baseline in per_arm:
                entry[f"ci_vs_{baseline}"] = {
                    metric: list(paired_bootstrap_ci([scores[u][metric] for u in complete], [per_arm[baseline][u][metric] for u in complete])[1:])
                    for metric in ("rouge1", "rougeL")
                }
        for key, name in (("steps", "steps_mean"), ("n_scored", "items_mean"), ("seconds", "seconds_mean")):
            if all(key in scores[u] for u in complete):
                entry[name] = sum(scores[u][key] for u in complete) / len(complete)
        if all("hit_budget" in scores[u] and scores[u].get("n_scored") for u in complete):
            entry["hit_budget_share"] = sum(scores[u]["hit_budget"] for u in complete) / sum(scores[u]["n_scored"] for u in complete)
        entry["per_seed"] = {
            seed: {metric: sum(runs[arm][u][metric] for u in complete) / len(complete) for metric in ("rouge1", "rougeL")}
            for seed, runs in per_seed.items()
        }
        entry["per_user"] = {u: scores[u] for u in complete}
        for key in ("m_pos", "m_aux", "delta"):
            if all(key in scores[u] for u in complete):
                entry[key] = sum(scores[u][key] for u in complete) / len(complete)
        selected = [scores[u]["selected_epoch"] for u in complete if "selected_epoch" in scores[u]]
        if selected:
            entry["selected_start_share"] = sum(epoch == 0 for epoch in selected) / len(selected)
        if "base" in per_arm:
            entry["users_below_base"] = sum(scores[u]["rouge1"] < per_arm["base"][u]["rouge1"] for u in complete)
        arms[arm] = entry
    summary = {"users": complete, "seeds": list(per_seed), "arms": arms}
    if "cbpo" in arms and len(complete) > 2:
        gammas = [arms["cbpo"]["per_user"][u]["gamma"] for u in complete]
        gains = [arms["cbpo"]["per_user"][u]["rougeL"] - arms["sft"]["per_user"][u]["rougeL"] for u in complete]
        summary["gamma_vs_gain"] = spearman(gammas, gains)
    return summary


def items_per_user(arms: dict) -> float | None:
    """The mean number of items a user was scored on (the same for every arm that reports it)."""
    return next((entry["items_mean"] for entry in arms.values() if "items_mean" in entry), None)


def _delta(entry: dict, other: dict | None, key: str, metric: str) -> str:
    """``arm − other`` of ``metric`` with its paired bootstrap 95% CI, or — for the baseline itself."""
    if other is None or key not in entry or entry is other:
        return "—"
    lo, hi = entry[key][metric]
    return f"{entry[metric] - other[metric]:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def markdown(summary: dict, title: str) -> str:
    seeds = summary["seeds"]
    seeds_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (each user's score is its mean over seeds)"
    arms = summary["arms"]
    items = items_per_user(arms)
    items_text = f"{items:.1f} scored items per user (queries and evaluation items); " if items is not None else ""
    lines = [f"### {title}", "", f"{len(summary['users'])} users; {items_text}{seeds_text}; mean ROUGE-1 / ROUGE-L; Δ vs sft and vs base with "
             "paired bootstrap 95% CIs over users; optimizer steps per user; seconds per user (every phase of its run: the cost, "
             "comparable between arms run on the same machine); share of outputs that ran to the token budget; "
             "for EMA-reference arms, the final mean rewards m₊ (own items) and m_U (aux); users whose ROUGE-1 is below base's; "
             "for arms with selection, the share of users for whom it kept the starting model", "",
             "| arm | ROUGE-1 | ROUGE-L | Δ R-1 vs sft [95% CI] | Δ R-1 vs base [95% CI] | Δ R-L vs sft [95% CI] | steps | s / user | at budget | m₊ / m_U | users < base | kept start |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sft, base = arms["sft"], arms.get("base")
    for arm, entry in arms.items():
        rewards = f"{entry['m_pos']:+.2f} / {entry['m_aux']:+.2f}" if "m_pos" in entry else ""
        below = f"{entry['users_below_base']}" if "users_below_base" in entry else ""
        steps = f"{entry['steps_mean']:.0f}" if "steps_mean" in entry else ""
        seconds = f"{entry['seconds_mean']:.1f}" if "seconds_mean" in entry else ""
        budget = f"{entry['hit_budget_share']:.0%}" if "hit_budget_share" in entry else ""
        start = f"{entry['selected_start_share']:.0%}" if "selected_start_share" in entry else ""
        lines.append(f"| {arm} | {entry['rouge1']:.4f} | {entry['rougeL']:.4f} | {_delta(entry, sft, 'ci_vs_sft', 'rouge1')} | "
                     f"{_delta(entry, base, 'ci_vs_base', 'rouge1')} | {_delta(entry, sft, 'ci_vs_sft', 'rougeL')} | {steps} | {seconds} | {budget} | {rewards} | {below} | {start} |")
    if summary.get("gamma_vs_gain") is not None:
        lines += ["", f"Spearman ρ between a user's estimated γ and cbpo − sft ROUGE-L: {summary['gamma_vs_gain']:+.2f}"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = summary["arms"]
    names = list(arms)
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(14, 5))
    sft = arms["sft"]["rougeL"]
    deltas = [arms[a]["rougeL"] - sft for a in names]
    low_high = [arms[a]["ci_vs_sft"]["rougeL"] for a in names]
    errors = [[d - lo for d, (lo, _) in zip(deltas, low_high)], [hi - d for d, (_, hi) in zip(deltas, low_high)]]
    bars.bar(names, deltas, yerr=errors, capsize=3, color=["tab:red" if a.startswith("cbpo") else "tab:gray" for a in names])
    bars.axhline(0, color="black", linewidth=0.8)
    bars.set_ylabel("ROUGE-L − sft (paired bootstrap 95% CI)")
    bars.set_title(title)
    bars.tick_params(axis="x", rotation=60)
    if "cbpo" in arms:
        users = summary["users"]
        gammas = [arms["cbpo"]["per_user"][u]["gamma"] for u in users]
        gains = [arms["cbpo"]["per_user"][u]["rougeL"] - arms["sft"]["per_user"][u]["rougeL"] for u in users]
        scatter.scatter(gammas, gains)
        scatter.axhline(0, color="black", linewidth=0.8)
        scatter.set_xlabel("estimated γ (per user)")
        scatter.set_ylabel("cbpo − sft ROUGE-L")
        scatter.set_title("γ vs gain over SFT, per user")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["tune", "run", "report"], help="report: the tables of run (or, with --grid, of tune) from the runs finished so far, starting nothing")
    parser.add_argument("--task", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--split", default="dev")
    parser.add_argument("--validation", type=int, default=5, help="N users drawn at random (never the largest): tuning only, never reported")
    parser.add_argument("--min-items", type=int, default=0, help="only users with at least N history items")
    parser.add_argument("--eval-items", type=int, default=8, help="score each user on its N newest history items too (never trained on)")
    parser.add_argument("--users", type=int, default=None, help="report on at most N users after the validation slice")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names (run mode)")
    parser.add_argument("--grid", action="append", default=[], help="tune: KEY=V1,V2 (repeatable)")
    parser.add_argument("--tune-methods", default="sft,cbpo")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE training option for every arm")
    parser.add_argument("--task-adapter", default="auto")
    parser.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated training seeds; scores are averaged over them")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--home", type=Path, default=HERE / ".home")
    parser.add_argument("--name", default=None, help="results file name (default: TASK-MODEL)")
    args = parser.parse_args(argv)
    if args.mode == "tune" and not args.grid:
        parser.error("tune needs at least one --grid KEY=V1,V2")
    args.data, args.model = args.data.resolve(), args.model.resolve()

    name = args.name or f"{args.task}-{args.model.name}"
    out = HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    shared = {"eval_items": str(args.eval_items), **parse_pairs(args.set)}
    validation, report = split_users(args)
    stem = f"{args.data.name}-{args.model.name}.{'tune' if args.grid else 'run'}"
    pin_task_adapters(args.home, TASK_ADAPTERS)
    jobs = Jobs(args, args.home / f"{stem}.jobs.json", Ledger(out / f"{stem}.runs.json"))

    if args.grid:
        rows = tune_rows(jobs, parse_pairs(args.grid), shared, args.tune_methods.split(","), validation, args.seeds, submit=args.mode == "tune")
        path = out / f"{name}-tuning.json"
        earlier = json.loads(path.read_text())["rows"] if path.exists() else []
        seen = {(json.dumps(r["options"], sort_keys=True), r["method"]) for r in rows}
        rows = [r for r in earlier if (json.dumps(r["options"], sort_keys=True), r["method"]) not in seen] + rows
        result = {"task": args.task, "model": str(args.model), "validation_users": validation, "seeds": args.seeds, "rows": rows}
        path.write_text(json.dumps(result, indent=2))
        return
    arms = {a: ARMS[a] for a in args.arms.split(",")}
    if "sft" not in arms:
        raise SystemExit("the arms must include sft: every arm is compared with it")
    per_seed = {seed: run_arms(jobs, arms, report, shared, seed, submit=args.mode == "run") for seed in args.seeds}
    per_seed = {seed: runs for seed, runs in per_seed.items() if all(runs.get(arm) for arm in arms)}
    summary = summarize(per_seed, report) if per_seed else {"users": []}
    if not summary["users"]:
        raise SystemExit("no user has finished every arm yet: nothing to report")
    partial = len(summary["users"]) < len(report) or len(per_seed) < len(args.seeds)
    config = {"options": shared, "task_adapter": args.task_adapter, "split": args.split, "validation_users": validation,
              "arms": {a: {"method": m, "options": o} for a, (m, o) in arms.items()}}
    protocol = {"queries_per_user": items_per_user(summary["arms"]),
                "eval_items": args.eval_items, "min_items": args.min_items, "task_adapter": args.task_adapter != "none",
                "selection": "log-likelihood" if shared.get("selection") == "on" else "none", "seeds": list(per_seed)}
    result = {"task": args.task, "model": str(args.model), "data": str(args.data), "users": summary["users"],
              "seeds": args.seeds, "protocol": protocol, "config": config, "arms": summary["arms"],
              "gamma_vs_gain_spearman": summary.get("gamma_vs_gain"), "partial": partial}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    title = f"{args.task} · {args.model.name}"
    if partial:
        title += f" (partial: {len(summary['users'])} of {len(report)} users, seeds {', '.join(map(str, per_seed))} of {', '.join(map(str, args.seeds))})"
    (out / f"{name}.md").write_text(markdown(summary, title))
    plot(summary, title, out / f"{name}.png")
    print(markdown(summary, title))


if __name__ == "__main__":
    main()
