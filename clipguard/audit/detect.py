"""Goal discovery: the structures that attacks leave behind, tested against the data's background.

Each test gives a p-value, Bonferroni-corrected for the number of tests of its kind; a finding
is a test whose corrected p-value is under the significance level. Every kind needs a class on
the caption side, so reuse without a class keyword (boilerplate alt-text) is never an attack goal,
and every kind compares against the rate at which the data mismatches those classes naturally:

- class_pair: cell (caption A, image B), counted in distinct image groups, against its
  leave-the-cell-out expectation (Poisson tail);
- image_fan_in: one image (with its near-duplicates) behind many distinct captions of class A,
  A not the image's class. The captions of one image are not independent (a stock photo, a
  misjudged image class mismatch all of them at once), so the null is the chance of a group this
  large (the data's own reuse: the share of images with extra captions times a negative binomial
  fitted to their number, `_hurdle_tail`) times the per-image rate of A-captioned groups among B
  images (and the chance of its B captions by label noise), plus the binomial tail of A
  captions one by one;
- image_cluster: many distinct near-identical images, most captioned with one label L: the data's
  tail of distinct images per group (`_hurdle_tail`; times the per-image mismatch rate, plus the binomial tail at
  L's caption rate, when L is not the cluster's class);
- relabelled_images: images whose other captions (exact or near-duplicate copies) name another
  class: the image's class without any neighbour vote; per (added A, majority B) cell and per A;
  a cell is turned around where the pairs' own distances say the majority is the added side
  (`_orient`: Attack II at a high rate);
  a cell under a significant per-A row is tested again against that row's C - 1 cells only
  (`_test_children`), and a significant cell takes in the A captions on images that also carry a
  B caption without a majority (`_with_co_occurring`); where no cell is, classes A and B named on
  many images together, majority or not, are tested per unordered pair (`_co_occurring_classes`);
- caption_fan_out: one caption (with near-identical ones) of class A behind many distinct images
  of class B; binomial tail at P(B image | A caption).
- stamped_images: one patch signature (`clipguard.signals.patches`: a tile's pixels at one
  place) shared by many distinct image groups, most captioned with one label L that their images'
  classes do not explain: Poisson tail of the L-labelled groups against the sum, over the groups,
  of P(a group's captions name L | its image class) (`_group_mislabel`). A backdoor's trigger on
  images of many classes, all captioned with the target; a watermark or a class's own texture
  recurs with captions its images explain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from clipguard.audit.classes import NO_CLASS, CellTable, distinct_caption_rows, grouped_plurality, label_runs, plurality
from clipguard.audit.counting import patch_units
from clipguard.audit.grouping import distinct_per_group
from clipguard.audit.timing import StageClock

LN10 = math.log(10.0)
MIN_EXPECTED_COUNT = 0.1  # as classes.MIN_EXPECTED: an empty background is no proof of impossibility


@dataclass(frozen=True)
class DetectConfig:
    alpha: float = 1e-6  # corrected p-value under which a test is a finding
    min_cell_pairs: int = 3
    min_fan_in: int = 5  # distinct captions behind an image group before it is tested
    min_fan_out: int = 5  # distinct images behind a caption group
    min_cluster: int = 5  # distinct images in a near-duplicate group that make it a cluster


@dataclass
class AuditTables:
    """Everything the tests read, per pair unless named otherwise."""

    classes: list[str]
    caption_class: np.ndarray
    image_class: np.ndarray
    caption_texts: Callable[[np.ndarray], list[str]]  # rows -> their normalised captions, read back
    caption_id: np.ndarray  # distinct normalised caption
    image_id: np.ndarray  # distinct exact image
    image_group: np.ndarray  # near-duplicate image group
    caption_group: np.ndarray  # near-identical caption group
    strong_mismatch: np.ndarray  # no neighbour of the image is captioned with the pair's caption class
    cells: CellTable
    # Cosine similarity of each pair's own image and caption: which of an image's captions were
    # added (`_orient`). None: every pair equally close.
    pair_similarity: np.ndarray | None = None
    # (n, KEEP) uint64 patch signatures of each pair's image, 0 = none; None: not recorded by score.
    patches: np.ndarray | None = None
    # `counting.patch_units` of those signatures, where the audit has counted them (partitioned on
    # disk); None: counted here from ``patches``. Per signature on two or more image groups (counted
    # in groups, so a stock photo on many pages is one image), per group the rows whose image
    # carries it (only those, so a stamped copy that joined its original's near-duplicate group
    # brings its own captions, not the original's).
    patch_units: list | None = None
    # `_group_class_counts`, made at its first use: the relabel tests read it once per finding.
    _class_counts: list | None = field(default=None, init=False, repr=False, compare=False)


@dataclass
class Finding:
    kind: str
    goal: str  # "A:B" (caption class: image class) or, for a cluster, its label
    description: str
    observed: int
    expected: float
    neglog10_p: float  # corrected for `tests`
    tests: int
    rows: np.ndarray = field(repr=False)  # pair rows involved

    @property
    def p_value(self) -> float:
        return 10.0 ** -self.neglog10_p


def neglog10_tail(logsf: float, tests: int) -> float:
    """-log10 of a Bonferroni-corrected p-value, from the log of the raw tail probability."""
    raw = -logsf / LN10 if np.isfinite(logsf) else 320.0
    return max(0.0, raw - math.log10(max(tests, 1)))


def describe_p(neglog10_p: float) -> str:
    if neglog10_p >= 1:
        return f"p < 1e-{int(math.floor(neglog10_p))}"
    return f"p = {10 ** -neglog10_p:.2g}"


@dataclass(frozen=True)
class Detection:
    findings: list[Finding]  # most significant first
    cell_score: np.ndarray  # per pair: -log10 corrected p of its (caption class, image class) cell
    relabel_score: np.ndarray  # per pair: -log10 corrected p of its relabelled-images cell, 0 if none
    stamp_score: np.ndarray  # per pair: -log10 corrected p of the most significant patch group it is a labelled member of


def detect(t: AuditTables, config: DetectConfig, clock: StageClock | None = None) -> Detection:
    clock = clock or StageClock()
    with clock("test: class-pair cells"):
        cell_findings, cell_score = _class_pairs(t, config)
    with clock("test: relabelled images"):
        relabel_findings = _relabelled_images(t, config)
    with clock("test: image fan-in and clusters"):
        # The stamped-images test reads the same groups' mislabel rates: built once, here.
        groups = _image_group_table(t)
        mislabel = _group_mislabel(groups, len(t.classes))
        image_findings = _image_groups(t, config, groups, mislabel)
    with clock("test: caption fan-out"):
        caption_findings = _caption_groups(t, config)
    with clock("test: stamped images (shared patches)"):
        stamp_findings = _stamped_images(t, config, mislabel)
    relabel_score = _per_pair_score([f for f in relabel_findings if not f.goal.endswith(":*")], len(t.caption_class))
    stamp_score = _per_pair_score(stamp_findings, len(t.caption_class))
    tested = cell_findings + image_findings + caption_findings + relabel_findings + stamp_findings
    threshold = -math.log10(config.alpha)
    findings = [f for f in tested if f.neglog10_p > threshold]
    findings.sort(key=lambda f: (-f.neglog10_p, -(f.observed / max(f.expected, 1e-9))))
    return Detection(findings, cell_score, relabel_score, stamp_score)


def _per_pair_score(findings: list[Finding], n: int) -> np.ndarray:
    """Per pair: the largest -log10 corrected p of the tested findings that hold it, 0 if none."""
    score = np.zeros(n)
    for f in findings:
        score[f.rows] = np.maximum(score[f.rows], f.neglog10_p)
    return score


def _class_pairs(t: AuditTables, config: DetectConfig) -> tuple[list[Finding], np.ndarray]:
    classes = len(t.classes)
    tests = t.cells.cells_tested
    score = np.zeros((classes, classes))
    found = []
    for a in range(classes):
        for b in range(classes):
            n = int(t.cells.observed[a, b])
            if a == b or n < config.min_cell_pairs:
                continue
            expected = float(t.cells.expected[a, b])
            score[a, b] = neglog10_tail(stats.poisson.logsf(n - 1, expected), tests)
            rows = np.flatnonzero((t.caption_class == a) & (t.image_class == b) & t.strong_mismatch)
            images = "" if len(rows) == n else f" ({n} distinct images)"
            found.append(Finding(
                "class_pair", f"{t.classes[a]}:{t.classes[b]}",
                f"captions of {t.classes[a]} paired with images of {t.classes[b]}: {len(rows)} pairs{images} where "
                f"{expected:.2g} are expected, {describe_p(score[a, b])}",
                n, expected, score[a, b], tests, rows))
    both = (t.caption_class >= 0) & (t.image_class >= 0) & t.strong_mismatch
    per_pair = np.zeros(len(t.caption_class))
    per_pair[both] = score[t.caption_class[both], t.image_class[both]]
    return found, per_pair


def _caption_rate(t: AuditTables) -> np.ndarray:
    labelled = t.caption_class[t.caption_class >= 0]
    return np.bincount(labelled, minlength=len(t.classes)) / max(len(t.caption_class), 1)


@dataclass(frozen=True)
class _ImageGroup:
    rows: np.ndarray
    images: int  # distinct exact images
    captions: int  # distinct normalised captions
    image_class: int  # data-driven, from neighbours outside the group
    label: int  # plurality class of its own captions


@dataclass(frozen=True)
class GroupRows:
    """The pairs sorted by a group column (stably: rows ascending within a group), and each group
    present as a slice of that order: three arrays, not a Python object a group (~300 bytes each,
    ~20 GB for the 7 x 10^7 image groups of 10^8 web pairs)."""

    order: np.ndarray  # pair rows, by group
    bounds: np.ndarray  # group i's rows are order[bounds[i]:bounds[i + 1]]
    number: np.ndarray  # group i's number in the column

    def __len__(self) -> int:
        return len(self.number)

    def rows(self, i: int) -> np.ndarray:
        return self.order[self.bounds[i]:self.bounds[i + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    @property
    def position(self) -> np.ndarray:
        """Per entry of ``order``, which group (0 ... len - 1) it is in."""
        return np.repeat(np.arange(len(self)), self.sizes)

    def distinct(self, item: np.ndarray) -> np.ndarray:
        """Per group, how many distinct values of ``item`` (per pair) its rows hold."""
        return distinct_per_group(self.position, item[self.order], len(self))


def group_rows(group: np.ndarray) -> GroupRows:
    order = np.argsort(group, kind="stable")
    ordered = group[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(order) else np.zeros(0, np.int64)
    return GroupRows(order, np.r_[starts, len(order)], ordered[starts])


@dataclass(frozen=True)
class _ImageGroups:
    """Every image group's sizes and classes as arrays; `_ImageGroup` made only for those asked for."""

    slices: GroupRows
    images: np.ndarray  # distinct exact images
    captions: np.ndarray  # distinct normalised captions
    image_class: np.ndarray  # data-driven, from neighbours outside the group
    label: np.ndarray  # plurality class of its own captions

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> _ImageGroup:
        return _ImageGroup(self.slices.rows(i), int(self.images[i]), int(self.captions[i]), int(self.image_class[i]),
                           int(self.label[i]))


def _image_group_table(t: AuditTables) -> _ImageGroups:
    slices = group_rows(t.image_group)
    first = slices.order[slices.bounds[:-1]]
    return _ImageGroups(slices, slices.distinct(t.image_id), slices.distinct(t.caption_id), t.image_class[first],
                        grouped_plurality(slices.position, t.caption_class[slices.order], len(slices)))


def _caption_votes(t: AuditTables) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image group number: how many distinct labelled captions it has, and how many distinct
    classes they name, and the most distinct captions of one class (`classes.distinct_caption_rows`)."""
    rows = distinct_caption_rows(t.image_group, t.caption_id, t.caption_class)
    groups = int(t.image_group.max()) + 1 if len(t.image_group) else 0
    run_group, _, counts = label_runs(t.image_group[rows], t.caption_class[rows])
    top = np.zeros(groups, np.int64)
    np.maximum.at(top, run_group, counts)
    return np.bincount(t.image_group[rows], minlength=groups), np.bincount(run_group, minlength=groups), top


def _geometric_tail(counts: np.ndarray) -> float:
    """rho of a geometric law P(X >= x) = rho**x fitted (maximum likelihood) to counts >= 0."""
    mean = float(np.mean(counts)) if len(counts) else 0.0
    return max(mean, 1e-3) / (1.0 + max(mean, 1e-3))


def _hurdle_tail(values: np.ndarray, x: int, own: int, dispersed: bool = False) -> float:
    """P(X >= x) for one group under the data's other groups: the share of them with X > 0 times a
    geometric tail fitted to their positive part, the group's own value ``own`` left out. Near-
    duplicate groups are rare but, where they occur, of any size; one geometric over all groups
    would call a natural group of five near-identical photos impossible."""
    if x <= 0:
        return 1.0
    n = len(values) - 1
    positive = values[values > 0]
    if own > 0:
        positive = np.delete(positive, np.flatnonzero(positive == own)[0])
    share = max(len(positive), 1) / max(n, 1)
    mean = max(float(np.mean(positive - 1)) if len(positive) else 0.0, 0.5)  # a floor: few groups, wide tail
    if dispersed and len(positive) >= 10:
        # A negative binomial with the positive part's own mean and variance (method of moments):
        # the geometric is its one-parameter case, so a heavy-tailed reuse (LAION's) keeps a heavy
        # tail, while a bounded one (stock photos on 2-5 pages) is not given a geometric's long tail
        # that would hide a 20-caption fan-in. The variance is floored just above the mean (a
        # Poisson is the thinnest tail a count of reuse can have).
        var = max(float(np.var(positive - 1, ddof=1)), 1.05 * mean)
        p = mean / var
        r = mean * p / (1.0 - p)
        return min(1.0, share * math.exp(stats.nbinom.logsf(x - 2, r, p)))
    return min(1.0, share * (mean / (1.0 + mean)) ** (x - 1))


def _group_mislabel(groups: _ImageGroups, classes: int) -> np.ndarray:
    """P(a group's own captions name A | its neighbours say B), per image group rather than per
    pair: the captions behind one image share its fate, so a misjudged image class or a reused
    stock photo mismatches all of them at once."""
    counts = np.zeros((classes, classes))
    known = (groups.label >= 0) & (groups.image_class >= 0)
    np.add.at(counts, (groups.label[known], groups.image_class[known]), 1)
    return counts


def _joint_mismatch(counts: np.ndarray, label: int, image_class: int, own: bool) -> float:
    column = counts[:, image_class] if image_class >= 0 else counts.sum(axis=1)
    cell = column[label] - (1 if own else 0)  # the group tested is left out of its own background
    rest = max(column.sum() - (1 if own else 0), 0)
    # An empty cell's prior (one pseudo-group): the column's own share of mismatched groups spread
    # over the rows as the other columns spread theirs, so a reference whose neighbours rarely
    # misjudge an image (few off-diagonal groups) is not credited a mismatch rate it never shows.
    off = counts.copy()
    np.fill_diagonal(off, 0)
    off_share = (off.sum() - (max(cell, 0) if label != image_class else 0) + 1.0) / (counts.sum() + 2.0)
    row_share = (off[label].sum() + 1.0) / (off.sum() + len(counts))
    return float((max(cell, 0) + off_share * row_share) / (rest + 1.0))


def _caption_noise(t: AuditTables) -> float:
    """The rate at which one distinct caption of a reused image names one given other class than
    its image's majority (natural label noise, per class): measured on the data's groups with at
    least three labelled distinct captions, floored so that clean data never makes it zero."""
    classes = max(len(t.classes), 2)
    distinct, _, top = _caption_votes(t)
    counted = distinct >= 3
    off, total = int((distinct[counted] - top[counted]).sum()), int(distinct[counted].sum())
    return float(min(1.0, (off + 1.0) / (total + 1.0) / (classes - 1)))


def _image_groups(t: AuditTables, config: DetectConfig, groups: _ImageGroups, mislabel: np.ndarray) -> list[Finding]:
    """Fan-in (one or a few distinct images) and clusters (many distinct images), per image group.

    Under the null a group is ordinary reuse: its size follows the data's own (geometric) tail of
    group sizes, and its captions may name another class than its image all together (a stock
    photo, a misjudged image class: `_group_mislabel`) or one by one (natural label noise, binomial).
    """
    classes = len(t.classes)
    # Captions in excess of the usual number per distinct image (the median: a world with two
    # captions per image has nothing unusual about two, nor three near-duplicates about six), so
    # the tail is fitted to the reuse alone.
    usual_captions = int(np.median(groups.captions / groups.images)) if len(groups) else 1

    def excess(g: _ImageGroup) -> int:
        return max(0, g.captions - usual_captions * g.images)

    excesses = np.maximum(0, groups.captions - usual_captions * groups.images)
    noise = _caption_noise(t)
    extra_images = groups.images - 1
    # Only the few groups that can be a finding become objects.
    fan_in = [groups[i] for i in np.flatnonzero((groups.images < config.min_cluster) & (groups.captions >= config.min_fan_in))]
    clusters = [groups[i] for i in np.flatnonzero(groups.images >= config.min_cluster)]
    rate = _caption_rate(t)
    found = []
    candidates, fan_in_tests = [], 0
    for g in fan_in:
        best = None
        for a in range(classes):
            if a == g.image_class:
                continue
            named = g.rows[t.caption_class[g.rows] == a]
            m = len(np.unique(t.caption_id[named]))
            if m < config.min_cell_pairs:
                continue
            p0 = t.cells.per_pair_rate(a, g.image_class, "image") if g.image_class != NO_CLASS else rate[a]
            p0 = min(max(p0, 1e-12), 1.0)
            # The whole group mislabelled at once (a stock photo its neighbours misjudge): as large a
            # group as this one among the data's other reused images (`_hurdle_tail`: web data has
            # stock photos on many pages), times the rate at which a group's captions name A where
            # its neighbours say B, times the chance that its own captions also name B by label
            # noise as often as they do (the attacked image keeps its original captions).
            joint = _hurdle_tail(excesses, excess(g), excess(g), dispersed=True) * _joint_mismatch(mislabel, a, g.image_class, a == g.label)
            if g.image_class != NO_CLASS:
                support = len(np.unique(t.caption_id[g.rows[t.caption_class[g.rows] == g.image_class]]))
                if support:
                    joint *= math.exp(stats.binom.logsf(support - 1, g.captions, noise))
            p = min(1.0, joint + math.exp(stats.binom.logsf(m - 1, g.captions, p0)))
            fan_in_tests += 1
            logp = math.log(p) if p > 0 else -math.inf
            if best is None or logp < best[0]:
                best = (logp, a, m, g.captions * p0, named)
        if best is not None:
            candidates.append((g, best))
    # One test per (group, class named by at least min_cell_pairs of its captions): a class that
    # names fewer cannot be a finding, so the correction counts the tests that could be.
    for g, (logp, a, m, expected, named) in candidates:
        score = neglog10_tail(logp, fan_in_tests)
        what = "one image" if g.images == 1 else f"one image and {g.images - 1} near-duplicate(s)"
        of = t.classes[g.image_class] if g.image_class != NO_CLASS else "?"
        found.append(Finding(
            "image_fan_in", f"{t.classes[a]}:{of}",
            f"{what} (of {of}) behind {m} different {t.classes[a]} captions ({g.captions} distinct captions in all; "
            f"{expected:.2g} {t.classes[a]} captions expected), {describe_p(score)}",
            m, expected, score, fan_in_tests, named))
    for g in clusters:
        if g.label < 0:
            continue  # a cluster whose captions name no class is no attack goal
        labels = t.caption_class[g.rows]
        m, n = int((labels == g.label).sum()), len(g.rows)
        if m * 2 < n:
            continue  # its captions are not "all one label"
        # A cluster this large is unusual in itself (the natural "birthday cake" backdoor of CC3M is
        # 798 near-duplicates behind one caption, and is a finding too); when its captions name
        # another class than its neighbourhood, that mismatch is multiplied in.
        joint = _hurdle_tail(extra_images, g.images - 1, g.images - 1)
        p = joint
        if g.label != g.image_class:
            p = joint * _joint_mismatch(mislabel, g.label, g.image_class, True) + math.exp(
                stats.binom.logsf(m - 1, n, min(max(rate[g.label], 1e-12), 1.0)))
        p = min(1.0, p)
        score = neglog10_tail(math.log(p) if p > 0 else -math.inf, len(clusters) * classes)
        found.append(Finding(
            "image_cluster", t.classes[g.label],
            f"a cluster of {g.images} near-identical images, {m} of its {n} pairs captioned with "
            f"'{t.classes[g.label]}' ({n * rate[g.label]:.2g} expected), {describe_p(score)}",
            m, n * float(rate[g.label]), score, len(clusters) * classes, g.rows[labels == g.label]))
    return found


def _fan_out_groups(t: AuditTables, config: DetectConfig) -> list[tuple[int, np.ndarray]]:
    """The caption groups the fan-out test reads: mostly labelled, behind at least ``min_fan_out``
    distinct images (chosen for all groups at once); each one's most frequent class and its rows."""
    slices = group_rows(t.caption_group)
    labelled_pairs = np.bincount(slices.position[t.caption_class[slices.order] >= 0], minlength=len(slices))
    tested = np.flatnonzero((labelled_pairs * 2 > slices.sizes) & (slices.distinct(t.image_id) >= config.min_fan_out))
    groups = []
    for i in tested:
        rows = slices.rows(i)
        labelled = t.caption_class[rows][t.caption_class[rows] >= 0]
        groups.append((int(np.bincount(labelled, minlength=len(t.classes)).argmax()), rows))
    return groups


def _caption_groups(t: AuditTables, config: DetectConfig) -> list[Finding]:
    classes = len(t.classes)
    groups = _fan_out_groups(t, config)
    tests = len(groups) * (classes - 1)
    found = []
    for a, rows in groups:
        distinct = len(np.unique(t.image_id[rows]))
        best = None
        for b in range(classes):
            if b == a:
                continue
            of_b = rows[(t.image_class[rows] == b) & t.strong_mismatch[rows]]
            m = len(np.unique(t.image_id[of_b]))
            if m < config.min_cell_pairs:
                continue
            p0 = min(max(t.cells.per_pair_rate(a, b, "caption"), 1e-12), 1.0)
            score = neglog10_tail(stats.binom.logsf(m - 1, distinct, p0), tests)
            if best is None or score > best[0]:
                best = (score, b, m, distinct * p0, of_b)
        if best is None:
            continue
        score, b, m, expected, of_b = best
        texts = np.unique(np.asarray(t.caption_texts(rows), dtype=object))
        shown = texts[0] if len(texts[0]) <= 60 else texts[0][:57] + "..."
        more = f" and {len(texts) - 1} near-identical" if len(texts) > 1 else ""
        found.append(Finding(
            "caption_fan_out", f"{t.classes[a]}:{t.classes[b]}",
            f"one {t.classes[a]} caption ('{shown}'{more}) behind {m} different images of {t.classes[b]} "
            f"({distinct} images in all; {expected:.2g} expected), {describe_p(score)}",
            m, expected, score, tests, of_b))
    return found


ORIENT_P = 0.01  # how sure a whole cell must be to be turned around
REDUNDANT = 0.8


def _farther(t: AuditTables, labelled: np.ndarray, a: int, b: int) -> int:
    """+1 where the image's A captions sit farther from it than its B captions (A looks added),
    -1 the other way, 0 when unknown or equal."""
    if t.pair_similarity is None:
        return 0
    sim = t.pair_similarity[labelled]
    mine = t.caption_class[labelled]
    return int(np.sign(float(np.mean(sim[mine == b])) - float(np.mean(sim[mine == a]))))


def _orient(cells: np.ndarray, members: dict, votes: dict, t: AuditTables) -> None:
    """Turn a cell around where its pairs' own distances say so. At a high poisoning rate the
    added captions outnumber an image's original ones (Attack II at 5%: five sheep captions beside
    two aeroplane ones), so the majority calls the original class the added one. The added
    captions are the ones far from the image: one image's comparison is weak under the bundled
    reference, but over a cell's groups it is not, so cell (A added, B majority) becomes (B added,
    A images) when its groups' B captions are the farther ones significantly more often (sign
    test). (The neighbours' class cannot decide it: under the bundled reference the poisoned
    aeroplane images' neighbours are mostly people, chairs or cars.) The moved groups' members
    are their B captions."""
    for (a, b), signs in list(votes.items()):
        signs = np.asarray(signs)
        a_added, b_added = int((signs > 0).sum()), int((signs < 0).sum())
        if b_added <= a_added or stats.binom.sf(b_added - 1, a_added + b_added, 0.5) >= ORIENT_P:
            continue
        cells[b, a] += cells[a, b]
        cells[a, b] = 0
        moved = [np.flatnonzero(np.isin(t.image_group, t.image_group[rows])) for rows in members.pop((a, b))]
        members.setdefault((b, a), []).extend(rows[t.caption_class[rows] == b] for rows in moved)
        votes.pop((a, b))


def _relabel_cells(t: AuditTables, resolve_ties: bool) -> tuple[np.ndarray, dict]:
    """(added class A, image class B) -> image groups, and their A pairs, oriented (`_orient`).
    With ``resolve_ties`` an image with one caption of each of two classes counts too."""
    classes = len(t.classes)
    cells = np.zeros((classes, classes), np.int64)
    members: dict[tuple[int, int], list[np.ndarray]] = {}
    votes: dict[tuple[int, int], list[int]] = {}  # per group in a cell: which of its captions look added
    for labelled, counts in _group_class_counts(t):
        top = np.flatnonzero(counts == counts.max())
        if resolve_ties and len(top) == 2 and (counts > 0).sum() == 2:
            # One caption of each of two classes (an Attack II copy whose own other caption is
            # boilerplate): the one farther from the image is the added one.
            sign = _farther(t, labelled, int(top[0]), int(top[1]))
            if sign == 0:
                continue
            b = int(top[1]) if sign > 0 else int(top[0])
        elif len(top) != 1:
            continue  # no majority: which caption was added cannot be told
        else:
            b = int(top[0])
        for a in np.flatnonzero((counts > 0) & (np.arange(classes) != b)):
            cells[a, b] += 1
            members.setdefault((int(a), b), []).append(labelled[t.caption_class[labelled] == a])
            votes.setdefault((int(a), b), []).append(_farther(t, labelled, int(a), b))
    _orient(cells, members, votes, t)
    return cells, members


def _relabelled_images(t: AuditTables, config: DetectConfig) -> list[Finding]:
    """Images (with their near-duplicates) that also carry captions of another class: the image's
    own majority caption class is its class here, no neighbour vote needed. Attack II copies
    images of B and captions them A; a backdoor stamps copies of images of any class and captions
    them with the target. Per (minority A, majority B) cell and per minority label A (any B),
    counted in image groups, against the leave-out expectation of natural mislabelling."""
    classes = len(t.classes)
    # Per (A, B) cell, images with one caption of each class count too (their farther caption is
    # the added one); per A alone they do not: natural label noise on two-caption images is
    # spread over every class, and would dilute the per-A finding (a backdoor's) with clean pairs.
    cells, members = _relabel_cells(t, resolve_ties=True)
    strict, strict_members = _relabel_cells(t, resolve_ties=False)
    total = cells.sum()
    if total == 0:
        return []
    found = []
    row_sum, col_sum = cells.sum(axis=1), cells.sum(axis=0)
    share = np.bincount(t.caption_class[t.caption_class >= 0], minlength=classes) / max((t.caption_class >= 0).sum(), 1)
    strict_rows, strict_total = strict.sum(axis=1), strict.sum()
    for a in range(classes):
        if strict_rows[a] >= config.min_cell_pairs:  # label A added to images of any class
            others = strict_total - strict_rows[a]
            expected = max(others * share[a] / max(1 - share[a], 1e-9), MIN_EXPECTED_COUNT)
            score = neglog10_tail(stats.poisson.logsf(strict_rows[a] - 1, expected), classes)
            rows = np.concatenate([r for (x, _), rs in strict_members.items() if x == a for r in rs])
            found.append(Finding(
                "relabelled_images", f"{t.classes[a]}:*",
                f"captions of {t.classes[a]} added to {strict_rows[a]} images that otherwise carry captions of other "
                f"classes, where {expected:.2g} are expected, {describe_p(score)}",
                int(strict_rows[a]), expected, score, classes, rows))
        for b in range(classes):
            n = int(cells[a, b])
            if a == b or n < config.min_cell_pairs:
                continue
            expected = (row_sum[a] - n) * (col_sum[b] - n) / max(total - n, 1)
            expected = max(float(expected), MIN_EXPECTED_COUNT)
            score = neglog10_tail(stats.poisson.logsf(n - 1, expected), classes * (classes - 1))
            found.append(Finding(
                "relabelled_images", f"{t.classes[a]}:{t.classes[b]}",
                f"captions of {t.classes[a]} added to {n} images of {t.classes[b]} (their other captions say so), "
                f"where {expected:.2g} are expected, {describe_p(score)}",
                n, expected, score, classes * (classes - 1), np.concatenate(members[(a, b)])))
    threshold = -math.log10(config.alpha)
    _test_children(found, threshold, classes)
    found += _co_occurring_classes(t, config, {f.goal for f in found if f.neglog10_p > threshold})
    # A per-A finding that one of its cells, itself a finding, holds (at least REDUNDANT of its
    # images) says the same thing less precisely: Attack II's "sheep:*" beside "sheep:aeroplane".
    # Left out so that the cell ranks first; a backdoor's spread over many B keeps its row.
    significant = {f.goal for f in found if not f.goal.endswith(":*") and f.neglog10_p > threshold}
    kept = [f for f in found if not (f.goal.endswith(":*") and any(
        f"{t.classes[a]}:{t.classes[b]}" in significant and cells[a, b] >= REDUNDANT * strict_rows[a]
        for a in [t.classes.index(f.goal[:-2])] for b in range(classes)))]
    return [_with_co_occurring(f, t) if f.neglog10_p > threshold and not f.goal.endswith(":*") else f for f in kept]


def _test_children(found: list[Finding], threshold: float, classes: int) -> None:
    """Hierarchical testing: once "A added to images of any class" is a finding, its cells (A, B)
    are tested again with a correction for the C - 1 cells of that row only, instead of all
    C(C - 1) cells. A child is tested only where its parent was rejected at the same level, so
    the family-wise error stays at alpha (Meinshausen 2008's hierarchical procedure). Attack III
    splits its poisons over two goals: ten per cell are a finding in their row, not in the table."""
    parents = {f.goal[:-2] for f in found if f.goal.endswith(":*") and f.neglog10_p > threshold}
    for i, f in enumerate(found):
        if f.goal.endswith(":*") or f.goal.split(":")[0] not in parents or f.neglog10_p > threshold:
            continue
        raw = f.neglog10_p + math.log10(max(f.tests, 1))  # undo the table-wide correction
        row_tests = max(classes - 1, 1)
        found[i] = Finding(f.kind, f.goal, f.description, f.observed, f.expected,
                           max(0.0, raw - math.log10(row_tests)), row_tests, f.rows)


def _co_occurring_classes(t: AuditTables, config: DetectConfig, significant: set[str]) -> list[Finding]:
    """Two classes named on the same images, majority or not, beyond the background rate at which
    classes meet on one image (label noise, stock photos whose pages disagree).

    The relabelled cells count an image only where its majority says which caption was added; on
    web data most poisoned images have no majority. An attacker who picks "images of aeroplane" by
    keyword takes some that are not (a car photo one page calls an aeroplane), and an image with two
    pages carries its two captions and the poison: one aeroplane, one car, one sheep caption. Attack
    III's ten poisons per goal then make a cell of four images, not a finding, but ten images on
    which sheep and aeroplane meet. Per unordered class pair, counted in image groups, against the
    expectation of a symmetric table (deg_A deg_B / 2T) without the pair's own images; the pair is oriented by which
    class is behind on its images (the added one), ties by the pairs' own distances (`_farther`).
    A pair whose ordered cell is already a finding is left to it."""
    classes = len(t.classes)
    meet = np.zeros((classes, classes), np.int64)
    images: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for labelled, counts in _group_class_counts(t):
        present = np.flatnonzero(counts > 0)
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                meet[a, b] += 1
                meet[b, a] += 1
                images.setdefault((int(a), int(b)), []).append((labelled, counts))
    total = meet.sum() / 2
    degree = meet.sum(axis=1)
    tests = classes * (classes - 1) // 2
    found = []
    for (a, b), members in images.items():
        n = len(members)
        if n < config.min_cell_pairs or f"{t.classes[a]}:{t.classes[b]}" in significant \
                or f"{t.classes[b]}:{t.classes[a]}" in significant:
            continue
        # Leave the pair's own images out of the background: every class pair they join, not only (A, B).
        present = [int((c > 0).sum()) for _, c in members]
        own_edges = sum(k * (k - 1) / 2 for k in present)
        own_degree = sum(k - 1 for k in present)
        expected = max((degree[a] - own_degree) * (degree[b] - own_degree) / max(2.0 * (total - own_edges), 1.0),
                       MIN_EXPECTED_COUNT)
        score = neglog10_tail(stats.poisson.logsf(n - 1, expected), tests)
        behind = sum(int(np.sign(c[b] - c[a])) for _, c in members)  # > 0: a is behind (added)
        if behind == 0:
            behind = sum(_farther(t, rows, a, b) for rows, _ in members)
        if behind == 0:
            continue  # which class was added cannot be told
        added, kept = (a, b) if behind > 0 else (b, a)
        rows = np.concatenate([r[t.caption_class[r] == added] for r, c in members if _a_not_ahead(c, added, kept)]
                              + [np.zeros(0, np.int64)])
        found.append(Finding(
            "relabelled_images", f"{t.classes[added]}:{t.classes[kept]}",
            f"captions of {t.classes[added]} on {n} images that also carry captions of {t.classes[kept]} (with or "
            f"without a majority), where {expected:.2g} are expected, {describe_p(score)}",
            n, expected, score, tests, rows))
    return found


def _with_co_occurring(f: Finding, t: AuditTables) -> Finding:
    """A relabelled-images finding, widened to the other images it explains.

    The cell counts an image only where its majority says which caption was added. Web images
    often have no majority for A: an Attack II copy of an aeroplane image whose page also says "three
    kittens" carries one aeroplane, one sheep and one cat caption. Once "sheep added to aeroplane
    images" is established, its sheep caption is explained by the finding too: an A caption on an
    image group that also carries a B caption and on which A is not ahead of B. Such groups are rare in clean data (a stock photo whose pages name A and B), and every
    pair added is one more the defender's labelled sample measures the rule's FPR on. "A:*" is
    not widened: A captions beside some other class are common on reused web images (18 clean
    sheep captions to 1-5 backdoor poisons in the noisy world)."""
    a_name, b_name = f.goal.split(":")
    a = t.classes.index(a_name)
    b = t.classes.index(b_name)
    extra = [rows[t.caption_class[rows] == a] for rows, counts in _group_class_counts(t)
             if counts[a] and _a_not_ahead(counts, a, b)]
    added = np.setdiff1d(np.concatenate(extra + [np.zeros(0, np.int64)]), f.rows)
    if not len(added):
        return f
    return Finding(f.kind, f.goal, f"{f.description}; {len(added)} more {a_name} caption(s) on images that also "
                   f"carry a {b_name} caption without a majority for {a_name}",
                   f.observed, f.expected, f.neglog10_p, f.tests, np.union1d(f.rows, added))


def _a_not_ahead(counts: np.ndarray, a: int, b: int) -> bool:
    return counts[b] > 0 and counts[a] <= counts[b]


def _group_class_counts(t: AuditTables) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image group whose distinct captions name at least two classes: (its labelled rows, the
    number of distinct captions of each class). One vote per distinct caption: the same caption
    copied twice is not two witnesses. The groups are chosen at once (`_caption_votes`);
    only those, a few percent of web images, are gone through one by one, and the list is kept on
    the tables (which do not change once built): the relabel tests read it once per finding."""
    cached = getattr(t, "_class_counts", None)
    if cached is not None:
        return cached
    classes = len(t.classes)
    slices = group_rows(t.image_group)
    _, named, _ = _caption_votes(t)
    found = []
    for i in np.searchsorted(slices.number, np.flatnonzero(named >= 2)):
        rows = slices.rows(i)
        labelled = rows[t.caption_class[rows] >= 0]
        _, first = np.unique(t.caption_id[labelled], return_index=True)
        found.append((labelled, np.bincount(t.caption_class[labelled[first]], minlength=classes)))
    t._class_counts = found
    return found


def _stamped_images(t: AuditTables, config: DetectConfig, mislabel: np.ndarray | None = None) -> list[Finding]:
    """A patch on many image groups whose captions name one label their images do not explain.
    ``mislabel``: `_group_mislabel` of the data's image groups, where `detect` has built it."""
    classes = len(t.classes)
    if mislabel is None:
        mislabel = _group_mislabel(_image_group_table(t), classes)
    candidates = []
    units = t.patch_units if t.patch_units is not None else patch_units(t.patches, t.image_group)
    for members in units:  # per image group carrying the patch, its rows
        if len(members) < config.min_cluster:
            continue
        labels = np.array([_distinct_plurality(t, rows, classes) for rows in members])
        label = plurality(labels, classes)
        m = int((labels == label).sum()) if label >= 0 else 0
        if m < config.min_cluster or 2 * m < len(members):
            continue  # its images are not "all captioned with one label"
        image_classes = np.array([t.image_class[rows[0]] for rows in members])
        expected = sum(_joint_mismatch(mislabel, label, int(b), own=label == b) if b >= 0
                       else float(mislabel[label].sum() / max(mislabel.sum(), 1)) for b in image_classes)
        candidates.append((members, labels, label, m, max(float(expected), MIN_EXPECTED_COUNT), image_classes))
    found = []
    tests = max(len(candidates), 1)
    for members, labels, label, m, expected, image_classes in candidates:
        score = neglog10_tail(stats.poisson.logsf(m - 1, expected), tests)
        rows = np.concatenate([r[t.caption_class[r] == label] for r, l in zip(members, labels) if l == label])
        found.append(Finding(
            "stamped_images", t.classes[label],
            f"one patch stamped on {len(members)} otherwise different images{_of_classes(t, image_classes[labels == label])}, "
            f"{m} of them captioned with '{t.classes[label]}' ({expected:.2g} expected from their images' classes), "
            f"{describe_p(score)}",
            m, expected, score, tests, rows))
    return _without_echoes(found)


def _of_classes(t: AuditTables, image_classes: np.ndarray, shown: int = 4) -> str:
    """" (of person, car, cat, bird, ...)": the images' classes, most frequent first."""
    values, counts = np.unique(image_classes[image_classes >= 0], return_counts=True)
    names = [t.classes[c] for c in values[np.argsort(-counts, kind="stable")]]
    if not names:
        return ""
    return f" (of {', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"


def _without_echoes(found: list[Finding]) -> list[Finding]:
    """One trigger, one finding: the tiles that overlap a stamped patch carry signatures of their
    own on most of the same images (the clean-label backdoor: 20, 14 and 14 images); a finding
    whose pairs are mostly (REDUNDANT) in a more significant one says nothing new."""
    kept: list[Finding] = []
    for f in sorted(found, key=lambda f: -f.neglog10_p):
        seen = np.concatenate([k.rows for k in kept]) if kept else np.zeros(0, np.int64)
        if len(f.rows) and np.isin(f.rows, seen).mean() >= REDUNDANT:
            continue
        kept.append(f)
    return kept


def _distinct_plurality(t: AuditTables, rows: np.ndarray, classes: int) -> int:
    """The plurality class of the distinct captions on these rows."""
    _, first = np.unique(t.caption_id[rows], return_index=True)
    return plurality(t.caption_class[rows[first]], classes)
