"""The gate's budgets as the search judges them: parsed before any work, each candidate's verdicts by
the gate's own logic (:func:`flipcheck.gate.check`), and the figure the search steers by."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flipcheck.errors import FlipcheckError
from flipcheck.gate import _figures, _kl, check, parse_budget

BUDGET_NAMES = ("max_flips", "max_kl", "min_acc_delta", "min_acc", "max_kl_text", "max_ppl_ratio")


@dataclasses.dataclass
class Budgets:
    """The gate's budgets (texts as the user wrote them) and how they are judged."""

    values: dict[str, str | None]
    confidence: float | None = None
    metric: str | None = None

    @classmethod
    def parse(cls, values: Mapping[str, Any], confidence: str | float | None = None, metric: str | None = None,
              texts: Sequence[str] = ()) -> Budgets:
        """Checked before any work: every budget parses, at least one is given, a text budget has texts."""
        from flipcheck.evaluation.confidence import check_confidence
        from flipcheck.evaluation.samples import check_metric

        check_metric(metric)
        given = {k: (None if values.get(k) is None else str(values[k])) for k in BUDGET_NAMES}
        for k, v in given.items():
            if v is not None:
                parse_budget(v, "--" + k.replace("_", "-"))
        if all(v is None for v in given.values()):
            raise FlipcheckError("search: give at least one budget: " + ", ".join("--" + k.replace("_", "-") for k in BUDGET_NAMES))
        if (given["max_kl_text"] or given["max_ppl_ratio"]) and not texts:
            raise FlipcheckError("search: --max-kl-text / --max-ppl-ratio judge text corpora; give --text")
        conf = None if confidence is None else check_confidence(confidence)
        return cls(given, conf, metric)

    @classmethod
    def parse_frontier(cls, values: Mapping[str, Any], confidence: str | float | None = None, metric: str | None = None,
                       texts: Sequence[str] = ()) -> list[Budgets]:
        """Budgets given as lists (``--max-flips 2%,5%,10%``): one set per position, a single budget used
        in every set; lists of several budgets must be equally long. Each set is checked as :meth:`parse`."""
        lists: dict[str, list[Any]] = {}
        for k in BUDGET_NAMES:
            v = values.get(k)
            if v is None:
                continue
            parts = [p.strip() for p in v.split(",")] if isinstance(v, str) else [v]
            if any(p == "" for p in parts):
                raise FlipcheckError(f"--{k.replace('_', '-')} {v!r}: a budget, or a comma-separated list of budgets "
                                     "without empty items (e.g. 2%,5%,10%)")
            lists[k] = parts
        lengths = sorted({len(p) for p in lists.values() if len(p) > 1})
        if len(lengths) > 1:
            shown = ", ".join(f"--{k.replace('_', '-')} has {len(p)}" for k, p in lists.items() if len(p) > 1)
            raise FlipcheckError(f"budget lists of different lengths ({shown}): give every list as many budgets, "
                                 "or one budget to use in every set")
        n = lengths[0] if lengths else 1
        return [cls.parse({k: (p[i] if len(p) > 1 else p[0]) for k, p in lists.items()}, confidence, metric, texts)
                for i in range(n)]

    def at(self, confidence: float | None) -> Budgets:
        """The same budgets judged at another confidence (the search split's tightened one)."""
        return dataclasses.replace(self, confidence=confidence)

    def verdicts(self, entry: Mapping[str, Any]) -> tuple[bool, list[str]]:
        """(passes every budget, the gate's verdict lines) for one evaluated child."""
        vs = check({"children": [entry]}, **self.values, metric=self.metric, confidence=self.confidence)
        return all(v.passed for v in vs), [v.text for v in vs]

    def primary(self) -> tuple[str, float] | None:
        """The figure the search steers by, and its budget: flips, else text KL, else KL."""
        for k in ("max_flips", "max_kl_text", "max_kl"):
            if self.values.get(k) is not None:
                return k, parse_budget(self.values[k], k)
        return None

    def figure(self, entry: Mapping[str, Any]) -> float | None:
        """The steering figure of a child as the gate judges it (the worst task or corpus):
        flips (their upper bound with a confidence), text KL, or KL over options."""
        p = self.primary()
        if p is None:
            return None
        kind = p[0]
        vals: list[float] = []
        if kind == "max_kl_text":
            for fig in (entry.get("corpus") or {}).values():
                kl = (fig.get("kl") or {}).get("mean")
                if kl is not None:
                    vals.append(float(kl))
            return max(vals) if vals else None
        summaries = list((entry.get("tasks") or {}).values()) + ([entry["micro"]] if entry.get("micro") else [])
        for s in summaries:
            fig, _ = _figures(s, self.metric)
            if kind == "max_kl":
                v, _ = _kl(fig)
                if v is not None:
                    vals.append(v)
                continue
            v = fig.get("flips")
            if v is None:
                continue
            if self.confidence is not None and fig.get("n") and fig.get("n_c2i") is not None:
                from flipcheck.evaluation.confidence import cp_upper

                v = cp_upper(int(fig["n_c2i"]) + int(fig["n_i2c"]), int(fig["n"]), self.confidence)
            vals.append(float(v))
        return max(vals) if vals else None
