"""The workshop challenge: budgets set by a host, models submitted under nicknames, one ranking.

A challenge is a parameter budget (90M, 1.5B, or a fraction such as 0.7 of the default model),
a training-token budget (what a model's whole lineage may have trained on: 1M, 65536, ...) and
a data source. The host sets it with COMPACT_CHALLENGE_BUDGET, COMPACT_CHALLENGE_TOKENS and
COMPACT_CHALLENGE_DATA (default builtin), or from the app's host view, which records it in the
runs store: the store's newest challenge wins over the environment.

Models are ranked by perplexity on the source's held-out text (compact.data.HELDOUT), which no
job calibrates, trains or validates on, with the canonical evaluation's block count and length
(COMPACT_EVAL_TOKENS, COMPACT_EVAL_SEQ_LEN). Scores are cached in the runs store like every
canonical one (compact.scoreboard), so a model is scored once however often it is submitted
or listed.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from compact import data, scoreboard
from compact.errors import UserError
from compact.runs import RunStore
from compact.search import parse_params

NICKNAME_CHARS = 32
# The jobs whose config's `tokens` are training tokens: distillation, and sparsify's AST.
TRAINING = {"distill": lambda cfg: True, "sparsify": lambda cfg: cfg.method == "ast"}


@lru_cache(maxsize=1)
def default_params() -> int:
    """Parameters of the default model, the base of a budget given as a fraction."""
    from compact import models

    return models.load(models.DEFAULT_REF).shape.params


def parse_budget(text: str) -> int:
    """A parameter budget as compact search takes it: 90M, 1.5B, 90000000, or a fraction of the
    default model's parameters such as 0.7."""
    try:
        fraction = 0 < float(str(text).strip()) < 1
    except ValueError:
        fraction = False
    return parse_params(text, default_params() if fraction else 0)


def parse_tokens(text: str) -> int:
    return parse_params(text, 0, what="token budget")


@dataclass(frozen=True)
class Challenge:
    budget: str | None = None  # parameters, as parse_budget reads them; None: no limit
    tokens: str | None = None  # training tokens along a model's lineage; None: no limit
    data: str = "builtin"  # the source whose held-out text ranks the models

    def check(self) -> Challenge:
        self.max_params(), self.max_tokens()
        if self.data != "builtin" and not self.data.startswith("hf:"):
            raise UserError(f"the challenge's data must be builtin or hf:NAME (sources with held-out "
                            f"text), not '{self.data}'")
        return self

    def max_params(self) -> int | None:
        return parse_budget(self.budget) if self.budget else None

    def max_tokens(self) -> int | None:
        return parse_tokens(self.tokens) if self.tokens else None

    def setting(self) -> scoreboard.Setting:
        canonical = scoreboard.canonical()
        return scoreboard.Setting(self.data, canonical.tokens, canonical.seq_len, data.HELDOUT)

    def rules(self) -> str:
        params, tokens = self.max_params(), self.max_tokens()
        size = f"at most {params:,} parameters" if params else "any number of parameters"
        trained = f"trained on at most {tokens:,} tokens" if tokens is not None else "any training"
        return f"{size}, {trained}; ranked by perplexity on {self.setting().label}"


def from_env() -> Challenge:
    return Challenge(os.environ.get("COMPACT_CHALLENGE_BUDGET") or None,
                     os.environ.get("COMPACT_CHALLENGE_TOKENS") or None,
                     os.environ.get("COMPACT_CHALLENGE_DATA") or "builtin")


def current(store: RunStore | None = None) -> Challenge:
    """The challenge a host last set in the store, else the environment's."""
    row = (store or RunStore()).challenge()
    return Challenge(row["budget"], row["tokens"], row["data"]) if row else from_env()


def authorized(given: str | None, password: str | None) -> bool:
    """The host's password, compared in constant time; no password set: nobody hosts here."""
    return bool(password) and hmac.compare_digest((given or "").encode(), password.encode())


def host(budget: str | None, tokens: str | None, data_src: str | None,
         store: RunStore | None = None) -> Challenge:
    """Set a new challenge (checked first); later submissions and the board follow it."""
    challenge = Challenge((budget or "").strip() or None, (tokens or "").strip() or None,
                          (data_src or "").strip() or "builtin").check()
    (store or RunStore()).record_challenge(challenge.budget, challenge.tokens, challenge.data)
    return challenge


def name(model: str) -> str:
    """A model as the app's pickers name it: its folder's name ('pruned-2'), or its reference."""
    return Path(model).name if Path(model).expanduser().exists() else model


def training_tokens(store: RunStore, run_id: int | None) -> int:
    """Tokens trained by every run behind run_id's artifact: its parents and the teachers they
    learned from (compact.reproduce.chain). Each distillation or AST run counts the tokens it
    asked for, an upper bound of what it trained (rounded down to whole steps). A root model
    ('default', a Hub id): 0. A lineage with a run recorded without its config raises UserError."""
    from compact import reproduce

    if run_id is None:
        return 0
    return sum(step.config.tokens for step in reproduce.chain(store, run_id)
               if step.command in TRAINING and TRAINING[step.command](step.config))


def check_nickname(nickname: str | None) -> str:
    nickname = " ".join((nickname or "").split())
    if not nickname or len(nickname) > NICKNAME_CHARS:
        raise UserError(f"give a nickname of 1 to {NICKNAME_CHARS} characters before submitting")
    return nickname


def submit(nickname: str, ref: str, store: RunStore | None = None, challenge: Challenge | None = None,
           loaded=None, session: str | None = None) -> dict:
    """Check ref against the challenge's budgets, score it on the held-out text, record it.

    loaded: ref already loaded (else it is loaded here). Refused (UserError, nothing recorded):
    no nickname, more parameters than the budget, more training tokens along its lineage than
    the token budget, or a lineage the token budget cannot be checked on.
    """
    from compact import models

    nickname = check_nickname(nickname)
    store = store or RunStore()
    challenge = challenge or current(store)
    loaded = loaded or models.load(ref)
    params = sum(p.numel() for p in loaded.model.parameters())
    limit = challenge.max_params()
    if limit is not None and params > limit:
        raise UserError(f"{name(ref)} has {params:,} parameters, over the challenge's budget of {limit:,}: "
                        "prune it further")
    run = store.producer(ref)
    try:
        tokens: int | None = training_tokens(store, run)
    except UserError:
        tokens = None
    cap = challenge.max_tokens()
    if cap is not None and tokens is None:
        raise UserError(f"{name(ref)}'s lineage is not fully recorded in the runs store, so its training "
                        f"tokens cannot be checked against the budget of {cap:,}")
    if cap is not None and tokens > cap:
        raise UserError(f"{name(ref)} was trained on {tokens:,} tokens along its lineage, over the "
                        f"challenge's budget of {cap:,}")
    setting = challenge.setting()
    score = scoreboard.score(ref, loaded, setting=setting, store=store)
    model, version = scoreboard.identity(ref)
    sid = store.record_submission(nickname, session, model, version, run, params, tokens, setting.key,
                                  score["ppl"], score["loss"])
    rank = next((r["rank"] for r in board(store, challenge) if r["id"] == sid), None)
    return {"id": sid, "nickname": nickname, "model": name(ref), "ppl": score["ppl"], "params": params,
            "tokens": tokens, "run": run, "rank": rank, "setting": score["setting"]}


def board(store: RunStore | None = None, challenge: Challenge | None = None) -> list[dict]:
    """The current challenge's submissions, best held-out perplexity first: one row per nickname
    and model (its newest submission), and only those inside the budgets (a host may tighten
    them after a submission)."""
    store = store or RunStore()
    challenge = challenge or current(store)
    limit, cap = challenge.max_params(), challenge.max_tokens()
    newest: dict[tuple, dict] = {}
    for row in store.submissions(challenge.setting().key):
        newest[(row["nickname"], row["model"])] = row
    rows = [r for r in newest.values() if (limit is None or r["params"] <= limit)
            and (cap is None or (r["tokens"] is not None and r["tokens"] <= cap))]
    rows.sort(key=lambda r: (r["ppl"], r["id"]))
    return [{"rank": i, "id": r["id"], "nickname": r["nickname"], "model": name(r["model"]), "ppl": r["ppl"],
             "params": r["params"], "tokens": r["tokens"], "run": r["run"], "artifact": r["model"]}
            for i, r in enumerate(rows, 1)]


def _params_of(run: dict) -> int:
    if isinstance(run.get("params"), int):
        return run["params"]
    from compact import models

    return models.load(run["artifact"]).shape.params


def stored_models(budget: str | None = None, store: RunStore | None = None, progress=None) -> dict:
    """Every model artifact in the runs store at or under the budget (the challenge's when not
    given), ranked by held-out perplexity (scored now where the cache has no number)."""
    store = store or RunStore()
    challenge = current(store)
    text = budget if budget is not None else challenge.budget
    limit = parse_budget(text) if text else None
    setting = challenge.setting()
    nicknames = {r["model"]: r["nickname"] for r in store.submissions()}  # the newest wins
    seen, found = set(), []
    for run in store.list(status="succeeded", limit=1_000_000):  # newest first
        artifact = run.get("artifact")
        if not artifact or not (Path(artifact) / "config.json").is_file():
            continue  # a scores file, or a model cleaned away since
        key = str(Path(artifact).resolve())
        if key in seen:
            continue
        seen.add(key)
        params = _params_of(run)
        if limit is None or params <= limit:
            found.append((run, key, params))
    rows = []
    for i, (run, key, params) in enumerate(found):
        if progress is not None:
            progress(i / len(found), f"held-out perplexity of {name(key)}")
        score = scoreboard.score(key, setting=setting, store=store)
        rows.append({"name": nicknames.get(key) or name(key), "nickname": nicknames.get(key),
                     "ppl": score["ppl"], "params": params, "run": run["id"], "artifact": key})
    rows.sort(key=lambda r: (r["ppl"], r["run"]))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return {"budget": limit, "setting": setting.label, "rows": rows}
