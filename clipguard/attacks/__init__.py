"""The attacks clipguard defends against, to prove that the defence works.

One module per family: ``yang`` (Yang et al. 2023, Attacks I–III) and ``carlini`` (Carlini &
Terzis 2022, targeted poisoning and backdoors); ``trigger`` (the backdoor patch); ``inject``
(placing poisons among clean samples and writing shards); ``manifest`` (the ground truth);
``run`` (``run_attack``, what the CLI calls). ``evade`` names the variants built to pass a pair
filter: ``blend`` (captions), ``nearest`` (images ranked under a ``surrogate`` model), and
Carlini's ``clean_label`` and ``many_captions``.
"""

from clipguard.attacks.evade import DEFAULT_SURROGATE, EvadeVariant
from clipguard.attacks.goals import AttackError, AttackKind, Goal, check_goals, parse_goal
from clipguard.attacks.inject import KeyPolicy
from clipguard.attacks.manifest import MANIFEST_NAME, PoisonManifest, PoisonRecord, read_manifest
from clipguard.attacks.plan import CaptionSource, achieved_rate, poison_count_for_rate
from clipguard.attacks.run import AttackConfig, AttackProgress, AttackResult, run_attack
from clipguard.attacks.trigger import TriggerPattern, TriggerPosition, TriggerSpec, stamp_image, stamp_image_bytes

__all__ = [
    "DEFAULT_SURROGATE", "MANIFEST_NAME", "AttackConfig", "AttackError", "AttackKind", "AttackProgress", "AttackResult",
    "CaptionSource", "EvadeVariant", "Goal", "KeyPolicy", "PoisonManifest", "PoisonRecord", "TriggerPattern",
    "TriggerPosition", "TriggerSpec", "achieved_rate", "check_goals", "parse_goal",
    "poison_count_for_rate", "read_manifest", "run_attack", "stamp_image", "stamp_image_bytes",
]  # fmt: skip
