"""Every evaluation formula in one place, each defined in the docstring of the function that
computes it. Coverage and board reconstruction are the supervised metrics of Karvonen et al. 2024
(the paper's section on measuring SAE quality with board-state properties); L0, explained
variance and loss recovered are the usual unsupervised ones.

Reads and writes no files. Used by train.py (L0, explained variance, dead features while
training; the LM's legal-move rate) and by evaluate.py (everything else), e.g.
python evaluate.py --game othello.

Supervised metrics, on SAE feature activations `acts` [N, F] and board-state-property (BSP)
labels `labels` bool [N, G] (N positions, F features, G BSP elements):
    coverage              best single-feature F1 per element, averaged, best threshold
    board_reconstruction  rebuild the board from features labelled on train, micro-F1 on test
    coverage_by_group, reconstruction_by_group, scores_by_group (both at once)
                          the same for several BSP sets at once (one firing pattern for all)
    linear_probe          supervised upper baseline: one logistic regression per element
                          (fit_linear_probe gives the probe itself)
    single_feature_scores one feature against every element (evaluate.py --feature)
Unsupervised metrics:
    l0, dead_fraction, explained_variance (+ streaming VarianceExplained), loss_recovered
The LM:
    legal_move_rate       fraction of greedy next moves that are legal

Threshold convention (as in the paper's code): `max_f` is feature f's largest activation over
the (train) split; features with max_f <= 0 are dead and never fire; at threshold fraction t
feature f fires at position n when acts[n, f] > t * max_f.  The comparison is done in float64.

Counting is done with one sparse matrix product per threshold over the 0/1 firing pattern
(float32 values, exact for counts below 2**24), so no loop runs over features. Each fast
function is held against a short brute-force version of its definition (plain Python loops) in
test_all.py: bf_coverage and bf_reconstruction in test_coverage_matches_brute_force,
test_reconstruction_matches_brute_force and test_by_group_scores_equal_each_set_alone_by_brute_force.

Two changes to the paper's metric code, both on purpose:
- Coverage averages over the elements that occur at least once in the split. The paper's code
  divides by every element of a BSP set, including ones that can never be true (pawns on ranks 1
  and 8), which caps its scores below 1; our coverage is higher for the same features.
- Board reconstruction chooses its threshold on the train split and reports the test split (the
  paper's code picks the threshold on the test split: reconstruction_details' 'test_f1' gives
  that choice back as max(test_f1)).
Variance explained is also taken over the whole evaluation set (the paper's code used 25
activations).
"""
import warnings

import chess

import torch
import torch.nn.functional as F

import data as D

DEFAULT_THRESHOLDS = tuple(i / 10 for i in range(10))  # 0.0, 0.1, ..., 0.9


# ---------------------------------------------------------------------------------------------
# F1 helpers
# ---------------------------------------------------------------------------------------------

def f1_from_counts(tp, n_pred, n_true):
    """F1 = 2 TP / (#predicted + #true) = 2 TP / (2 TP + FP + FN), elementwise; 0 where both
    counts are 0.  Tensors (any broadcastable shapes) in, float64 tensor out."""
    tp, n_pred, n_true = (torch.as_tensor(v, dtype=torch.float64) for v in (tp, n_pred, n_true))
    denom = n_pred + n_true
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(denom))


def micro_f1(pred, labels) -> float:
    """Micro-F1 of bool predictions vs bool labels, pooling TP/FP/FN over every entry.
    pred, labels: bool [N, G].  Returns 0.0 when nothing is predicted and nothing is true."""
    count = torch.count_nonzero  # exact int64 counts, much faster than bool.sum() on CPU
    return f1_from_counts(count(pred & labels), count(pred), count(labels)).item()


def per_element_f1(pred, labels):
    """F1 per element (column).  pred, labels: bool [N, G] -> float64 [G] (0 where an element
    is never predicted and never true)."""
    count = torch.count_nonzero
    return f1_from_counts(count(pred & labels, dim=0), count(pred, dim=0), count(labels, dim=0))


# ---------------------------------------------------------------------------------------------
# Firing patterns (sparse)
# ---------------------------------------------------------------------------------------------

def _check_thresholds(thresholds):
    """Thresholds as a sorted tuple of floats >= 0 (default 0.0, 0.1, ..., 0.9)."""
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    thresholds = tuple(sorted(set(float(t) for t in thresholds)))
    assert 0 < len(thresholds) < 256 and thresholds[0] >= 0, "need 1..255 thresholds, all >= 0"
    return thresholds


def _firing_entries(acts, max_f, thresholds):
    """The sparse firing pattern of acts [N, F] at every threshold, in one structure.

    Only entries with act > 0 on a live feature (max_f > 0) can fire at some t >= 0.  For each
    such entry, level = number of thresholds it passes (act > t * max_f, in float64).  As the
    thresholds are sorted ascending, the entry fires at thresholds[k] iff level > k.
    Returns (rows [nnz], cols [nnz], level [nnz]) sorted by row (position) then column.
    """
    can_fire = (acts > 0) & (max_f > 0)  # [N, F] bool
    rows, cols = can_fire.nonzero(as_tuple=True)  # [nnz] each, row-major order
    vals = acts[rows, cols].double()  # [nnz]
    max_at = max_f.double()[cols]  # [nnz]
    level = torch.zeros_like(rows, dtype=torch.uint8)
    for t in thresholds:
        level += vals > t * max_at
    return rows, cols, level


def _by_feature(entries):
    """The same entries sorted by column (feature) then row."""
    rows, cols, level = entries
    cols, order = torch.sort(cols, stable=True)
    return rows[order], cols, level[order]


def _ones_csr(major, minor, shape):
    """Sparse CSR matrix of ones with entries (major[i], minor[i]); `major` must be sorted."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=major.device)
    crow[1:] = torch.bincount(major, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore")
        ones = torch.ones(minor.numel(), device=minor.device)
        return torch.sparse_csr_tensor(crow, minor, ones, size=shape, check_invariants=False)


def _counts_per_threshold(entries_by_feature, labels_f, n_feat, n_thresholds):
    """Yield (k, tp, n_fire) for k = n_thresholds-1 down to 0, where at threshold k
        tp[f, g]  = #positions where f fires and g is true   (= fires^T @ labels)  [F, G]
        n_fire[f] = #positions where f fires                                        [F]
    as float64.  Entries fire at k iff level > k, so the counts at k are those at k + 1 plus
    the entries with level == k + 1: each entry enters one sparse matmul only once. Where those
    entries fill over a sixteenth of the [F, N] pattern (a dense dictionary: probabilities, which
    are all > 0, fire everywhere at t = 0), a dense matmul does the same sum faster. On the CPU
    the labels enter as a sparse matrix too: measured on 2 cores, sparse x sparse is as fast as
    sparse x dense for labels a third dense and up to 6x faster for labels 2% dense.
    labels_f: float32 [N, G] (0/1; float32 sums are exact below 2**24).
    tp and n_fire are updated in place between yields: copy them to keep them."""
    rows, cols, level = entries_by_feature
    n_pos = labels_f.shape[0]
    tp = torch.zeros(n_feat, labels_f.shape[1], dtype=torch.float64, device=labels_f.device)
    n_fire = torch.zeros(n_feat, dtype=torch.float64, device=labels_f.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta state"
        warnings.simplefilter("ignore")
        labels_csr = labels_f.to_sparse_csr() if labels_f.device.type == 'cpu' else None
    for k in reversed(range(n_thresholds)):
        new = (level == k + 1).nonzero().squeeze(1)  # entries whose highest passed t is k
        r, c = rows[new], cols[new]
        if len(new) > n_feat * n_pos / 16:
            fires = torch.zeros(n_feat, n_pos, device=labels_f.device)
            fires[c, r] = 1.0
            tp += fires @ labels_f  # [F, N] @ [N, G], exact integers
        elif labels_csr is not None:
            tp += (_ones_csr(c, r, (n_feat, n_pos)) @ labels_csr).to_dense()
        else:
            tp += _ones_csr(c, r, (n_feat, n_pos)) @ labels_f
        n_fire += torch.bincount(c, minlength=n_feat)
        yield k, tp, n_fire


def _board_counts(entries, k, feature_labels, labels):
    """Counts of the predicted boards at threshold k against labels bool [N, G], per element:
    (TP [G], #predicted [G]) int64. The predicted board at position n is the OR of the labels
    of all features firing there (entries sorted by row; feature_labels bool [F, G]).
    Only the features with a label and the elements some feature is labelled with are counted
    (no other element is ever predicted), which is most of the work saved for a dictionary
    that labels few elements."""
    rows, cols, level = entries
    labelled = feature_labels.any(1)  # [F]
    named = feature_labels.any(0)  # [G]
    tp = torch.zeros(labels.shape[1], dtype=torch.int64, device=labels.device)
    n_pred = torch.zeros_like(tp)
    if named.any():
        fire = ((level > k) & labelled[cols]).nonzero().squeeze(1)  # firing entries of labelled f
        fires = _ones_csr(rows[fire], cols[fire], (labels.shape[0], feature_labels.shape[0]))  # [N, F]
        pred = (fires @ feature_labels[:, named].float()) > 0  # [N, G'] from counts of labels
        tp[named] = torch.count_nonzero(pred & labels[:, named], dim=0)
        n_pred[named] = torch.count_nonzero(pred, dim=0)
    return tp, n_pred


# ---------------------------------------------------------------------------------------------
# Coverage
# ---------------------------------------------------------------------------------------------

def group_slices(group_sizes, n_el):
    """Column slices of the BSP sets laid side by side in one label matrix."""
    assert sum(group_sizes) == n_el and all(s > 0 for s in group_sizes), "group sizes must sum to G"
    ends = torch.tensor(group_sizes).cumsum(0).tolist()
    return [slice(e - s, e) for s, e in zip(group_sizes, ends)]


def _best_f1_per_threshold(acts, labels, thresholds):
    """Yield (k, f1_best [G] float64, feature [G] int64) for k = n_thresholds-1 down to 0: per
    element g, the best F1 over features f of "f fires at thresholds[k]" against g, and that f
    (dead features never fire, so their F1 is 0)."""
    acts, labels = acts.float(), labels.bool()
    n_feat = acts.shape[1]
    max_f = acts.amax(0)  # [F]
    entries = _by_feature(_firing_entries(acts, max_f, thresholds))
    n_true = torch.count_nonzero(labels, dim=0).double()  # [G]
    for k, tp, n_fire in _counts_per_threshold(entries, labels.float(), n_feat, len(thresholds)):
        yield k, *_best_f1(tp, n_fire, n_true)


def _best_f1(tp, n_fire, n_true):
    """Per element g, the best F1 over features f, from tp [F, G], n_fire [F] and n_true [G]
    (float64): (f1_best [G], the feature achieving it [G]).
    F1 = 2 TP / (n_fire + n_true); absent elements get a dummy denominator (excluded by callers)."""
    half_f1 = tp / (n_fire[:, None] + n_true.clamp_min(1)[None, :])  # [F, G]
    return 2 * half_f1.amax(0), half_f1.argmax(0)


def _set_means(f1_best, present, slices):
    """The mean of f1_best over the present elements of each set (0.0 for a set with none)."""
    return [f1_best[s][present[s]].mean().item() if present[s].any() else 0.0 for s in slices]


def coverage_details(acts, labels, thresholds=None) -> dict:
    """Coverage with the per-threshold detail (see `coverage` for the formula).

    Returns {'coverage': float, 'threshold': float (the t achieving it, lowest on ties),
             'thresholds': tuple (sorted), 'per_threshold': list[float] (C(t) per threshold),
             'element_f1': float64 [G] best F1 per element at the chosen t (nan if absent),
             'element_feature': int64 [G] the feature achieving it (-1 if absent)}.
    """
    thresholds = _check_thresholds(thresholds)
    present = labels.bool().any(0)  # [G] elements that occur at least once
    per_t, best = [0.0] * len(thresholds), None
    for k, f1_best, feat_best in _best_f1_per_threshold(acts, labels, thresholds):
        per_t[k] = f1_best[present].mean().item() if present.any() else 0.0
        if best is None or per_t[k] >= best[0]:  # k runs downwards: ties go to the lowest t
            best = (per_t[k], thresholds[k], f1_best, feat_best)
    score, t, f1_best, feat_best = best
    return {"coverage": score, "threshold": t, "thresholds": thresholds, "per_threshold": per_t,
            "element_f1": torch.where(present, f1_best, torch.full_like(f1_best, float("nan"))),
            "element_feature": torch.where(present, feat_best, torch.full_like(feat_best, -1))}


def coverage_by_group(acts, labels, group_sizes, thresholds=None) -> list:
    """`coverage` of several BSP sets at once, sharing one firing pattern (much faster than one
    call per set). labels: bool [N, G], the sets' columns side by side; group_sizes: their widths
    (summing to G). Returns [coverage of set i], each with its own best t, exactly as
    coverage(acts, labels[:, set i]) would give (test_by_group_scores_equal_each_set_alone_by_brute_force)."""
    thresholds = _check_thresholds(thresholds)
    slices = group_slices(group_sizes, labels.shape[1])
    present = labels.bool().any(0)  # [G]
    per_t = [[0.0] * len(thresholds) for _ in slices]
    for k, f1_best, _ in _best_f1_per_threshold(acts, labels, thresholds):
        for i, c in enumerate(_set_means(f1_best, present, slices)):
            per_t[i][k] = c
    return [max(c) for c in per_t]


def coverage(acts, labels, thresholds=None) -> float:
    """Coverage of a set of BSP elements by single features, on one split.

    acts: float [N, F] feature activations; labels: bool [N, G] BSP elements.
    max_f = max_n acts[n, f]; features with max_f <= 0 are dead and skipped.
    For each t in thresholds (default 0.0, 0.1, ..., 0.9):
        fires_f(n) = acts[n, f] > t * max_f
        F1(f, g)   = 2 TP / (2 TP + FP + FN) of the classifier fires_f against labels[:, g]
        C(t)       = mean over elements g occurring at least once of max_f F1(f, g)
    coverage = max_t C(t).   (0.0 if no element occurs; best F1 is 0 if no feature is live.)
    A high coverage says: for most elements of the set, some single feature is a good classifier
    of it. Brute-force definition: bf_coverage in test_all.py (test_coverage_matches_brute_force).
    """
    return coverage_details(acts, labels, thresholds)["coverage"]


def single_feature_scores(acts, labels, thresholds=None) -> dict:
    """How well one feature classifies each element: for each element g, the threshold t (of the
    grid, as a fraction of max_f = max acts) with the best F1 of "acts > t * max_f" against g.
    acts: float [N]; labels: bool [N, G].
    Returns {'f1', 'precision', 'recall', 'threshold'}: float64 [G] each, at each element's best t
    (precision = TP / fired, recall = TP / true; 0 where undefined). Brute force:
    test_single_feature_scores_match_brute_force."""
    thresholds = _check_thresholds(thresholds)
    acts, labels = acts.double(), labels.bool()
    max_f = acts.max()
    n_true = torch.count_nonzero(labels, dim=0).double()  # [G]
    best = None
    for t in thresholds:
        fires = (acts > t * max_f) if max_f > 0 else torch.zeros_like(acts, dtype=torch.bool)  # [N]
        tp = torch.count_nonzero(labels & fires[:, None], dim=0).double()  # [G]
        n_fire = torch.count_nonzero(fires).double()
        f1 = f1_from_counts(tp, n_fire, n_true)
        cur = {'f1': f1, 'precision': tp / n_fire.clamp_min(1), 'recall': tp / n_true.clamp_min(1),
               'threshold': torch.full_like(f1, t)}
        if best is None:
            best = cur
        else:
            better = f1 > best['f1']  # strict: ties keep the lower threshold
            best = {k: torch.where(better, cur[k], best[k]) for k in best}
    return best


# ---------------------------------------------------------------------------------------------
# Board reconstruction
# ---------------------------------------------------------------------------------------------

def _reconstruction_counts(acts_train, labels_train, acts_test, labels_test, thresholds,
                           min_precision, min_true_positives):
    """Yield (k, feature_labels bool [F, G], train counts, test counts, (tp, n_fire)) for
    k = n-1 down to 0, where counts = (TP [G], #predicted [G], #true [G]) per element of the
    predicted boards at threshold k (int64; sum them over a set's columns for its micro-F1) and
    (tp [F, G], n_fire [F]) are the train split's single-feature counts that label the features
    (_counts_per_threshold's, so coverage on train can share them)."""
    acts_train, acts_test = acts_train.float(), acts_test.float()
    labels_train, labels_test = labels_train.bool(), labels_test.bool()
    n_feat = acts_train.shape[1]
    max_f = acts_train.amax(0)  # [F], from train only
    train = _firing_entries(acts_train, max_f, thresholds)  # sorted by position
    test = _firing_entries(acts_test, max_f, thresholds)  # same max_f, same thresholds
    count = torch.count_nonzero
    n_true = (count(labels_train, dim=0), count(labels_test, dim=0))
    counts = _counts_per_threshold(_by_feature(train), labels_train.float(), n_feat, len(thresholds))
    for k, tp, n_fire in counts:  # tp [F, G], n_fire [F] on train
        precision = tp / n_fire.clamp_min(1)[:, None]  # P(g | f fires), [F, G]
        lab = (precision >= min_precision) & (tp >= min_true_positives)  # [F, G] bool
        out = [(*_board_counts(entries, k, lab, labels), n)
               for entries, labels, n in ((train, labels_train, n_true[0]), (test, labels_test, n_true[1]))]
        yield k, lab, out[0], out[1], (tp, n_fire)


def _best_on_train(train_f1):
    """The threshold index with the best train micro-F1 (the lowest t on ties)."""
    return max(range(len(train_f1)), key=lambda k: (train_f1[k], -k))


def _micro_f1_of(counts, s=slice(None)):
    """Micro-F1 from per-element (TP, #predicted, #true) counts, pooled over the columns s."""
    return f1_from_counts(*(c[s].sum() for c in counts)).item()


def reconstruction_details(acts_train, labels_train, acts_test, labels_test, thresholds=None,
                           min_precision=0.95, min_true_positives=10) -> dict:
    """Board reconstruction with per-threshold detail (see `board_reconstruction`).

    Returns {'f1': float (test micro-F1 at the chosen t), 'threshold': float (chosen on train),
             'thresholds': tuple (sorted), 'train_f1': list[float], 'test_f1': list[float]
             (micro-F1 at each threshold), 'feature_labels': bool [F, G] at the chosen t}.
    ('test_f1' lets one reproduce the paper's choice of t on test: max(test_f1).)
    """
    thresholds = _check_thresholds(thresholds)
    n_thr = len(thresholds)
    train_f1, test_f1, feature_labels = [0.0] * n_thr, [0.0] * n_thr, [None] * n_thr
    for k, lab, train, test, _ in _reconstruction_counts(acts_train, labels_train, acts_test, labels_test,
                                                         thresholds, min_precision, min_true_positives):
        train_f1[k], test_f1[k], feature_labels[k] = _micro_f1_of(train), _micro_f1_of(test), lab
    i = _best_on_train(train_f1)
    return {"f1": test_f1[i], "threshold": thresholds[i], "thresholds": thresholds,
            "train_f1": train_f1, "test_f1": test_f1, "feature_labels": feature_labels[i]}


def reconstruction_by_group(acts_train, labels_train, acts_test, labels_test, group_sizes,
                            thresholds=None, min_precision=0.95, min_true_positives=10) -> list:
    """`board_reconstruction` of several BSP sets at once, sharing one firing pattern: labels_*
    bool [N_*, G] hold the sets' columns side by side, group_sizes their widths. A feature's label
    for one element never depends on other elements, so each set's score (its own micro-F1, its own
    t chosen on train) is exactly board_reconstruction on its columns alone. Returns [test F1]."""
    return scores_by_group(acts_train, labels_train, acts_test, labels_test, group_sizes, thresholds,
                           min_precision, min_true_positives)[1]


def scores_by_group(acts_train, labels_train, acts_test, labels_test, group_sizes,
                    thresholds=None, min_precision=0.95, min_true_positives=10):
    """coverage_by_group on the train split and reconstruction_by_group, together: both count
    the same train firing pattern against the same labels, so it is counted once (what
    evaluate.py scores for every dictionary). Returns ([coverage per set], [test F1 per set]),
    equal to the two calls (test_by_group_scores_equal_each_set_alone_by_brute_force)."""
    thresholds = _check_thresholds(thresholds)
    slices = group_slices(group_sizes, labels_train.shape[1])
    present = labels_train.bool().any(0)  # [G]
    n_true = torch.count_nonzero(labels_train.bool(), dim=0).double()  # [G]
    cov = [[0.0] * len(thresholds) for _ in slices]
    train_f1 = [[0.0] * len(thresholds) for _ in slices]
    test_f1 = [[0.0] * len(thresholds) for _ in slices]
    for k, _, train, test, (tp, n_fire) in _reconstruction_counts(acts_train, labels_train, acts_test, labels_test,
                                                                  thresholds, min_precision, min_true_positives):
        for i, c in enumerate(_set_means(_best_f1(tp, n_fire, n_true)[0], present, slices)):
            cov[i][k] = c
        for i, s in enumerate(slices):
            train_f1[i][k], test_f1[i][k] = _micro_f1_of(train, s), _micro_f1_of(test, s)
    return [max(c) for c in cov], [te[_best_on_train(tr)] for tr, te in zip(train_f1, test_f1)]


def board_reconstruction(acts_train, labels_train, acts_test, labels_test,
                         thresholds=None) -> float:
    """Board reconstruction micro-F1 on the test split, threshold chosen on the train split.

    acts_*: float [N_*, F]; labels_*: bool [N_*, G].  max_f comes from the train split.
    For each t in thresholds (default 0.0, 0.1, ..., 0.9), with fires_f(n) = acts[n,f] > t*max_f:
        on train, feature f gets label g iff P(g | f fires) >= 0.95 and TP(f, g) >= 10
        predicted board at n: pred[n, g] = OR over firing features f of label(f, g)
        micro-F1 = 2 TP / (2 TP + FP + FN), pooled over all positions x elements
    t* = argmax_t micro-F1 on train (lowest t on ties); returns micro-F1 on test at t*.
    A high score says: the features that fire at a position, read as a dictionary of precise
    one-element detectors, rebuild that position's board. Brute-force definition:
    bf_reconstruction in test_all.py (test_reconstruction_matches_brute_force).
    """
    return reconstruction_details(acts_train, labels_train, acts_test, labels_test,
                                  thresholds)["f1"]


# ---------------------------------------------------------------------------------------------
# Unsupervised metrics
# ---------------------------------------------------------------------------------------------

def l0(f) -> float:
    """L0 = mean over rows of the number of non-zero features.  f: [..., F].
    (test_l0_and_dead_fraction)"""
    return (f != 0).sum(-1, dtype=torch.float64).mean().item()


def dead_fraction(acts) -> float:
    """Fraction of features that never fire (act > 0) anywhere in the set.  acts: [..., F]."""
    alive = (acts > 0).reshape(-1, acts.shape[-1]).any(0)  # [F]
    return 1.0 - alive.double().mean().item()


class VarianceExplained:
    """Streaming fraction of variance explained, over the whole set:
        FVE = 1 - sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2
    mean(x) is the mean over the whole set (per dimension).  float64 accumulators; the total
    variance is merged batch by batch (Chan et al.) so it stays exact-ish for large means.
    Usage: ve = VarianceExplained(); ve.update(x, x_hat) per batch; ve.compute() -> float.
    x, x_hat: [..., d] (any leading shape).
    """

    def __init__(self):
        self.n = 0
        self.mean = None  # [d] float64
        self.m2 = None  # [d] float64, sum of squared deviations from self.mean
        self.sse = None  # [] float64, sum ||x - x_hat||^2

    @torch.no_grad()
    def update(self, x, x_hat):
        x = x.reshape(-1, x.shape[-1]).double()  # [n, d]
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).double()  # [n, d]
        n_b = x.shape[0]
        if n_b == 0:
            return
        sse = (x - x_hat).pow(2).sum()
        mean_b = x.mean(0)  # [d]
        m2_b = (x - mean_b).pow(2).sum(0)  # [d]
        if self.n == 0:
            self.n, self.mean, self.m2, self.sse = n_b, mean_b, m2_b, sse
            return
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.n * n_b / n)
        self.sse = self.sse + sse
        self.n = n

    def compute(self) -> float:
        """1 - SSE / total variance; nan if nothing was seen or x is constant."""
        if self.n == 0:
            return float("nan")
        total = self.m2.sum().item()
        return 1.0 - self.sse.item() / total if total > 0 else float("nan")


def explained_variance(x, x_hat) -> float:
    """FVE = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over the whole set (float64): the
    fraction of the activations' variance that the reconstruction explains (1: perfect, 0: no
    better than the mean). x, x_hat: [..., d].  Same numbers as one VarianceExplained update.
    (test_explained_variance)"""
    ve = VarianceExplained()
    ve.update(x, x_hat)
    return ve.compute()


@torch.no_grad()
def sae_scores(sae, x, batch_size=8192, reconstruction=False):
    """The unsupervised scores of one SAE on activations x (N, d), encoded in batches:
    {'l0': l0(f), 'explained_variance': explained_variance(x, x_hat), 'dead_fraction':
    dead_fraction(f)} with (x_hat, f) = sae(x). train.py logs these and saves them in each SAE
    file ('final'); evaluate.py reports them. reconstruction: return (scores, x_hat (N, d) float
    on x's device), so a caller that needs x_hat too (loss recovered) encodes x only once."""
    was_training = sae.training
    sae.eval()
    device = next(sae.parameters()).device
    fve, n_active, fired, x_hats = VarianceExplained(), 0, None, []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device)
        x_hat, f = sae(xb)
        fve.update(xb, x_hat)
        n_active += torch.count_nonzero(f).item()
        fired = (f > 0).any(0) if fired is None else fired | (f > 0).any(0)  # as dead_fraction
        if reconstruction:
            x_hats.append(x_hat.float().to(x.device))
    sae.train(was_training)
    explained = fve.compute()
    scores = {'l0': n_active / len(x), 'explained_variance': explained,
              'dead_fraction': 1.0 - fired.double().mean().item()}
    return (scores, torch.cat(x_hats)) if reconstruction else scores


# ---------------------------------------------------------------------------------------------
# Loss recovered
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def cross_entropies(model, tokens, layer, reconstruct=None, batch_size=64, reference=None, resid=None) -> dict:
    """Token-weighted mean next-token cross-entropy over all non-pad targets, three ways:
        'clean': the unmodified model
        'zero':  residual stream after block `layer` replaced by zeros
        'sae':   residual stream after block `layer` replaced by reconstruct(resid) (only when
                 reconstruct is given)
    tokens: int64 [N, T+1]; x = tokens[:, :-1], y = tokens[:, 1:].  reconstruct maps
    (B, T, d) -> (B, T, d), or is the replaced stream itself, (N, T, d), when the caller has it.
    Sums and counts are accumulated in float64 across batches.
    reference: an earlier result for the same model, tokens and layer; its 'clean' and 'zero'
    are reused instead of recomputed (they do not depend on the SAE: evaluate.py scores many).
    resid: the residual stream after block `layer` on tokens[:, :-1], (N, T, d), when the caller
    already has it (evaluate.py keeps it per model): blocks 0..layer are then not rerun.
    Returns {'clean': float, 'zero': float, 'sae': float}.
    """
    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_id", None)
    ignore = -100 if pad_id is None else pad_id
    ways = ([] if reference else ["clean", "zero"]) + (["sae"] if reconstruct is not None else [])
    sums = dict.fromkeys(ways, 0.0)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for i in range(0, tokens.shape[0], batch_size):
            batch = tokens[i:i + batch_size].to(device)
            x, y = batch[:, :-1], batch[:, 1:]  # [B, T] each

            def ce_sum(logits):  # logits [B, T, V] -> summed CE over non-pad targets
                v = logits.shape[-1]
                return F.cross_entropy(logits.float().reshape(-1, v), y.reshape(-1),
                                       ignore_index=ignore, reduction="sum").double().item()

            r = model.residual(x, layer) if resid is None else resid[i:i + batch_size].to(device)  # [B, T, d]
            if "clean" in sums:
                sums["clean"] += ce_sum(model.forward_from(r, layer)[0])
                sums["zero"] += ce_sum(model.forward_from(torch.zeros_like(r), layer)[0])
            if "sae" in sums:
                r_hat = reconstruct(r) if callable(reconstruct) else reconstruct[i:i + batch_size].to(device)
                sums["sae"] += ce_sum(model.forward_from(r_hat, layer)[0])
            count += int((y != ignore).sum())
    finally:
        model.train(was_training)
    out = {k: (s / count if count else float("nan")) for k, s in sums.items()}
    return {**({k: reference[k] for k in ("clean", "zero")} if reference else {}), **out}


def loss_recovered(model, tokens, layer, reconstruct, batch_size=64, reference=None, resid=None) -> float:
    """Loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), with the CEs of
    `cross_entropies` (1 = reconstruction as good as the clean model, 0 = as bad as zeros;
    reference, resid: as there). SAELens calls it ce_loss_score, the name results.json uses.
    nan where zeroing the stream does not raise the loss (CE_zero <= CE_clean, as on a
    random-init model): there is no loss to recover, and the ratio of two small differences
    would read as a score (above 1 for an SAE worse than the clean model).
    (test_loss_recovered_identity_and_zero)"""
    ce = cross_entropies(model, tokens, layer, reconstruct, batch_size, reference, resid)
    gap = ce["zero"] - ce["clean"]
    return (ce["zero"] - ce["sae"]) / gap if gap > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# Linear probe (supervised baseline)
# ---------------------------------------------------------------------------------------------

def fit_linear_probe(x_train, labels_train, steps=100, lr=0.1, weight_decay=0.0, batch_size=None, seed=0,
                     chunk=1024):
    """One logistic-regression probe per BSP element, trained jointly as one linear layer.

    x_train: float [N, d] activations; labels_train: bool [N, G].  Inputs are whitened with the
    train set's mean and covariance: z = (x - mean) S, S [d, d] = U diag(1 / sqrt(lambda)) where
    cov = U diag(lambda) U^T (eigenvalues floored at 1e-6 of the largest), so that z's covariance
    is the identity. Any linear probe on x is one on z, so the fit's optimum is unchanged; but a
    residual stream has a few directions of large variance that make gradient steps crawl along
    the rest, and whitening removes them: on the chess model 100 whitened steps reach the micro-F1
    of 1000 steps on standardised inputs (README).  logits = z W + b, W [d, G];
    loss = mean BCE-with-logits over N x G;
    AdamW for `steps` steps (full batch if batch_size is None, else random minibatches), from
    zero weights and the base-rate bias. The gradient is written out rather than left to
    autograd, which halves the time of a step: d loss / d logits = (sigmoid(logits) - y) / (N G),
    so grad W = z^T (sigmoid(logits) - y) / (N G) and grad b = its column sums. It is summed over
    blocks of `chunk` rows, so each block's (chunk, G) intermediate stays in the CPU's cache.
    Returns logits(x) -> float [N', G]: the trained probe as a function of raw activations."""
    x_train = x_train.float()
    y_train = labels_train.float().to(x_train.device)  # [N, G]
    d, n_el = x_train.shape[1], y_train.shape[1]
    mean = x_train.mean(0)  # [d]
    centred = x_train - mean  # [N, d]
    cov = torch.cov(centred.T, correction=0).reshape(d, d)  # [d, d]
    eigval, eigvec = torch.linalg.eigh(cov.double().cpu())  # in float64 on the CPU (any device's x)
    white = (eigvec / eigval.clamp_min(1e-6 * eigval.max().clamp_min(1e-30)).sqrt()).float().to(x_train.device)
    z_train = centred @ white  # [N, d], covariance the identity
    # convex problem: start from zero weights and the base-rate bias
    W = torch.zeros(d, n_el, device=x_train.device)  # [d, G]
    rate = y_train.mean(0).clamp(1e-4, 1 - 1e-4)
    b = torch.log(rate / (1 - rate))  # [G]
    opt = torch.optim.AdamW([W, b], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if batch_size is None:
            zb, yb = z_train, y_train
        else:
            idx = torch.randint(0, z_train.shape[0], (batch_size,), generator=gen).to(x_train.device)
            zb, yb = z_train[idx], y_train[idx]
        W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
        for i in range(0, zb.shape[0], chunk):
            zc = zb[i:i + chunk]  # [c, d]
            g = torch.addmm(b, zc, W).sigmoid_().sub_(yb[i:i + chunk])  # (n G) x d loss / d logits, [c, G]
            W.grad.addmm_(zc.T, g)
            b.grad += g.sum(0)
        W.grad.div_(yb.numel())
        b.grad.div_(yb.numel())
        opt.step()

    @torch.no_grad()
    def logits(x):
        return torch.addmm(b, (x.float() - mean) @ white, W)
    return logits


def probe_scores(logits_test, labels_test) -> dict:
    """Scores of probe logits [N, G] against bool labels [N, G]; element g is predicted at n iff
    its logit > 0:
        'f1_micro': micro-F1 pooled over positions x elements
        'accuracy': fraction of positions x elements predicted correctly
        'f1_mean':  mean per-element F1 over elements that occur in the labels
    Returns {'f1_micro': float, 'accuracy': float, 'f1_mean': float}."""
    pred = logits_test > 0  # [N, G]
    labels_test = labels_test.bool()
    present = labels_test.any(0)  # [G]
    f1_el = per_element_f1(pred, labels_test)
    return {"f1_micro": micro_f1(pred, labels_test),
            "accuracy": (pred == labels_test).double().mean().item(),
            "f1_mean": f1_el[present].mean().item() if present.any() else 0.0}


def linear_probe(x_train, labels_train, x_test, labels_test, steps=100, lr=0.1,
                 weight_decay=0.0, batch_size=None, seed=0) -> dict:
    """The supervised upper baseline: fit_linear_probe on train, probe_scores on test.
    Returns {'f1_micro': float, 'accuracy': float, 'f1_mean': float}."""
    logits = fit_linear_probe(x_train, labels_train, steps, lr, weight_decay, batch_size, seed)
    return probe_scores(logits(x_test), labels_test)


# ---------------------------------------------------------------------------------------------
# The LM itself
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def legal_move_rate(model, game, tokens, device='cpu', batch_size=64, max_move_chars=8) -> float:
    """Fraction of the model's greedy next moves that are legal, on held-out games `tokens` [N, T+1].
    Othello: at every position whose next move exists, the top-1 token must be a legal square
      for the player to move next (passes handled by data.othello_states).
    Chess: at every move boundary (where a move's SAN begins) of the first T - max_move_chars
      characters, the model greedily writes up to max_move_chars characters, until a space;
      the text must be a legal move in the position the prefix reached, checked with
      python-chess (data.legal_move_text). Decoded with a key/value cache, batched over games.
    legal_move_rate = legal predictions / predictions."""
    model.eval()
    tokens = tokens.long()
    if game == 'othello':
        x, y = tokens[:, :-1], tokens[:, 1:]
        legal = D.othello_states(x)['legal']  # (N, T, 64) for the player to move next
        n_legal = n_total = 0
        for i in range(0, len(x), batch_size):
            # the plain blocks: under no_grad, a compiled model's blocks would compile again
            pred = model(x[i:i + batch_size].to(device), compiled=False)[0].argmax(-1).cpu()  # (b, T)
            has_next = y[i:i + batch_size] != D.OTHELLO_PAD
            square = torch.as_tensor(D.OTHELLO_SQUARES + [0])[pred]  # pad -> a dummy square
            ok = legal[i:i + batch_size].gather(-1, square[..., None])[..., 0] & (pred != D.OTHELLO_PAD)
            n_legal += (ok & has_next).sum().item()
            n_total += has_next.sum().item()
        return n_legal / max(n_total, 1)
    # chess: greedy decoding from every move boundary of a batch of games. One forward pass per
    # game keeps the keys and values of every position (model.prefill); then every boundary of
    # a game is a continuation of it, and all are decoded together, one character per step
    # (model.decode_step), as if the model were rerun on the prefix and what it has written.
    T = model.config.block_size
    space = D.CHESS_CHARS.index(' ')  # a move ends at a space
    n_legal = n_rows = 0
    for i in range(0, len(tokens), batch_size):
        games = tokens[i:i + batch_size, :T]  # (G, T)
        texts = [D.decode_chess(row) for row in games]
        bounds = [D.move_boundaries(text[:T - max_move_chars]) for text in texts]
        R = max(len(bs) for bs in bounds)
        start = torch.ones(len(games), R, dtype=torch.long)  # (G, R) where each continuation begins
        real = torch.zeros(len(games), R, dtype=torch.bool)  # False: padding, never scored
        for g, bs in enumerate(bounds):
            start[g, :len(bs)], real[g, :len(bs)] = torch.tensor(bs, dtype=torch.long), True
        logits, cache = model.prefill(games.to(device))
        pos = start.to(device)
        nxt = logits[torch.arange(len(games), device=device)[:, None], pos - 1].argmax(-1)  # (G, R)
        written = torch.full((len(games), R, max_move_chars), space)  # (G, R, max_move_chars)
        done = ~real.to(device)
        for s in range(max_move_chars):
            written[:, :, s] = torch.where(done, space, nxt).cpu()
            done |= nxt == space
            if done.all() or s + 1 == max_move_chars:
                break
            nxt = model.decode_step(nxt, pos, cache).argmax(-1)
            pos = pos + 1
        # replay each game once, checking the move written at each of its boundaries
        for g, (text, bs) in enumerate(zip(texts, bounds)):
            board = chess.Board()
            moves = D.transcript_to_moves(text, as_moves=True)
            for k in range(len(bs)):  # boundary k: the position after the game's first k moves
                move_text = D.decode_chess(written[g, k]).split(' ', 1)[0]
                n_legal += D.legal_move_text(board, move_text)
                if k < len(moves):
                    board.push(moves[k])
            n_rows += len(bs)
    return n_legal / max(n_rows, 1)
