"""Attacks that adapt to a pair filter (``clipguard attack KIND --evade VARIANT``).

A pair filter catches the plain attacks because a poison's caption does not describe its image.
An adaptive attacker shrinks that gap; each variant is one way to do it:

- ``blend`` (every kind): the caption keeps the poison's class noun but describes the image it
  sits on (its colour, size, count, position, background), so only the noun disagrees.
- ``nearest`` (single-image, single-label, multi-label): among the class-B images, those whose
  embeddings under a surrogate CLIP lie nearest to the class-A captions, each paired with the
  nearest unused class-A caption. The surrogate is the attacker's model (the bundled victim
  by default), not the defender's reference.
- ``clean-label`` (backdoor): the trigger on images of the target label whose own captions name
  that label. Caption and image agree, so a pair filter cannot see it by construction.
- ``many-captions`` (targeted): one target image behind many distinct captions of the label,
  template prompts and data captions together, so no exact caption repeats.
"""

from __future__ import annotations

from enum import Enum

from clipguard.attacks.goals import AttackError, AttackKind

DEFAULT_SURROGATE = "clipguard-victim"


class EvadeVariant(str, Enum):
    blend = "blend"
    nearest = "nearest"
    clean_label = "clean-label"
    many_captions = "many-captions"


APPLIES_TO: dict[EvadeVariant, tuple[AttackKind, ...]] = {
    EvadeVariant.blend: tuple(AttackKind),
    EvadeVariant.nearest: (AttackKind.single_image, AttackKind.single_label, AttackKind.multi_label),
    EvadeVariant.clean_label: (AttackKind.backdoor,),
    EvadeVariant.many_captions: (AttackKind.targeted,),
}

_WHY_NOT = {
    EvadeVariant.nearest: "it chooses which class-B images carry class-A captions (Yang et al.'s attacks)",
    EvadeVariant.clean_label: "it stamps the trigger on images whose captions already name the target label",
    EvadeVariant.many_captions: "it puts one target image behind many distinct captions of the label",
}


def check_evade(kind: AttackKind, variant: EvadeVariant | None) -> EvadeVariant | None:
    """The variant as an enum member, or an AttackError saying which attacks it applies to."""
    if variant is None:
        return None
    try:
        variant = EvadeVariant(variant)
    except ValueError:
        raise AttackError(f"--evade {variant!r}: known variants are {', '.join(v.value for v in EvadeVariant)}") from None
    if kind not in APPLIES_TO[variant]:
        kinds = ", ".join(k.value for k in APPLIES_TO[variant])
        raise AttackError(f"--evade {variant.value} does not apply to {kind.value}: {_WHY_NOT[variant]}; "
                          f"use it with {kinds}")
    return variant
