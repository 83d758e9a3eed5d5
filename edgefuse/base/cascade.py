"""The cascade rule, in numpy alone: run a cheap first stage, and only where its gate score is below a threshold run
the other members of an ensemble that contains it and combine them with the first stage's output. The host's
candidates, `ef.Cascade` and a device bundle's deploy.py all run this one file (it is copied into bundles), so
the rule exists once.

Per input: out = first(x) where gate(first(x)) >= threshold, else combine(first(x), rest(x)). With `cap`, at most
`cap` inputs of a batch escalate (the least confident): a fixed worst-case cost per batch."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

try:  # in the package; a bundle's copy stands beside files.py
    from .errors import EdgefuseError as _Base
    from .files import atomic_write_text, file_digest
except ImportError:
    from files import atomic_write_text, file_digest
    _Base = ValueError

DESCRIPTION = "cascade.json"  # beside the two stage graphs it names


class CascadeError(_Base):
    """A cascade description that cannot be run as it stands."""


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _max_softmax(logits: np.ndarray) -> np.ndarray:
    return softmax(logits).max(-1)


def _margin(logits: np.ndarray) -> np.ndarray:
    p = np.sort(softmax(logits), axis=-1)
    return p[..., -1] - p[..., -2]


# The gate scores, registered by name: higher = more confident; an input escalates where its score is below the
# threshold. Both lie in [0, 1].
GATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"max_softmax": _max_softmax, "margin": _margin}
COMBINES = ("mean", "probs")  # mean of logits, or the log of the mean probability (as base/combine.py)


def combine(stack: np.ndarray, rule: str) -> np.ndarray:
    """Members' outputs (members, batch, classes) as one: the mean of logits, or the log of the mean probability."""
    if rule == "probs":
        z = stack - stack.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        top = logp.max(0)
        return top + np.log(np.exp(logp - top).mean(0))
    return stack.mean(0)


@dataclass(frozen=True)
class CascadeRule:
    """Member `first` runs on every input; members `rest` run where the gate score is below `threshold`, and the
    output there combines all of them by `combine`. `cap`: at most that many escalated inputs per call (None: no
    cap)."""
    first: int
    rest: tuple[int, ...]
    gate: str
    threshold: float
    combine: str
    cap: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rest", tuple(self.rest))
        self.check()

    def check(self) -> None:
        if self.gate not in GATES:
            raise CascadeError(f"unknown gate '{self.gate}' (known: {', '.join(GATES)})")
        if self.combine not in COMBINES:
            raise CascadeError(f"unknown combine '{self.combine}' (known: {', '.join(COMBINES)})")
        if not (isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
                and math.isfinite(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise CascadeError(f"the cascade's threshold must be a finite number from 0 to 1, got {self.threshold!r}")
        members = (self.first, *self.rest)
        if not self.rest or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in members):
            raise CascadeError(f"a cascade needs a first member and at least one more, as member indices, got "
                               f"{list(members)}")
        if len(set(members)) != len(members):
            raise CascadeError(f"the second stage must hold members the first does not, got first {self.first} and "
                               f"rest {list(self.rest)}")
        if self.cap is not None and not (isinstance(self.cap, int) and not isinstance(self.cap, bool)
                                         and self.cap >= 1):
            raise CascadeError(f"the cascade's cap must be a whole number of at least 1, got {self.cap!r}")

    @property
    def members(self) -> tuple[int, ...]:
        return (self.first, *self.rest)

    @property
    def stage_members(self) -> tuple[list[int], list[int]]:
        """The members each stage graph computes: the first alone, then the rest."""
        return [self.first], list(self.rest)

    def escalate(self, first_logits: np.ndarray) -> np.ndarray:
        """Which inputs run the second stage: score below the threshold, at most `cap` of them (least confident)."""
        score = GATES[self.gate](first_logits)
        mask = score < self.threshold
        if self.cap is not None and mask.sum() > self.cap:
            keep = np.argsort(np.where(mask, score, np.inf), kind="stable")[:self.cap]
            mask = np.zeros_like(mask)
            mask[keep] = True
        return mask

    def outputs(self, first_logits: np.ndarray, rest_logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The cascade's output given the first stage's logits (batch, classes) and the rest's (escalated rows,
        len(rest), classes) for the rows in `mask`."""
        out = np.array(first_logits, dtype=np.float32, copy=True)
        if mask.any():
            stack = np.concatenate([np.asarray(first_logits)[mask][:, None], rest_logits], 1)
            out[mask] = combine(stack.transpose(1, 0, 2).astype(np.float64), self.combine)
        return out

    def run(self, x: np.ndarray, first: Callable[[np.ndarray], np.ndarray],
            rest: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One call: `first(x)` gives (batch, classes), `rest(rows)` gives (rows, len(rest), classes) and runs only
        on the escalated rows, gathered. Returns the outputs and the escalation mask."""
        y = first(x)
        mask = self.escalate(y)
        r = rest(x[mask]) if mask.any() else None
        return self.outputs(y, r, mask), mask

    def to_json(self) -> dict:
        return asdict(self) | {"rest": list(self.rest)}

    @classmethod
    def from_json(cls, raw: dict) -> CascadeRule:
        """A rule from a cascade description; a missing or mistyped key is one CascadeError."""
        if not isinstance(raw, dict):
            raise CascadeError("a cascade description must be a JSON object")
        missing = [k for k in ("first", "rest", "gate", "threshold", "combine") if k not in raw]
        if missing:
            raise CascadeError(f"the cascade description lacks '{missing[0]}'")
        if not isinstance(raw["rest"], list):
            raise CascadeError(f"the cascade's rest must be a list of member indices, got {raw['rest']!r}")
        return cls(raw["first"], tuple(raw["rest"]), raw["gate"], raw["threshold"], raw["combine"], raw.get("cap"))


def _no_constant(name: str) -> float:
    raise CascadeError(f"{name} is not a number a cascade description may hold")


def read_description(path: str | Path) -> dict:
    """cascade.json as a dict; an unreadable or non-JSON file (NaN included) is one CascadeError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_no_constant)
    except CascadeError as e:
        raise CascadeError(f"{path}: {e}") from None
    except OSError as e:
        raise CascadeError(f"cannot read the cascade description {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CascadeError(f"{path} is not a JSON cascade description ({e})") from None


def write_description(folder: str | Path, rule: CascadeRule, files: tuple[str, str], **extra) -> dict:
    """`folder/cascade.json`: the rule and, per stage, its graph (`files`, relative to `folder`, already there), the
    members it computes and its SHA-256; `extra` keys beside them. Returns what was written."""
    folder = Path(folder)
    stages = [{"file": f, "members": m, "sha256": file_digest(folder / f)}
              for f, m in zip(files, rule.stage_members)]
    desc = {"rule": rule.to_json(), "stages": stages, **extra}
    atomic_write_text(folder / DESCRIPTION, json.dumps(desc, indent=2, allow_nan=False) + "\n")
    return desc


def read_cascade(folder: str | Path) -> tuple[CascadeRule, list[Path]]:
    """The rule of `folder/cascade.json` and its two stage graphs' paths, each checked before anything runs: the
    members it computes (stages swapped?), that it lies inside `folder`, and its digest (swapped or edited?). Any
    failure is one CascadeError."""
    folder = Path(folder)
    raw = read_description(folder / DESCRIPTION)
    rule = CascadeRule.from_json(raw.get("rule") if isinstance(raw, dict) else None)
    stages = raw.get("stages")
    if not (isinstance(stages, list) and len(stages) == 2 and all(isinstance(s, dict) for s in stages)):
        raise CascadeError(f"{folder / DESCRIPTION}: 'stages' must list the two stage graphs")
    paths = []
    for i, (stage, want) in enumerate(zip(stages, rule.stage_members), 1):
        if stage.get("members") != want:
            raise CascadeError(f"stage {i} of {folder / DESCRIPTION} computes members {stage.get('members')}, "
                               f"the rule needs {want} there (stages swapped?)")
        path = folder / str(stage.get("file", ""))
        if not path.is_file() or folder.resolve() not in path.resolve().parents:
            raise CascadeError(f"stage {i}'s graph {path} is missing (or not in {folder})")
        if file_digest(path) != stage.get("sha256"):
            raise CascadeError(f"stage {i}'s graph {path} does not match its digest in {DESCRIPTION} "
                               "(swapped or edited)")
        paths.append(path)
    return rule, paths
