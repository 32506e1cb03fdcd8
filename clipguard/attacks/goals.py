"""Poisoning goals ``A:B`` and the rules on which attack takes which goals."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from clipguard.errors import ClipguardError

ANY_CLASS = "*"


class AttackError(ClipguardError):
    """An attack that cannot be built from the given goals, counts or data."""


class AttackKind(str, Enum):
    single_image = "single-image"  # Yang et al. Attack I
    single_label = "single-label"  # Attack II
    multi_label = "multi-label"  # Attack III
    targeted = "targeted"  # Carlini & Terzis targeted poisoning
    backdoor = "backdoor"  # Carlini & Terzis backdoor


@dataclass(frozen=True)
class Goal:
    """``source:target``.

    Yang et al. (single-image, single-label, multi-label): texts of class ``source`` are to
    retrieve images of class ``target`` (A2B). Carlini & Terzis (targeted, backdoor): images of
    class ``source`` (``*`` = any class) are to be read as the label ``target``.
    """

    source: str
    target: str

    def __str__(self) -> str:
        return f"{self.source}:{self.target}"

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "target": self.target}


def parse_goal(text: str) -> Goal:
    parts = [part.strip() for part in str(text).split(":")]
    if len(parts) != 2 or not all(parts):
        raise AttackError(f"goal {text!r} must look like SOURCE:TARGET, e.g. sheep:aeroplane")
    source, target = parts
    if target == ANY_CLASS:
        raise AttackError(f"goal {text!r}: the target class cannot be '*'")
    if source == target:
        raise AttackError(f"goal {text!r}: source and target are the same class")
    return Goal(source, target)


def check_goals(kind: AttackKind, goals: list[Goal] | tuple[Goal, ...]) -> tuple[Goal, ...]:
    """Enforce how many goals each kind takes; Attack III needs pairwise disjoint classes."""
    goals = tuple(goals)
    if not goals:
        raise AttackError("give at least one --goal SOURCE:TARGET")
    if kind is not AttackKind.multi_label and len(goals) > 1:
        raise AttackError(
            f"{kind.value} takes exactly one goal, got {len(goals)}; use multi-label for several goals"
        )
    wildcard_ok = kind in (AttackKind.targeted, AttackKind.backdoor)
    for goal in goals:
        if goal.source == ANY_CLASS and not wildcard_ok:
            raise AttackError(f"{kind.value}: the source class of goal {goal} cannot be '*'")
    if kind is AttackKind.multi_label:
        if len(goals) < 2:
            raise AttackError("multi-label needs at least two goals; for one goal use single-label")
        seen: dict[str, Goal] = {}
        for goal in goals:
            for name in (goal.source, goal.target):
                if name in seen:
                    raise AttackError(
                        f"multi-label goals must use disjoint classes (D_Ai and D_Bi disjoint, and "
                        f"no class in two goals): {name!r} appears in {seen[name]} and in {goal}"
                    )
                seen[name] = goal
    return goals
