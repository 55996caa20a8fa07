"""
Score every SAE with the paper's metrics, beside the baselines, and print the paper's table.

Reads:  out/<game>/model.pt, out/<game>/model_random.pt, out/<game>/saes/*.pt,
        out/<game>/saes_random/*.pt (all from train.py), data/<game>/{val,labels}.pt (data.py)
Writes: out/<game>/results.json (one row per SAE and baseline), out/<game>/results.md,
        out/<game>/pareto.png (L0 against coverage and board reconstruction, as the paper plots them);
        with --feature NAME:INDEX only out/<game>/feature_NAME_INDEX.png (heat maps and top boards)
Run:    python evaluate.py --game othello
        python evaluate.py --game othello --feature p_anneal_coef0.72:17   (what does feature 17 encode?)

The held-out games labelled by data.py are split: the first n_train games score coverage and
label the features for board reconstruction, the next n_test games are the test set (the
paper: 1000 and 1000). Coverage averages over the elements that occur at least once in the
split (the paper's code divides by every element, so its numbers are lower: see README).
Baselines beside the SAEs: the SAEs of a random-init model (the floor), the layer's MLP neurons
as a dictionary, the linear probe (the ceiling), and the probes used as a dictionary.
"""
import dataclasses
import glob
import json
import math
import os
import re
import signal
import textwrap
import time
from dataclasses import dataclass

if __name__ == '__main__':  # Ctrl-C while torch loads (a second or two, nothing written yet):
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stop at once, no traceback; run_cli takes over

import torch

import chess
import data as D
import metrics
import sae as S
from model import choose_device, load_checkpoint
from train import SAE_DIRS, default_layer


@dataclass
class EvalConfig:
    game: str = 'othello'
    out_dir: str = 'out'
    data_dir: str = 'data'
    device: str = 'auto'
    n_train: int = 1000        # labelled held-out games that label the features (coverage: these)
    n_test: int = 1000         # labelled held-out games that reconstruction is scored on
    n_unsup_games: int = 200   # the first test games: L0, variance explained, loss recovered, dead features
    batch_size: int = 64
    probe_steps: int = 100     # Adam steps of the probe fit, on whitened inputs (metrics.fit_linear_probe):
                               # micro-F1 within 0.002 of 1000 steps' on both games' cpu models (README)
    saes: str = 'all'          # all | none: none scores only the baselines (MLP neurons, probes), e.g. an LM
                               # trained with --stage lm, at the SAE stage's default layer
    feature: str = ''          # NAME:INDEX -> explain one feature instead of the table (random/NAME: the control's)
    top_boards: int = 3        # boards shown for --feature


def select(sets, mask):
    return {k: select(v, mask) if isinstance(v, dict) else v[mask] for k, v in sets.items()}


@torch.no_grad()
def features_at(fn, tokens, games, positions, batch_size, device):
    """fn(x) -> (B, T, k) on the inputs tokens[:, :-1] of the given games; the rows at
    (games, positions): (P, k). Each batch of games is cut after its last labelled position
    (the model is causal: later tokens change nothing before them)."""
    out = []
    for i in range(0, len(games), batch_size * 64):
        g, p = games[i:i + batch_size * 64], positions[i:i + batch_size * 64]
        uniq, inverse = torch.unique(g, return_inverse=True)
        last = torch.zeros(len(uniq), dtype=p.dtype).scatter_reduce(0, inverse, p, 'amax')  # (U,)
        rows = None
        for j in range(0, len(uniq), batch_size):
            x = tokens[uniq[j:j + batch_size], :int(last[j:j + batch_size].max()) + 1].long().to(device)
            acts = fn(x).float().cpu()  # (b, t, k)
            mine = ((inverse >= j) & (inverse < j + batch_size)).nonzero().squeeze(1)
            rows = acts.new_empty(len(g), acts.shape[-1]) if rows is None else rows
            rows[mine] = acts[inverse[mine] - j, p[mine]]
        out.append(rows)
    return torch.cat(out)


def encode_all(sae, x, batch=8192):
    """SAE features of x (N, d) in batches: (N, d_sae) on the SAE's device, where they are scored."""
    device = next(sae.parameters()).device
    with torch.no_grad():
        return torch.cat([sae.encode(x[i:i + batch].to(device)) for i in range(0, len(x), batch)])


def side_by_side(sets):
    """BSP sets as one label matrix for metrics.*_by_group: (bool [N, G], groups), where groups
    lists (set name, width) per block of columns; a nested set (the strategy set) gives one block
    per property."""
    blocks, groups = [], []
    for name, lab in sets.items():
        for part in (lab.values() if isinstance(lab, dict) else [lab]):
            blocks.append(part.reshape(len(part), -1).bool())
            groups.append((name, blocks[-1].shape[1]))
    return torch.cat(blocks, 1), groups


def mean_per_set(values, ev):
    """Per-group values (one per block of ev.flat's columns) -> {set name: mean over its groups}:
    a nested set (the strategy set) is the mean over its properties, each weighted equally."""
    return {name: sum(v for v, (g, _) in zip(values, ev.groups) if g == name) / sum(g == name for g, _ in ev.groups)
            for name in ev.labels['train']}


def score_features(acts_train, acts_test, ev):
    """Coverage (train split) and board reconstruction (test F1, t chosen on train) per BSP set;
    each property of a nested set has its own best threshold. Counted on the evaluation device."""
    lab_train, lab_test = ev.flat['train'], ev.flat['test']  # on ev.cfg.device
    acts_train, acts_test = acts_train.to(lab_train.device), acts_test.to(lab_test.device)
    sizes = [width for _, width in ev.groups]
    cov, rec = (mean_per_set(v, ev) for v in metrics.scores_by_group(acts_train, lab_train, acts_test, lab_test, sizes))
    return {k: v for name in cov for k, v in ((f'coverage_{name}', cov[name]), (f'reconstruction_{name}', rec[name]))}


class Evaluation:
    """Everything shared by the table and --feature: labels split into train/test, the models,
    and residual-stream activations at the labelled positions (computed once per model)."""

    def __init__(self, cfg, log=print):
        self.cfg, self.log = cfg, log
        game = cfg.game
        self.dir = os.path.join(cfg.out_dir, game)
        self.dirs = D.dir_args(cfg.data_dir, cfg.out_dir)  # for the commands that errors name
        labels = D.load_data(game, 'labels', cfg.data_dir)
        val = D.load_data(game, 'val', cfg.data_dir)
        self.model, self.ckpt = load_checkpoint(os.path.join(self.dir, 'model.pt'), game, cfg.device, self.dirs)
        self.models = {'trained': self.model}
        random_path = os.path.join(self.dir, 'model_random.pt')
        if os.path.exists(random_path):
            self.models['random'] = load_checkpoint(random_path, game, cfg.device, self.dirs)[0]
        for m in self.models.values():
            m.eval()
        T = self.model.config.block_size + 1
        self.tokens = val['tokens'][:, :T]
        self.pad_id = val['pad_id']
        lab_path = D.data_paths(game, cfg.data_dir)['labels']
        if labels.get('config') != val.get('config'):  # labels index val's games: one data set's
            raise D.UserError(f"{lab_path} and val.pt beside it were made by different data.py runs: run "
                              f"`python data.py --game {game}{D.dir_args(cfg.data_dir)}` to make them together")
        n_labelled = int(labels['game_idx'].max()) + 1 if len(labels['game_idx']) else 0
        n_train = min(cfg.n_train, n_labelled // 2)
        n_test = min(cfg.n_test, n_labelled - n_train)
        # the command that makes the data again as it was made (its options), with more games
        # labelled: they are val games, so --n_val grows to hold them where it must
        made, wanted, defaults = val['config'], cfg.n_train + cfg.n_test, D.DataConfig()
        remake = {k: made[k] for k in ('n_games', 'source', 'max_chars', 'seed')
                  if made.get(k, getattr(defaults, k)) != getattr(defaults, k)
                  and (game == 'chess' or k in ('n_games', 'seed'))}
        remake['n_val'] = max(len(val['tokens']), wanted)
        more = (f"`python data.py --game {game}{D.dir_args(cfg.data_dir)} "
                + ''.join(f"--{k}={v} " for k, v in remake.items())
                + f"--n_label_games={wanted}` makes the games again")
        if made.get('source', 'random') not in ('random', 'stockfish'):  # a PGN file holds the games it holds
            # (from a file shorter than --n_games + --n_val, data.py validates on what --n_games leaves,
            # up to --n_val)
            n_games = made.get('n_games') or D.DEFAULT_GAMES[game][0]
            more = (f"{made['source']} gave {len(val['tokens'])} val game(s): {more} from a .pgn of at least "
                    f"{n_games + wanted} games, {n_games} to train on and {wanted} to label (or with a smaller "
                    "--n_games: the rest of the file validates)")
        if n_train < cfg.n_train or n_test < cfg.n_test:
            log(f"note: {lab_path} labels {n_labelled} games; using {n_train} train + {n_test} test (more: {more})")
        # the split used is the resolved config that results.json keeps (not the one asked for)
        cfg.n_train, cfg.n_test, cfg.n_unsup_games = n_train, n_test, min(cfg.n_unsup_games, n_test)
        in_context = labels['pos'] < T - 1
        g = labels['game_idx']
        masks = {'train': in_context & (g < n_train), 'test': in_context & (g >= n_train) & (g < n_train + n_test)}
        if n_train < 1 or n_test < 1 or not all(m.any() for m in masks.values()):
            raise D.UserError(f"{lab_path} has too few labelled positions in the model's context of {T - 1} "
                              f"({n_labelled} games): at least 2 games are needed, one to label the features and "
                              f"one to score them: {more}")
        self.where = {k: (g[m], labels['pos'][m]) for k, m in masks.items()}  # (games, positions) per split
        self.labels = {k: select(labels['sets'], m) for k, m in masks.items()}
        flat = {k: side_by_side(v) for k, v in self.labels.items()}  # for metrics.*_by_group
        self.flat = {k: lab.to(cfg.device) for k, (lab, _) in flat.items()}  # bool (P, G) per split
        self.groups = flat['train'][1]  # (set name, width) per block of columns, the same for both splits
        self.names = labels['names']
        unsup = self.tokens[n_train:n_train + cfg.n_unsup_games]
        self.unsup_tokens = unsup  # (n, T) whole games for the unsupervised metrics
        self.unsup_real = unsup[:, :-1] != self.pad_id  # (n, T - 1) its inputs that are not pads
        self._cache = {}
        log(f"eval: {game}, {len(self.where['train'][0])} train / {len(self.where['test'][0])} test positions "
            f"from {n_train} / {n_test} held-out games; sets: {', '.join(labels['sets'])}")

    def clean_and_zero(self, kind, layer):
        """The clean and zero-ablated cross-entropies of model `kind` at `layer` on the
        unsupervised games (metrics.cross_entropies), computed once for all its SAEs."""
        key = (kind, layer, 'ce')
        if key not in self._cache:
            self._cache[key] = metrics.cross_entropies(self.models[kind], self.unsup_tokens.long(), layer,
                                                       batch_size=self.cfg.batch_size, resid=self.unsup_resid(kind, layer))
        return self._cache[key]

    def unsup_resid(self, kind, layer):
        """The residual stream of model `kind` after block `layer` on the unsupervised games, whole:
        (N, T, d), so the loss-recovered CEs of every SAE rerun only the blocks after `layer`."""
        self.activations(kind, layer)
        return self._cache[(kind, layer, 'unsup_resid')]

    def activations(self, kind, layer, what='resid'):
        """(train (P, k), test (P, k), unsup (N, k)) activations of model `kind` after block `layer`
        (what='resid') or of its MLP neurons (what='mlp'). The trained model's MLP neurons are a
        baseline too, so its pass computes both (model.mlp_hidden with_residual)."""
        key = (kind, layer, what)
        if key not in self._cache:
            m = self.models[kind]
            d = m.config.n_embd
            with_mlp = kind == 'trained' or what == 'mlp'
            if with_mlp:
                fn = lambda x: torch.cat(m.mlp_hidden(x, layer, with_residual=True)[::-1], -1)  # (B, T, d + 4d)
            else:
                fn = lambda x: m.residual(x, layer)  # (B, T, d)
            split = [features_at(fn, self.tokens, *self.where[s], self.cfg.batch_size, self.cfg.device)
                     for s in ('train', 'test')]
            x = self.unsup_tokens[:, :-1].long()
            with torch.no_grad():
                u = torch.cat([fn(x[i:i + self.cfg.batch_size].to(self.cfg.device)).float().cpu()
                               for i in range(0, len(x), self.cfg.batch_size)])  # (N, T, k)
            acts = (*split, u[self.unsup_real])
            self._cache[(kind, layer, 'unsup_resid')] = u[..., :d].contiguous()
            self._cache[(kind, layer, 'resid')] = tuple(a[..., :d].contiguous() for a in acts)
            if with_mlp:
                self._cache[(kind, layer, 'mlp')] = tuple(a[..., d:].contiguous() for a in acts)
        return self._cache[key]


def stale_sae(ev, sae, kind, path):
    """Why `sae` (read from `path`) does not belong to the current model file of `kind`, in one
    line; None if it does (the model file's digest is the one the SAE recorded when trained).
    Each model file is digested once, not once per SAE: a gpu preset's model.pt, with its
    optimiser state, is about 300 MB, a quarter of a second to digest on a 2-core CPU."""
    model_file = os.path.join(ev.dir, 'model.pt' if kind == 'trained' else 'model_random.pt')
    if kind in ev.models and (kind, 'sha256') not in ev._cache:
        ev._cache[(kind, 'sha256')] = D.file_digest(model_file)
    if kind not in ev.models or sae.meta.get('model', {}).get('sha256') != ev._cache[(kind, 'sha256')]:
        return (f"{path}: trained on another {os.path.basename(model_file)}; "
                f"re-run `python train.py --game {ev.cfg.game}{ev.dirs} --stage sae`")
    return None


def load_saes(ev):
    """Every SAE under out/<game>/saes*/ that was trained on the current model files."""
    found = []
    for kind, sub in SAE_DIRS.items():
        for path in sorted(glob.glob(os.path.join(ev.dir, sub, '*.pt'))):
            sae = S.load(path, ev.cfg.game, ev.dirs)
            stale = stale_sae(ev, sae, kind, path)
            if stale:
                ev.log(f"skip {stale}")
                continue
            found.append((kind, sae.to(ev.cfg.device)))
    if not found:
        raise D.UserError(f"no SAEs for the current model under {ev.dir}/saes/: "
                          f"run `python train.py --game {ev.cfg.game}{ev.dirs}`")
    return found


def row_line(row):
    """A row's scores in one log line, as each is done, so that a run cut short still reports
    them: model, name, then each score the row has."""
    names = {'l0': 'L0', 'explained_variance': 'expl. var.', 'ce_loss_score': 'CE score'}
    scores = [f"{names[k]} {row[k]:6.1f}" if k == 'l0' else f"{names[k]} {row[k]:.3f}"
              for k in names if row.get(k) is not None]
    scores += [f"{k.replace('reconstruction', 'rec').replace('coverage', 'cov')} {v:.3f}"
               for k, v in row.items() if k.startswith(('coverage', 'reconstruction')) and v is not None]
    return f"{row['model']:7s} {row['name']:24s} " + ' | '.join(scores)


def evaluate(cfg, log=print):
    """Score every SAE and the baselines. Returns the rows of the results table. The log times
    each part: loading, each SAE's row, the baselines."""
    t_load = time.time()
    ev = Evaluation(cfg, log)
    saes = load_saes(ev) if cfg.saes == 'all' else []
    layer = saes[0][1].meta['layer'] if saes else default_layer(ev.model.config.n_layer)
    log(f"eval: data, models and {len(saes)} SAEs loaded in {time.time() - t_load:.1f}s")
    rows = []
    t0 = time.time()

    def add(row, tag, t):
        """Keep a row and log it with its time since t; returns the time now, the next row's start."""
        rows.append(row)
        log(f"[{tag}] {row_line(row)} ({time.time() - t:.1f}s)")
        return time.time()

    # baselines first, the references a run cut short most needs: the layer's MLP neurons as a
    # dictionary, and a linear probe on the residual stream
    t = t0
    m_train, m_test, m_unsup = ev.activations('trained', layer, 'mlp')
    t = add({'name': 'mlp_neurons', 'arch': 'mlp', 'model': 'trained', 'layer': layer, 'd_sae': m_train.shape[1],
             'l0': metrics.l0(m_unsup > 0), 'explained_variance': None, 'ce_loss_score': None,
             'dead_fraction': metrics.dead_fraction(m_unsup.clamp_min(0)),
             **score_features(m_train, m_test, ev)}, 'baseline', t)
    for kind in ev.models:
        x_train, x_test = (x.to(cfg.device) for x in ev.activations(kind, layer)[:2])
        # one logistic-regression probe per element, for all sets at once (the columns are independent)
        lab_train, lab_test = ev.flat['train'], ev.flat['test']
        probe = metrics.fit_linear_probe(x_train, lab_train, steps=cfg.probe_steps)
        logits_train, logits_test = probe(x_train), probe(x_test)  # (P, G)
        slices = metrics.group_slices([width for _, width in ev.groups], lab_train.shape[1])
        scores = [metrics.probe_scores(logits_test[:, s], lab_test[:, s]) for s in slices]
        suffix = '' if kind == 'trained' else f'_{kind}'
        row = {'name': 'linear_probe' + suffix, 'arch': 'probe', 'model': kind, 'layer': layer, 'd_sae': None,
               'l0': None, 'explained_variance': None, 'ce_loss_score': None, 'dead_fraction': None}
        f1, accuracy = (mean_per_set([s[k] for s in scores], ev) for k in ('f1_micro', 'accuracy'))
        for name in f1:
            row.update({f'coverage_{name}': None, f'reconstruction_{name}': f1[name], f'probe_accuracy_{name}': accuracy[name]})
        t = add(row, 'baseline', t)
        # the same probes as a dictionary, one feature per element (its probability), scored like an
        # SAE: what coverage and the reconstruction rule give with linear one-element features
        t = add({'name': 'probe_dictionary' + suffix, 'arch': 'probe_dict', 'model': kind, 'layer': layer,
                 'd_sae': lab_train.shape[1], 'l0': None, 'explained_variance': None, 'ce_loss_score': None,
                 'dead_fraction': None, **score_features(torch.sigmoid(logits_train), torch.sigmoid(logits_test), ev)},
                'baseline', t)
    # where the SAE rows' time goes, summed over them (each part ends with a read on the host,
    # so on a GPU its own kernels are in it)
    spent = dict.fromkeys(('model passes', 'L0 / variance / loss recovered', 'coverage / reconstruction'), 0.0)
    t_saes = time.time()
    for i, (kind, sae) in enumerate(saes):
        t = time.time()
        layer_i = sae.meta['layer']
        x_train, x_test, x_unsup = ev.activations(kind, layer_i)  # the model's passes: the first SAE of each model
        resid = ev.unsup_resid(kind, layer_i)  # (n, T, d)
        clean_and_zero = ev.clean_and_zero(kind, layer_i)
        t_scores = time.time()
        spent['model passes'] += t_scores - t
        unsup, x_hat = metrics.sae_scores(sae, x_unsup, reconstruction=True)  # x_hat (N, d) at the non-pad tokens
        # the stream with the SAE's reconstruction in place: pad tokens keep theirs (they come after
        # the game, so no counted target sees them)
        replaced = resid.clone()
        replaced[ev.unsup_real] = x_hat
        ce_score = metrics.loss_recovered(ev.models[kind], ev.unsup_tokens.long(), layer_i, replaced,
                                          cfg.batch_size, clean_and_zero, resid)
        row = {'name': sae.meta['name'], 'arch': sae.cfg['arch'], 'model': kind, 'layer': layer_i,
               'd_sae': sae.cfg['d_sae'], 'l0': unsup['l0'], 'explained_variance': unsup['explained_variance'],
               'ce_loss_score': None if math.isnan(ce_score) else ce_score,  # None: no loss to recover
               'dead_fraction': unsup['dead_fraction']}
        t_features = time.time()
        spent['L0 / variance / loss recovered'] += t_features - t_scores
        row.update(score_features(encode_all(sae, x_train), encode_all(sae, x_test), ev))
        spent['coverage / reconstruction'] += time.time() - t_features
        add(row, f'{i + 1}/{len(saes)}', t)
    if saes:
        log(f"eval: the {len(saes)} SAE rows' time in: " + ', '.join(f'{k} {v:.1f}s' for k, v in spent.items()))
    log(f"eval: {len(rows)} rows in {time.time() - t0:.1f}s (the baselines' {len(rows) - len(saes)} in "
        f"{t_saes - t0:.1f}s)")
    return rows


# ----------------------------------------------------------------------------------------------
# The report

PAPER = {  # best per architecture in the paper's results (its coverage normalisation; README, Measured results)
    'othello': 'p-annealing rec 0.95 (L0 63), cov 0.45; standard rec 0.95 (L0 457), cov 0.40; gated rec 0.91, cov 0.52; '
               'topk rec 0.87, cov 0.49; random-init model rec 0.08, cov 0.27; MLP neurons rec 0.82, cov 0.55',
    'chess': 'p-annealing rec ~0.85 (L0 ~25), cov ~0.48; standard/gated rec ~0.80-0.83, cov ~0.45; topk rec ~0.82, '
             'cov ~0.45; random-init model rec 0.005, cov 0.11; MLP neurons rec 0.56, cov 0.26',
}


BASELINES = ('mlp', 'probe', 'probe_dict')  # rows that are not SAEs


def fmt(v):
    return '' if v is None else (f'{v:.1f}' if isinstance(v, float) and abs(v) >= 10 else
                                 f'{v:.3f}' if isinstance(v, float) else str(v))


def score(row):
    """Rank rows by mean board reconstruction over the BSP sets."""
    recs = [v for k, v in row.items() if k.startswith('reconstruction_') and v is not None]
    return sum(recs) / len(recs) if recs else -1.0


def markdown_table(rows, sets):
    cols = ['name', 'model', 'l0', 'explained_variance', 'ce_loss_score', 'dead_fraction']
    cols += [f'{m}_{s}' for s in sets for m in ('coverage', 'reconstruction')]
    head = ['name', 'model', 'L0', 'expl. var.', 'CE loss score', 'dead'] + [
        f'{m} {s}' for s in sets for m in ('cov.', 'rec.')]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(f'{r[c]:.1f}' if c == 'l0' and r[c] is not None else fmt(r.get(c)) for c in cols) + ' |'
              for r in rows]
    return '\n'.join(lines)


def report(cfg, rows, sets, seconds):
    best = {}
    for r in rows:  # best per (architecture, model); baselines are single rows already
        key = (r['arch'], r['model'])
        if key not in best or score(r) > score(best[key]):
            best[key] = r
    best_rows = sorted(best.values(), key=lambda r: (r['model'] != 'trained', r['arch'] in BASELINES, -score(r)))
    all_rows = sorted(rows, key=lambda r: (r['model'] != 'trained', r['arch'] in BASELINES, r['arch'], r['l0'] or 0))
    return '\n'.join([
        f'# {cfg.game}: SAE evaluation',
        '',
        f'Coverage on the train split, board reconstruction on the test split (threshold chosen on train); '
        f'coverage averages over the elements that occur at least once (the paper divides by all, so its '
        f'numbers are lower). linear_probe rows: micro-F1 of a linear probe in the reconstruction columns; '
        f'probe_dictionary rows: those probes used as a dictionary (one feature per element, its probability) '
        f'and scored like an SAE: a reference for what linear one-element features score on this residual stream. '
        f'CE loss score blank where zeroing the layer does not raise the loss (as on a random-init model): '
        f'there is no loss to recover. {seconds:.0f}s to evaluate.',
        '',
        '## Best per architecture (by mean reconstruction)',
        '',
        markdown_table(best_rows, sets),
        '',
        f'Paper (best per architecture): {PAPER[cfg.game]}.',
        '',
        '## All',
        '',
        markdown_table(all_rows, sets),
        ''])


def pyplot():
    """matplotlib's pyplot on the Agg backend: it writes PNG files and needs no display."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(path, rows, sets):
    """pareto.png, as the paper draws its results: one row of panels per BSP set; in each row, L0
    (log scale) against coverage on the trained model, then on the random-init model, then the
    same for board reconstruction, the two models side by side on a shared y axis. One marker and
    colour per SAE architecture (a line joins its sweep); the layer's MLP neurons are one grey
    point; the linear probe (its micro-F1) and the probes scored as a dictionary are horizontal
    lines, as they have no L0."""
    plt = pyplot()
    archs = sorted({r['arch'] for r in rows if r['arch'] not in BASELINES})
    style = {a: dict(marker='osD^vP*Xph<>'[i % 12], color=plt.get_cmap('tab10')(i % 10)) for i, a in enumerate(archs)}
    lines = {'probe': dict(color='k', ls='--'), 'probe_dict': dict(color='tab:brown', ls=':')}
    panels = [(metric, kind) for metric in ('coverage', 'reconstruction') for kind in ('trained', 'random')]
    fig, axes = plt.subplots(len(sets), len(panels), figsize=(4 * len(panels), 3.3 * len(sets) + 0.8), squeeze=False,
                             sharex=True)  # one L0 scale for every panel
    for i, s in enumerate(sets):
        for j, (metric, kind) in enumerate(panels):
            ax, key = axes[i, j], f'{metric}_{s}'
            if j % 2:
                ax.sharey(axes[i, j - 1])  # trained and random-init side by side, on one scale
            for arch in archs:
                pts = sorted((r['l0'], r[key]) for r in rows if r['arch'] == arch and r['model'] == kind
                             and r.get(key) is not None and r['l0'])
                if pts:
                    ax.plot(*zip(*pts), lw=0.8, label=arch, **style[arch])
            for r in rows:
                if r['model'] != kind or r.get(key) is None:
                    continue
                if r['arch'] == 'mlp':
                    ax.plot([r['l0']], [r[key]], marker='s', color='grey', ls='', label='MLP neurons')
                elif r['arch'] in lines:
                    label = 'linear probe (micro-F1)' if r['arch'] == 'probe' else 'probes as a dictionary'
                    ax.axhline(r[key], lw=1, label=label, **lines[r['arch']])
            ax.set_xscale('log')
            if i == len(sets) - 1:  # the panels share one L0 scale: label it once, at the bottom
                ax.set_xlabel('L0 (features active per position)')
            ax.set_ylabel(f'{metric} ({s})')
            ax.set_title(f"{metric}, {s}: {'trained' if kind == 'trained' else 'random-init'} model", fontsize=9)
            ax.grid(alpha=0.3)
    legend = {}
    for ax in axes.flat:  # one legend for the figure, each label once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc='lower center', ncol=min(6, len(legend)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.8 / (3.3 * len(sets) + 0.8), 1, 1))
    D.atomic_write({path: lambda tmp: fig.savefig(tmp, dpi=110, format='png')})
    plt.close(fig)


RESULTS_VERSION = 1  # results.json carries a format name and version, as every .pt file here does


def write_outputs(cfg, rows, sets, text, log=print):
    """results.json and results.md first, then pareto.png: a plot that fails (no matplotlib, no
    disk space for it, a bug) costs the picture only, never the results."""
    out = os.path.join(cfg.out_dir, cfg.game)

    def write_json(tmp):
        with open(tmp, 'w') as f:
            json.dump({'format': 'boardgame-saes/results', 'version': RESULTS_VERSION,
                       'config': dataclasses.asdict(cfg), 'sets': sets, 'rows': rows}, f, indent=1)

    def write_md(tmp):
        with open(tmp, 'w') as f:
            f.write(text)

    plot = os.path.join(out, 'pareto.png')
    if os.path.isfile(plot):  # the last run's goes first: a plot that fails, or a kill while it is
        os.remove(plot)  # drawn, leaves none beside the new results, never one of other results
    D.atomic_write({os.path.join(out, 'results.json'): write_json, os.path.join(out, 'results.md'): write_md})
    wrote = ['results.json', 'results.md']
    try:
        plot_pareto(plot, rows, sets)
        wrote.append('pareto.png')
    except D.UserError:  # the disk's (atomic_write): one line and exit 2, as for every file
        raise
    except Exception as e:  # the plot's own (matplotlib): the table stands
        log(f"pareto.png not written ({type(e).__name__}: {e}); the results are in results.json")
    log(f"wrote {', '.join(os.path.join(out, w) for w in wrote)}")


# ----------------------------------------------------------------------------------------------
# --feature NAME:INDEX: what one feature encodes

def board_grid(ev, split, i):
    """The board at labelled position i of a split: (8 rows of 8 symbols, rank 8 first; caption).
    Othello: X the player to move, O the other, * a legal move, . empty. Chess: python-chess's
    piece letters (upper case White), . empty."""
    g, p = (int(v[i]) for v in ev.where[split])
    if ev.cfg.game == 'othello':
        planes = ev.labels[split]['mine_theirs'][i]  # (128,) mine then theirs, square = 8 * rank + file
        legal = ev.labels[split]['legal'][i]  # (64,)
        grid = [['X' if planes[8 * rank + f] else 'O' if planes[64 + 8 * rank + f] else '*' if legal[8 * rank + f]
                 else '.' for f in range(8)] for rank in range(7, -1, -1)]
        return grid, f'game {g}, move {p + 1}'
    text = D.decode_chess(ev.tokens[g])
    board = chess.Board()
    for san in D.transcript_to_moves(text[:p + 1], last_is_complete=True):
        board.push_san(san)
    grid = [[str(board.piece_at(8 * rank + f) or '.') for f in range(8)] for rank in range(7, -1, -1)]
    return grid, f'game {g}, character {p}: ...{text[max(0, p - 40):p + 1]}'


def board_diagram(ev, split, i):
    """Text diagram of the board at labelled position i of a split."""
    grid, caption = board_grid(ev, split, i)
    if ev.cfg.game == 'othello':
        caption += ' (X: the player to move, O: the other, *: legal moves)'
    return caption + '\n' + '\n'.join(f'{8 - r} ' + ' '.join(row) for r, row in enumerate(grid)) + '\n  a b c d e f g h'


def square_planes(ev, split='train'):
    """The label columns that name one square each, grouped into 8x8 planes by the name before
    '@' (Othello: mine, theirs, legal; chess: the 12 piece letters, attacked_by_black,
    white_legal_dest): {plane: (label matrix bool [P, G], [(column, square) * 64])}."""
    planes = {}
    for set_name, lab in ev.labels[split].items():
        props = lab if isinstance(lab, dict) else {None: lab}
        for prop, l in props.items():
            names = ev.names[set_name][prop] if isinstance(ev.names[set_name], dict) else ev.names[set_name]
            for j, el in enumerate(names):
                plane, at, square = el.rpartition('@')
                if at:
                    planes.setdefault(plane, (l, []))[1].append((j, D.SQUARE_NAMES.index(square)))
    return planes


def feature_heatmaps(acts, planes):
    """Mean activation of one feature (acts float [P]) over the positions where each square's
    element is true: {plane: float [8, 8], rank 8 in row 0; nan where the element never occurs}."""
    maps = {}
    for plane, (lab, columns) in planes.items():
        cols = torch.tensor([j for j, _ in columns])
        hit = lab[:, cols].float()  # (P, 64 or fewer)
        mean = (acts.float() @ hit) / hit.sum(0)  # 0 / 0 = nan: never true
        grid = torch.full((64,), float('nan'))
        grid[torch.tensor([sq for _, sq in columns])] = mean
        maps[plane] = grid.view(8, 8).flip(0)  # rows: rank 8 first
    return maps


def plot_feature(path, title, maps, boards, game):
    """The --feature picture: the heat maps (mean activation per square, one panel per plane)
    above the boards where the feature fires most (boards: [(activation, grid, caption)])."""
    plt = pyplot()
    n = max(len(maps), len(boards))
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 7.2), squeeze=False)
    files = list('abcdefgh')
    for ax in axes.flat:
        ax.set_xticks(range(8), files)
        ax.set_yticks(range(8), [str(8 - r) for r in range(8)])
        ax.tick_params(length=0, labelsize=7)
    for ax, (plane, grid) in zip(axes[0], maps.items()):
        cmap = plt.get_cmap('viridis').with_extremes(bad='lightgrey')  # squares where the element never occurs
        im = ax.imshow(grid.numpy(), cmap=cmap)
        ax.set_title(f'mean activation where {plane}@square', fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax, (act, grid, caption) in zip(axes[1], boards):
        if game == 'othello':
            ax.imshow([[0] * 8] * 8, cmap='Greens', vmin=-1, vmax=1)
            for r, row in enumerate(grid):
                for f, c in enumerate(row):
                    if c in 'XO':
                        ax.add_patch(plt.Circle((f, r), 0.4, facecolor='black' if c == 'X' else 'white', edgecolor='black'))
                    elif c == '*':
                        ax.plot(f, r, '.', color='grey')
        else:
            ax.imshow([[(r + f) % 2 for f in range(8)] for r in range(8)], cmap='Greys', vmin=-3, vmax=4)
            for r, row in enumerate(grid):
                for f, c in enumerate(row):
                    if c != '.':
                        ax.text(f, r, chess.Piece.from_symbol(c).unicode_symbol(), ha='center', va='center', fontsize=15)
        ax.set_title(f'activation {act:.3f}\n' + '\n'.join(textwrap.wrap(caption, 40)), fontsize=7)
    for ax in axes[0][len(maps):]:
        ax.axis('off')
    for ax in axes[1][len(boards):]:
        ax.axis('off')
    if game == 'othello':
        title += '\nboards: black discs belong to the player to move, white to the other; dots: legal moves'
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    D.atomic_write({path: lambda tmp: fig.savefig(tmp, dpi=100, format='png')})
    plt.close(fig)


def explain_feature(cfg, log=print):
    # an SAE's file name under saes/ (random/: saes_random/), not a path; an index in ASCII digits
    if not re.fullmatch(r'(random/)?[\w.-]+:[0-9]+', cfg.feature, re.ASCII) or '/.' in f'/{cfg.feature}':
        raise D.UserError(f"--feature wants NAME:INDEX, e.g. --feature=p_anneal_coef0.72:17 (got {cfg.feature!r})")
    name, _, index = cfg.feature.rpartition(':')
    ev = Evaluation(cfg, log)
    index = int(index)
    # the trained model's SAE, or with random/ before its name the random-init control's (the
    # control reuses the sweep's names)
    kind, name = ('random', name[len('random/'):]) if name.startswith('random/') else ('trained', name)
    path = os.path.join(ev.dir, SAE_DIRS[kind], f'{name}.pt')
    if not os.path.exists(path):
        names = [('random/' if k == 'random' else '') + os.path.basename(p)[:-3] for k, d in SAE_DIRS.items()
                 for p in sorted(glob.glob(os.path.join(ev.dir, d, '*.pt')))]
        raise D.UserError(f"no SAE named {name!r} under {ev.dir}/{SAE_DIRS[kind]}/; have: {', '.join(names) or 'none'}")
    sae = S.load(path, cfg.game, ev.dirs)
    stale = stale_sae(ev, sae, kind, path)
    if stale:
        raise D.UserError(stale)
    sae = sae.to(cfg.device)
    if not 0 <= index < sae.cfg['d_sae']:
        raise D.UserError(f"{name} has {sae.cfg['d_sae']} features: INDEX must be in 0..{sae.cfg['d_sae'] - 1}")
    x_train = ev.activations(kind, sae.meta['layer'])[0]
    acts = encode_all(sae, x_train)[:, index].cpu()  # (P,), beside the labels
    print(f"{name}:{index} ({kind} model): fires on {(acts > 0).float().mean().item():.1%} of "
          f"{len(acts)} train positions, max activation {acts.max().item():.3f}")
    if acts.max() <= 0:
        print("the feature never fires on these positions (dead here)")
        return
    best = []
    for set_name, lab in ev.labels['train'].items():
        props = lab if isinstance(lab, dict) else {None: lab}
        for prop, l in props.items():
            s = metrics.single_feature_scores(acts, l)
            names = ev.names[set_name][prop] if isinstance(ev.names[set_name], dict) else ev.names[set_name]
            for g in s['f1'].argsort(descending=True)[:3].tolist():
                best.append((s['f1'][g].item(), s['precision'][g].item(), s['recall'][g].item(),
                             s['threshold'][g].item(), f'{set_name}/{names[g]}'))
    print('best-matching board-state elements (F1, precision, recall at the best threshold t x max):')
    for f1, prec, rec, t, el in sorted(best, reverse=True)[:5]:
        print(f'  {el:32s} F1 {f1:.3f} | precision {prec:.3f} | recall {rec:.3f} | t {t:.1f}')
    print('boards where it fires most:')
    top = acts.argsort(descending=True)[:cfg.top_boards].tolist()
    for i in top:
        print(f'activation {acts[i].item():.3f}, ' + board_diagram(ev, 'train', i) + '\n')
    # the picture: heat maps of the planes that hold the best-matching elements, then the top boards
    path = os.path.join(ev.dir, f"feature_{'random_' if kind == 'random' else ''}{name}_{index}.png")
    try:
        planes = square_planes(ev)
        ranked = [el.split('/', 1)[1].rpartition('@')[0] for *_, el in sorted(best, reverse=True)]
        shown = [p for p in dict.fromkeys(ranked + list(planes)) if p in planes][:3]  # best-matching first
        maps = feature_heatmaps(acts, {p: planes[p] for p in shown})
        boards = [(acts[i].item(), *board_grid(ev, 'train', i)) for i in top]
        plot_feature(path, f'{name}:{index} ({kind} model)', maps, boards, cfg.game)
        print(f'wrote {path}')
    except D.UserError:  # the disk's (atomic_write): one line and exit 2, as for every file
        raise
    except Exception as e:  # the plot's own (matplotlib): the text above stands
        print(f'{path} not written ({type(e).__name__}: {e})')


def main(argv):
    cfg = D.parse_config(EvalConfig(), argv, 'evaluate.py')
    if cfg.game not in ('othello', 'chess'):
        raise D.UserError(f"unknown game {cfg.game!r}: use --game othello or --game chess")
    D.check_options(cfg, 'evaluate.py', {'data_dir': D.DIRECTORY, 'out_dir': D.DIRECTORY,
                                         **{k: D.POSITIVE for k in ('n_train', 'n_test', 'n_unsup_games', 'batch_size',
                                                                    'probe_steps')}, 'top_boards': D.NON_NEGATIVE})
    if cfg.saes not in ('all', 'none'):
        raise D.UserError(f"evaluate.py: --saes={cfg.saes} is not allowed: use all or none")
    cfg.device = choose_device(cfg.device)
    print(f"evaluate.py config: {dataclasses.asdict(cfg)}")
    if cfg.feature:
        explain_feature(cfg)
        return
    out = os.path.join(cfg.out_dir, cfg.game)
    if os.path.exists(out) and not os.path.isdir(out):
        raise D.UserError(f"{out} is a file, not the directory train.py writes: move it away, or pick another "
                          "--out_dir")
    if not os.path.isdir(out):
        raise D.UserError(f"{out}/ not found: "
                          f"run `python train.py --game {cfg.game}{D.dir_args(cfg.data_dir, cfg.out_dir)}` first")
    with D.lock_dir(out, 'out_dir'):  # not while train.py writes there
        t0 = time.time()
        rows = evaluate(cfg)
        sets = [k[len('reconstruction_'):] for k in rows[0] if k.startswith('reconstruction_')]  # the BSP sets
        text = report(cfg, rows, sets, time.time() - t0)
        print(text)
        write_outputs(cfg, rows, sets, text)


if __name__ == '__main__':
    D.run_cli(main)
