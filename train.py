"""
The pipeline's entry point: game data (if missing), then the game GPT, then the SAE sweep.

Reads:  data/<game>/{train,val,labels}.pt (made here by data.py if missing)
Writes: out/<game>/model.pt                (the LM: config, weights, optimizer, legal-move rate)
        out/<game>/saes/, saes_random/     (the SAE sweep and its random-init control)
        out/<game>/model_random.pt         (the random-init LM the control's SAEs read)
        out/<game>/sae_sweep.pt            (the running sweep's checkpoint; removed when done)
Run:    python train.py --game othello            (preset: gpu on a GPU, cpu otherwise)
        python train.py --game chess --preset=tiny --max_iters=50
        python train.py --game chess --resume     (continue the stage that was running)
        torchrun --standalone --nproc_per_node=8 train.py --game othello   (8 processes: README)
Every option below can be given as --key=value or --key value; the resolved config is printed
and saved in the checkpoint.
"""
import dataclasses
import glob
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import nullcontext
from datetime import timedelta
from dataclasses import dataclass

if __name__ == '__main__':  # Ctrl-C while torch loads (a second or two, nothing written yet):
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stop at once, no traceback; run_cli takes over

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
import metrics
from model import GPT, GPTConfig, choose_device, choose_precision, load_checkpoint, save_checkpoint, wait_for
from sae import (ARCHS, SAE, PAnnealing, compile_losses, from_dict as sae_from_dict, make_optimizer, make_sae,
                 save as save_sae, to_dict as sae_to_dict, train_step)


@dataclass
class TrainConfig:
    game: str = 'othello'       # othello | chess
    preset: str = 'auto'        # tiny | cpu | gpu | paper  (auto: gpu on cuda, cpu otherwise)
    stage: str = 'all'          # lm | sae | all
    device: str = 'auto'        # auto | cpu | cuda | mps
    seed: int = 1337
    out_dir: str = 'out'
    data_dir: str = 'data'
    resume: bool = False        # continue the stage that was running (LM or SAE sweep)
    # data (used only when data/<game>/ is missing)
    n_games: int = 0            # 0: data.py's default for the game
    n_val: int = 0
    source: str = 'random'      # chess: random | stockfish | PATH.pgn
    n_label_games: int = 2000
    workers: int = 2            # processes for making the data and the soft targets
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 59        # context; Othello games are 60 moves, so at most 59
    dropout: float = 0.0
    # optimisation
    batch_size: int = 64
    max_iters: int = 3000
    lm_minutes: float = 0.0     # > 0: also stop the LM after this many minutes of training; the lr
                                # schedule then follows the clock or the iterations, whichever is ahead
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    optimizer: str = 'adamw'    # adamw | muon: Muon on the blocks' weight matrices, AdamW on the rest
                                # (model.Muon); on the chess cpu preset it reaches in 3000 steps the
                                # loss AdamW reaches in about 9000
    grad_clip: float = 1.0
    soft_targets: bool = False  # random games: train on the exact next-token distribution (Othello:
                                # uniform over the legal moves; chess: data.chess_next_char_counts)
                                # instead of the sampled token: the same expected gradient with far
                                # less noise (README, "Soft targets")
    dtype: str = 'auto'         # auto | float32 | bfloat16 | float16 (CUDA; autocast). auto: on a CPU bf16
                                # only where a timed matmul says it is faster here; on CUDA bf16, or fp16
                                # with a gradient scaler on GPUs without bf16 units (model.choose_precision)
    compile: bool = False       # torch.compile the model's blocks (GPU; model.GPT.compile_blocks)
    lm_cuda_graphs: bool = False  # with --compile on CUDA: the compiled blocks also run as CUDA graphs
                                # (torch.compile's mode='reduce-overhead'), so the host launches a graph a
                                # block where it launched every kernel; no preset turns it on until a GPU
                                # run shows it pays (bench.py --device=cuda: its '+ CUDA graphs' line)
    # reporting
    log_interval: int = 50
    eval_interval: int = 500
    eval_iters: int = 20
    legal_games: int = 500      # val games for the legal-move rate (chess: decoded moves, slower)
    # SAE stage (the sweep of SWEEP below, then the random-init control)
    layer: int = -1             # residual stream after this block (0-based); -1: the paper's depth (6 of 8)
    sae_archs: str = 'all'      # all (every architecture in SWEEP) or a comma-separated list of them
    sae_expansion: int = 8      # d_sae = sae_expansion * n_embd
    sae_steps: int = 4000
    sae_grid: str = 'cpu'       # the sweep's settings: cpu (SWEEP, chosen on the cpu presets' models), gpu
                                # (SWEEP_GPU, on the Othello gpu preset's model) or gpu_chess
                                # (SWEEP_GPU_CHESS, on the chess gpu preset's model); README, Presets
    sae_coef_scale: float = 1.0  # every sparsity coefficient of the grid times this (TopK's k unchanged): the
                                # whole grid shifted, for a model whose L0 sits elsewhere (README, Presets)
    sae_minutes: float = 0.0    # > 0: fewer steps if sae_steps would take longer than this, the first
                                # steps (the first compiles under --sae_compile) included: the steps are
                                # timed on steps 3-20; the random-init control gets the same steps
    sae_batch: int = 1024       # activations per step (the paper: 8192)
    sae_lr: float = 1e-3        # the paper: 3e-4 over 300M activations; a short run needs more
    sae_warmup: int = 100
    anneal_start: float = 0.2   # p-annealing starts at this fraction of training
    sae_buffer: int = 65536     # activations held and shuffled between model passes
    sae_log_interval: int = 250
    sae_ckpt_minutes: float = 5.0  # checkpoint the whole sweep this often, for --resume (0: after every step)
    sae_compile: bool = False   # torch.compile the sweep's SAEs' losses as one function (sae.compile_losses;
                                # on in the gpu presets: on a GPU it fuses the elementwise work of a step;
                                # on a CPU it is slower for TopK, and costs a minute or more of compiling)
    sae_cuda_graphs: bool = False  # with --sae_compile on CUDA: that function also runs as CUDA graphs
                                # (sae.compile_losses), one launch per graph where the host launched
                                # every kernel (on in the gpu and paper presets, which turn it off on a
                                # CPU: on an H200 the sweep ran 1.5x as fast as compiled alone, bench.py)
    sae_precompile: bool = False  # with --sae_compile and --stage=all: a second process compiles the sweep's
                                # losses into torch.compile's disk cache while the LM trains, so that the
                                # sweep's first step loads them (warm_sae_compile; on in the gpu and paper
                                # presets: a GPU machine has cores to spare, a 2-core CPU has not)
    control: str = 'one'        # random-init control: one (per arch, middle setting) | sweep | none


# Presets: (game-independent, per-game) overrides of the defaults above.
PRESETS = {
    'tiny': ({'n_layer': 2, 'n_head': 2, 'n_embd': 32, 'batch_size': 32, 'max_iters': 60, 'lr': 3e-3,
              'warmup_iters': 10, 'log_interval': 20, 'eval_interval': 30, 'eval_iters': 2, 'legal_games': 20,
              'n_val': 200, 'n_label_games': 100, 'sae_steps': 40, 'sae_batch': 256, 'sae_buffer': 4096,
              'sae_warmup': 10, 'sae_log_interval': 20},
             {'othello': {'n_games': 2000}, 'chess': {'n_games': 200, 'block_size': 127}}),
    # cpu: sized for the targets on a 2-core CPU (README); the precision is measured (--dtype=auto)
    # SAEs: lr 1e-2, where 1e-3 left 1000 steps far from done (Othello TopK k 10: board
    # reconstruction 0.054 at 1e-3, 0.102 at 3e-3, 0.121 at 1e-2, 0.086 at 3e-2; README, Presets)
    'cpu': ({'sae_steps': 1000, 'sae_lr': 1e-2},
            {'othello': {'n_layer': 4, 'n_head': 4, 'n_embd': 128, 'max_iters': 4600, 'lr': 3e-3, 'min_lr': 2e-4,
                         'warmup_iters': 200, 'soft_targets': True},
             # chess: the shape and schedule of a measured study at a fixed LM time (README): on a
             # CPU budget the small model that takes the most steps wins, and Muon gets about 3x
             # AdamW's progress from each step
             'chess': {'n_layer': 2, 'n_head': 4, 'n_embd': 128, 'block_size': 255, 'batch_size': 8,
                       'n_games': 30_000, 'max_iters': 100_000, 'lm_minutes': 12, 'optimizer': 'muon', 'lr': 6e-3,
                       'min_lr': 1e-4, 'warmup_iters': 50, 'soft_targets': True, 'log_interval': 250, 'sae_steps': 1000,
                       'sae_minutes': 5, 'sae_coef_scale': 0.55}}),
    # gpu (the default on CUDA): the paper's model shape end to end (evaluate.py included) in
    # under 10 minutes on one GPU, so that it fits one 10-minute call, by the clock: 3.3 minutes of
    # LM and 3.0 of SAE sweep, compiling included in both, then the control, about a third of the
    # sweep's steps' time; a slower GPU trains fewer steps (one H200 run took 8m35s with 2.8
    # minutes of sweep: README, Measured results). LM and SAE losses are compiled (torch.compile),
    # the SAEs' compiled losses run as CUDA graphs (1.5x the compiled sweep's rate on an H200), and
    # the sweep's settings are the gpu grid (SWEEP_GPU; chess: SWEEP_GPU_CHESS).
    # Chess: the 256 characters the evaluation scores (the first 20 '.'), exact soft targets
    # (computed on the CPU, about 12 ms of CPU a game, then kept with the data), 4 minutes of LM
    # (3 gave a piece-set probe F1 of 0.598 on an H200, in 7m30s end to end), a shorter sweep for
    # the time its data and evaluation take, and its own grid (SWEEP_GPU_CHESS): on the chess gpu
    # model the Othello gpu grid x0.67 gave L0 about 50-90 / 15-20 / 5-8 (one H200 run; README, Presets)
    'gpu': ({'n_layer': 8, 'n_head': 8, 'n_embd': 512, 'batch_size': 512, 'lr': 1e-3, 'min_lr': 1e-4,
             'warmup_iters': 300, 'max_iters': 100_000, 'lm_minutes': 3.3, 'compile': True, 'eval_interval': 2000,
             'log_interval': 250,
             'workers': min(16, os.cpu_count() or 1), 'sae_batch': 8192, 'sae_buffer': 1 << 20, 'sae_steps': 30_000,
             'sae_minutes': 3.0, 'sae_lr': 1e-3, 'sae_warmup': 100, 'sae_log_interval': 400, 'sae_compile': True,
             'sae_cuda_graphs': True, 'sae_precompile': True, 'sae_grid': 'gpu'},
            {'othello': {'block_size': 59, 'n_games': 2_000_000, 'soft_targets': True},
             'chess': {'block_size': 255, 'batch_size': 128, 'n_games': 80_000, 'lm_minutes': 4.0,
                       'soft_targets': True, 'sae_minutes': 2.0, 'sae_grid': 'gpu_chess'}}),
    'paper': ({'n_layer': 8, 'n_head': 8, 'n_embd': 512, 'lr': 6e-4, 'min_lr': 6e-5, 'warmup_iters': 1000,
               'max_iters': 60000, 'compile': True, 'eval_interval': 2000, 'sae_batch': 8192, 'sae_steps': 30000,
               'sae_lr': 3e-4, 'sae_warmup': 1000, 'sae_buffer': 1 << 20, 'sae_log_interval': 2000, 'sae_compile': True,
               'sae_cuda_graphs': True, 'sae_precompile': True, 'sae_grid': 'gpu'},
              {'othello': {'block_size': 59, 'batch_size': 256, 'n_games': 2_000_000},
               'chess': {'block_size': 1023, 'batch_size': 64, 'n_games': 200_000, 'legal_games': 100,
                         'sae_grid': 'gpu_chess'}}),
}


# The clock the training loops and their time budgets read; a test replaces it with a fake one.
now = time.time


def build_config(argv):
    """Defaults, then the preset for the game, then the command line."""
    cfg = D.parse_config(TrainConfig(), argv, 'train.py', help=False)  # first pass: learn game and preset
    if cfg.game not in ('othello', 'chess'):
        raise D.UserError(f"unknown game {cfg.game!r}: use --game othello or --game chess")
    device = choose_device(cfg.device)
    preset = cfg.preset if cfg.preset != 'auto' else ('gpu' if device.startswith('cuda') else 'cpu')
    if preset not in PRESETS:
        raise D.UserError(f"unknown preset {cfg.preset!r}: use tiny, cpu, gpu or paper")
    common, per_game = PRESETS[preset]
    if cfg.game not in per_game:
        raise D.UserError(f"the {preset} preset is sized for {', '.join(per_game)} only: use --preset=paper or cpu for {cfg.game}")
    cfg = TrainConfig(**{**common, **per_game[cfg.game], 'preset': preset, 'device': device})
    cfg = D.parse_config(cfg, argv, 'train.py')  # the command line wins over the preset (--help: these values)
    cfg.preset, cfg.device = preset, device
    if cfg.stage not in ('lm', 'sae', 'all'):
        raise D.UserError(f"unknown stage {cfg.stage!r}: use lm, sae or all")
    if cfg.soft_targets and cfg.game == 'chess' and cfg.source != 'random':
        raise D.UserError(f"--soft_targets needs random games, not --source={cfg.source}: drop one of them")
    if cfg.game == 'othello' and cfg.block_size > 59:
        raise D.UserError("Othello games have 60 moves: --block_size must be at most 59")
    if cfg.optimizer not in ('adamw', 'muon'):
        raise D.UserError(f"unknown --optimizer {cfg.optimizer!r}: use adamw or muon")
    if cfg.sae_grid not in SWEEPS:
        raise D.UserError(f"unknown --sae_grid {cfg.sae_grid!r}: use {', '.join(SWEEPS)}")
    if cfg.control not in ('one', 'sweep', 'none'):
        raise D.UserError(f"unknown --control {cfg.control!r}: use one, sweep or none")
    if cfg.sae_cuda_graphs and not (cfg.sae_compile and device.startswith('cuda')):
        if not any(a.split('=')[0] == '--sae_cuda_graphs' for a in argv):
            cfg.sae_cuda_graphs = False  # the preset's, where graphs cannot run: the sweep runs without them
        else:
            raise D.UserError(f"--sae_cuda_graphs needs a CUDA GPU and --sae_compile (here --device={device}, "
                              f"--sae_compile={cfg.sae_compile}): drop --sae_cuda_graphs")
    if cfg.lm_cuda_graphs and not (cfg.compile and device.startswith('cuda')):
        raise D.UserError(f"--lm_cuda_graphs needs a CUDA GPU and --compile (here --device={device}, "
                          f"--compile={cfg.compile}): drop --lm_cuda_graphs")
    sae_archs(cfg)
    positive, non_negative = D.POSITIVE, D.NON_NEGATIVE
    D.check_options(cfg, 'train.py', {
        'data_dir': D.DIRECTORY, 'out_dir': D.DIRECTORY, 'seed': D.SEED,
        'n_games': non_negative, 'n_val': non_negative, 'n_label_games': positive, 'workers': positive,
        'n_layer': positive, 'n_head': positive,
        'n_embd': (lambda v: v >= 1 and v % cfg.n_head == 0, f'a multiple of --n_head={cfg.n_head}'),
        'block_size': positive, 'dropout': D.FRACTION, 'batch_size': positive, 'max_iters': positive,
        'lm_minutes': D.NON_NEGATIVE_REAL, 'lr': D.POSITIVE_REAL,
        'min_lr': (lambda v: 0 <= v <= cfg.lr, f'a number in [0, --lr={cfg.lr:g}]'),
        'warmup_iters': non_negative, 'weight_decay': D.NON_NEGATIVE_REAL, 'grad_clip': D.POSITIVE_REAL,
        'log_interval': positive, 'eval_interval': positive, 'eval_iters': positive, 'legal_games': positive,
        'layer': (lambda v: v >= -1, '-1 (the default depth) or a block index >= 0'),
        'sae_expansion': positive, 'sae_steps': positive, 'sae_minutes': D.NON_NEGATIVE_REAL,
        'sae_coef_scale': D.POSITIVE_REAL,
        'sae_batch': positive, 'sae_lr': D.POSITIVE_REAL, 'sae_warmup': positive, 'anneal_start': D.FRACTION,
        'sae_buffer': (lambda v: v >= cfg.sae_batch, f'at least --sae_batch={cfg.sae_batch}'),
        'sae_log_interval': positive, 'sae_ckpt_minutes': D.NON_NEGATIVE_REAL})
    # --sae_minutes fits the number of steps after step SAE_TIMING_STEPS, and a p schedule can be
    # refitted only before its first update (sae.PAnnealing): it must not start before
    if cfg.stage != 'lm' and fits_to_budget(cfg) and least_fitted_steps(cfg) > cfg.sae_steps:
        raise D.UserError(f"--anneal_start={cfg.anneal_start:g} starts p-annealing at step "
                          f"{round(cfg.anneal_start * cfg.sae_steps)} of --sae_steps={cfg.sae_steps}, before step "
                          f"{SAE_TIMING_STEPS}, at which --sae_minutes fits the number of steps to its budget: use a "
                          f"larger --anneal_start or --sae_steps, or --sae_minutes=0")
    if cfg.stage != 'sae' and not cfg.resume:  # else the checkpoint's n_layer and n_embd decide, once loaded
        check_layer(cfg, cfg.n_layer, f'--n_layer={cfg.n_layer}')
        if cfg.stage == 'all':  # an LM alone may be narrow: its SAEs' width is checked when they train
            check_width(cfg, cfg.n_embd, f'--n_embd={cfg.n_embd}')
    return cfg


def check_layer(cfg, n_layer, source):
    """--layer must name a block of the model the SAEs read: -1 or 0..n_layer-1. Then -1 becomes
    that block (resolved_layer), so that the config printed and saved holds the block read."""
    if cfg.layer >= n_layer:
        raise D.UserError(f"train.py: --layer={cfg.layer} is not allowed: use -1 or 0..{n_layer - 1} ({source})")
    cfg.layer = resolved_layer(cfg, n_layer)


def resolved_layer(cfg, n_layer):
    """The block the SAEs read: --layer, or for -1 the default depth of an n_layer model."""
    return cfg.layer if cfg.layer >= 0 else default_layer(n_layer)


def fits_to_budget(cfg):
    """Whether --sae_minutes fits the sweep's steps to its budget: a budget is set, and --sae_steps
    are more than the fewest a fit leaves (5 x SAE_TIMING_STEPS; fewer steps run as they are)."""
    return cfg.sae_minutes > 0 and cfg.sae_steps > 5 * SAE_TIMING_STEPS


def least_fitted_steps(cfg):
    """The fewest steps --sae_minutes fits a sweep to: 5 x SAE_TIMING_STEPS, and with a p-annealing
    architecture enough that its schedule, from --anneal_start of the steps, begins after step
    SAE_TIMING_STEPS, where the steps are fitted (inf where it never can: --anneal_start=0)."""
    least, start = 5 * SAE_TIMING_STEPS, cfg.anneal_start
    if not any(issubclass(ARCHS[a], PAnnealing) for a in sae_archs(cfg)):
        return least
    if start == 0:
        return math.inf
    n = max(least, math.floor((SAE_TIMING_STEPS - 1) / start))
    while round(start * n) < SAE_TIMING_STEPS:  # the schedule's first step, as sae.PAnnealing rounds it
        n += 1
    return n


def check_width(cfg, n_embd, source):
    """A TopK-like SAE keeps k of its d_sae = sae_expansion x n_embd features: each k of the
    sweep must fit, checked before any work (not when the SAEs first run, after the LM)."""
    d_sae = cfg.sae_expansion * n_embd
    too_big = [(s['k'], a) for a, s in sweep_grid(cfg, n_embd)[1] if s.get('k', 0) > d_sae]
    if too_big:
        k = max(too_big)[0]
        raise D.UserError(f"train.py: --sae_expansion={cfg.sae_expansion} gives {d_sae} features at width {n_embd} "
                          f"({source}), fewer than the sweep's k of {k}: use --sae_expansion of at least "
                          f"{-(-k // n_embd)}, or --sae_archs without {','.join(sorted({a for _, a in too_big}))}")


def sae_archs(cfg):
    """The architectures of --sae_archs: all of SWEEP's keys, or a comma-separated list of them."""
    if cfg.sae_archs == 'all':
        return list(SWEEP)
    archs = [a.strip() for a in cfg.sae_archs.split(',') if a.strip()]
    unknown = [a for a in archs if a not in SWEEP]
    if unknown or not archs:
        raise D.UserError(f"unknown --sae_archs {unknown or cfg.sae_archs!r}; choose from {','.join(SWEEP)}")
    return archs


def check_same_data(saved, train, digest, path, cfg):
    """A resumed run goes on with the training games it began on: `saved`, what its checkpoint
    `path` keeps ('data_sha256', the games' digest, and 'data_config', the options they were made
    with; neither in a fresh run or an old checkpoint), against `train`'s games, whose digest
    (data.tokens_digest) is `digest`."""
    if saved.get('data_sha256') in (None, digest):
        return
    made, found = saved.get('data_config') or {}, train['config']
    differ = ', '.join(f"--{k}={made.get(k)} there, {found.get(k)} here" for k in sorted(set(made) | set(found))
                       if made.get(k) != found.get(k) and k not in ('data_dir', 'workers', 'n_label_games')
                       and not (k == 'max_chars' and cfg.game == 'othello'))  # the options that make other games
    raise D.UserError(f"{path} began on other training games than {D.data_paths(cfg.game, cfg.data_dir)['train']} "
                      f"holds ({differ or 'made with the same options: a changed .pgn?'}): resume on those games, "
                      f"or run without --resume")


def ensure_data(cfg, log):
    """Make the data set if any of its files is missing; load train and val tokens."""
    paths = D.data_paths(cfg.game, cfg.data_dir)
    if rank_and_world()[0] == 0 and not all(os.path.exists(p) for p in paths.values()):
        log(f"data: {os.path.dirname(paths['train'])}/ incomplete, generating it")
        D.prepare(D.DataConfig(game=cfg.game, n_games=cfg.n_games, n_val=cfg.n_val, source=cfg.source,
                               max_chars=cfg.block_size + 1, n_label_games=cfg.n_label_games,
                               seed=cfg.seed, workers=cfg.workers, data_dir=cfg.data_dir), log=log)
    barrier()  # under torchrun the others wait for rank 0 to make the data
    train, val = (D.load_data(cfg.game, s, cfg.data_dir) for s in ('train', 'val'))
    n = len(train['tokens'])
    if cfg.source == 'random' and cfg.n_games and n != cfg.n_games:  # made earlier, by another preset or data.py
        log(f"data: {paths['train']} holds {n:,} games, not the {cfg.n_games:,} of --n_games: training on "
            f"them (for {cfg.n_games:,}: delete {os.path.dirname(paths['train'])}/ first)")
    T = train['tokens'].shape[1]
    if T < cfg.block_size + 1:
        raise D.DataError(f"{paths['train']} has games of {T} tokens but --block_size={cfg.block_size} "
                          f"needs {cfg.block_size + 1}: run `python data.py --game {cfg.game}"
                          f"{D.dir_args(cfg.data_dir)} --max_chars={cfg.block_size + 1}` (or lower --block_size)")
    return train, val


def lr_at(it, cfg, clock=0.0):
    """Linear warm-up, then cosine decay to min_lr at max_iters. clock: the fraction of the
    --lm_minutes budget used; the decay follows it where it is further along than the iterations."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    progress = min(1.0, max(clock, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def autocast_for(cfg):
    """bf16 or fp16 autocast where cfg.dtype (resolved by model.choose_precision in main) says
    so; plain fp32 otherwise."""
    if cfg.dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"autocast_for: resolve --dtype={cfg.dtype} with model.choose_precision first")
    if cfg.dtype == 'float32':
        return nullcontext
    device_type = 'cuda' if cfg.device.startswith('cuda') else 'cpu'
    return lambda: torch.autocast(device_type, dtype=getattr(torch, cfg.dtype))


def scaler_for(cfg):
    """The gradient scaler beside autocast_for's autocast: under fp16 (CUDA GPUs without bf16
    units) it scales the loss so that small gradients survive; a no-op otherwise."""
    return torch.amp.GradScaler('cuda' if cfg.device.startswith('cuda') else 'cpu', enabled=cfg.dtype == 'float16')


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


# Several processes (torchrun): main sets up torch.distributed; these read it, and do nothing
# special in one process.

def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) unless torchrun started several."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    """Wait until every process is here (one process: return at once)."""
    if dist.is_initialized():
        dist.barrier()


CLOCK_EVERY = 16  # under torchrun, steps between two readings of the LM's clock (train_lm)


def agree(value, op):
    """`value` reduced over the processes by `op` (dist.ReduceOp.MIN, MAX...): the one value all
    of them then use. One process: `value`."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device='cuda' if dist.get_backend() == 'nccl' else 'cpu')
    dist.all_reduce(t, op=op)
    return type(value)(t.item())


def lm_batch(tokens, soft, cfg, gen):
    """A random batch of cfg.batch_size games of `tokens` (N, T + 1), drawn by the generator
    `gen`: inputs (B, T) and targets, token ids (B, T), or with `soft` (row for row with tokens:
    Othello's legal-move bitboards (N, T), chess's next-character counts (N, T, vocab)) the
    next-token distributions (B, T, vocab). The set may live on the GPU: the batch is then one
    gather there, with no copy from the host but the indices."""
    idx = torch.randint(len(tokens), (cfg.batch_size,), generator=gen)
    if tokens.is_cuda:  # from pinned memory, without waiting: a plain copy to the GPU would wait for it
        idx = idx.pin_memory().to(tokens.device, non_blocking=True)
    b = tokens[idx].long().to(cfg.device)  # (B, T + 1); no copy where the set is on the GPU
    if soft is None:
        return b[:, :-1], b[:, 1:]
    if cfg.game == 'othello':
        return b[:, :-1], D.othello_soft_targets(soft[idx].to(cfg.device))
    counts = soft[idx].to(cfg.device).float()  # (B, T, vocab); all zero past a game's end
    return b[:, :-1], counts / counts.sum(-1, keepdim=True).clamp_min(1)


def lm_step(fwd, optimizer, scaler, autocast, x, y, grad_clip, weight=None):
    """One LM training step on inputs x (B, T) and targets y (lm_batch), the one place it is written
    (train_lm; bench.py times it): the loss of fwd (the model, running its compiled blocks where
    compile_blocks made them, or DDP around it) under autocast, times `weight` where given (a
    0-dim tensor), backward through the scaler (fp16: GradScaler; a no-op otherwise), the
    gradients clipped to a norm of grad_clip, the optimizer's step. Returns the loss, a 0-dim
    tensor: reading it waits for the step on a GPU."""
    with autocast():
        _, loss = fwd(x, y)
    if weight is not None:
        loss = loss * weight
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(fwd.parameters(), grad_clip)  # DDP's are its model's
    scaler.step(optimizer)  # skipped where an fp16 gradient overflowed
    scaler.update()
    return loss


def train_lm(cfg, log=print, precision=''):
    """The LM stage: returns the path of the checkpoint it wrote. precision: why cfg.dtype was
    chosen (saved in the checkpoint beside the dtype)."""
    torch.manual_seed(cfg.seed)
    ckpt_path = os.path.join(cfg.out_dir, cfg.game, 'model.pt')
    if cfg.resume:  # first: a checkpoint that cannot be resumed fails before any work (on the
        # CPU until the soft targets' worker processes have been forked)
        model, ckpt = load_checkpoint(ckpt_path, cfg.game, 'cpu', D.dir_args(cfg.data_dir, cfg.out_dir))
        if ckpt['model_config']['block_size'] != cfg.block_size:
            raise D.UserError(f"{ckpt_path} has context {ckpt['model_config']['block_size']}, "
                              f"not {cfg.block_size}: pass --block_size={ckpt['model_config']['block_size']}")
        if cfg.stage == 'all':
            check_layer(cfg, model.config.n_layer, f"{ckpt_path} has {model.config.n_layer} layers")
            check_width(cfg, model.config.n_embd, f"{ckpt_path} has width {model.config.n_embd}")
        # an LM that ran its --lm_minutes out: its final checkpoint (the one with a legal-move
        # rate) short of its own max_iters, as only the clock ends the loop early. Done unless the
        # budget is raised (or lifted: --lm_minutes=0 trains on to max_iters)
        saved = ckpt.get('train_config', {})
        stopped_by_clock = 'legal_move_rate' in ckpt and ckpt['iter'] < saved.get('max_iters', 0)
        ran_out = stopped_by_clock and 0 < cfg.lm_minutes <= saved.get('lm_minutes', 0.0)
        if (ckpt['iter'] >= cfg.max_iters or ran_out) and cfg.stage == 'all':  # killed after the LM: on to the SAEs
            why = (f"stopped by --lm_minutes={saved['lm_minutes']:g}" if ran_out
                   else f"of --max_iters={cfg.max_iters}")
            log(f"{ckpt_path} is at iter {ckpt['iter']} {why}: the LM is done")
            return ckpt_path
        if ckpt['iter'] >= cfg.max_iters:
            raise D.UserError(f"{ckpt_path} is at iter {ckpt['iter']}: --max_iters must be above it to continue")
        if ran_out:
            raise D.UserError(f"{ckpt_path} stopped at iter {ckpt['iter']} after its --lm_minutes="
                              f"{saved['lm_minutes']:g}: raise --lm_minutes to continue")
        trained_with = saved.get('optimizer', 'adamw')
        if trained_with != cfg.optimizer:
            raise D.UserError(f"{ckpt_path} was trained with --optimizer={trained_with}: resume with it")
    train, val = ensure_data(cfg, log)
    data_sha256 = D.tokens_digest(train['tokens'])  # kept in each checkpoint: --resume checks it
    if cfg.resume:
        check_same_data(ckpt, train, data_sha256, ckpt_path, cfg)
    T = cfg.block_size + 1
    train_tok, val_tok = train['tokens'][:, :T], val['tokens'][:, :T]  # (N, T) uint8
    pad_id, vocab = train['pad_id'], len(train['itos'])

    # soft targets, before any CUDA work, as the worker processes are forked. Othello: (N, T)
    # legal-move bitboards of the train games; chess: (N, T - 1, vocab) next-character counts
    soft = None
    if cfg.soft_targets and cfg.game == 'othello':
        t1 = time.time()
        soft = D.othello_legal_bitboards(train_tok, workers=cfg.workers, progress=log)[:, :-1]
        log(f"soft targets: legal moves of {len(train_tok)} train games in {time.time() - t1:.1f}s")
    elif cfg.soft_targets:  # kept with the data: rank 0 makes them if missing, the others then read them
        if rank_and_world()[0] == 0:
            soft = D.load_chess_soft_targets(cfg.data_dir, cfg.workers, log)
        barrier()
        if soft is None:
            soft = D.load_chess_soft_targets(cfg.data_dir, cfg.workers, log)
        soft = soft[:, :T - 1]
    if cfg.device.startswith('cuda'):
        # the training set lives on the GPU where it fits in a quarter of the free memory: a batch
        # is then one gather there, with no host-to-GPU copy of its tokens and targets each step
        size = train_tok.nbytes + (soft.nbytes if soft is not None else 0)
        if size < torch.cuda.mem_get_info(cfg.device)[0] / 4:
            train_tok, soft = train_tok.to(cfg.device), soft.to(cfg.device) if soft is not None else None
            log(f"train set on the GPU: {size / 2**20:.0f} MiB")

    start_iter = 0
    if cfg.resume:
        model, start_iter = model.to(cfg.device), ckpt['iter']
        log(f"resuming {ckpt_path} from iter {start_iter} (model config from the checkpoint)")
    else:
        model = GPT(GPTConfig(vocab_size=vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                              n_head=cfg.n_head, n_embd=cfg.n_embd, pad_id=pad_id, dropout=cfg.dropout)).to(cfg.device)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, kind=cfg.optimizer)
    if cfg.resume:
        optimizer.load_state_dict(ckpt['optimizer'])
    log(f"model: {model.n_params() / 1e6:.2f}M parameters, {model.config}")
    # under torchrun, DDP averages the gradients of the processes in backward; each process takes
    # its rows of every batch (batch_size // world or one more), so the batch is the same for any world
    rank, world = rank_and_world()
    if cfg.lm_cuda_graphs and world > 1:  # DDP's all-reduce runs inside the backward, which a graph would hold
        raise D.UserError("--lm_cuda_graphs runs in one process only, not under torchrun: drop it")
    graphs = {'mode': 'reduce-overhead'} if cfg.lm_cuda_graphs else {}
    raw_fwd = model.compile_blocks(**graphs) if cfg.compile else model
    fwd = DDP(raw_fwd, device_ids=[cfg.device] if cfg.device.startswith('cuda') else None) if world > 1 else raw_fwd
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    n_targets = lambda y: (y.sum(-1) > 0 if cfg.soft_targets else y != pad_id).sum()  # the loss's mean is over these
    autocast = autocast_for(cfg)
    scaler = scaler_for(cfg)
    # the training batches' generator: saved in every checkpoint and restored on --resume, so a
    # resumed run draws the batches the unstopped run would have drawn
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.resume and 'batch_rng' in ckpt:
        gen.set_state(ckpt['batch_rng'])
        torch.set_rng_state(ckpt['rng'])  # dropout's draws (on the CPU; on a GPU, 'cuda_rng')
        if 'cuda_rng' in ckpt and cfg.device.startswith('cuda'):
            torch.cuda.set_rng_state(ckpt['cuda_rng'], cfg.device)
    elif cfg.resume:  # a checkpoint from before the generator was saved: other batches from here
        gen.manual_seed(cfg.seed + start_iter)
    if cfg.resume and ckpt.get('scaler'):  # fp16: the loss scale it had reached, not a new one
        scaler.load_state_dict(ckpt['scaler'])

    @torch.no_grad()
    def val_loss():
        # the same val batches at every eval, drawn from their own seed; the training draws then
        # go on from where they were, so evals do not change which batches the training sees
        train_draws = gen.get_state()
        gen.manual_seed(cfg.seed + 1)
        model.eval()
        losses = [model(*lm_batch(val_tok, None, cfg, gen), compiled=False)[1].item() for _ in range(cfg.eval_iters)]
        model.train()
        gen.set_state(train_draws)
        return sum(losses) / len(losses)

    def save(it, **extra):
        save_checkpoint(ckpt_path, model, cfg.game, {
            'iter': it, 'train_config': dataclasses.asdict(cfg), 'optimizer': optimizer.state_dict(),
            'data_config': train['config'], 'data_sha256': data_sha256,
            'precision': {'dtype': cfg.dtype, 'reason': precision},
            'batch_rng': gen.get_state(), 'rng': torch.get_rng_state(), 'scaler': scaler.state_dict(),
            **({'cuda_rng': torch.cuda.get_rng_state(cfg.device)} if cfg.device.startswith('cuda') else {}),
            'clock_seconds': clock_before + now() - t0, **extra})

    model.train()
    # tokens per step (the whole batch, every process's rows; every position, pads included, as
    # the FLOP count): the log's tok/s, and times the model FLOP a token its TFLOP/s, which over the
    # machine's matmul ceiling (python bench.py --only=machine) is the model-FLOPs utilisation
    tokens_per_step, flop_per_token = cfg.batch_size * model.config.block_size, model.flops_per_token()
    t0 = now()
    # the seconds trained before a resume (the run's checkpoints keep them): --lm_minutes and the
    # lr schedule that follows it count the whole run's training, not this process's alone
    clock_before = ckpt.get('clock_seconds', 0.0) if cfg.resume else 0.0
    loss = None
    budget = cfg.lm_minutes * 60  # seconds; 0: no time limit
    # the fraction of the budget used; under torchrun the largest of the processes', so that all
    # take the same lr and stop together. Agreeing is an all-reduce read back on the host, which
    # waits for the GPU: under torchrun the clock is read every CLOCK_EVERY steps only (the same
    # steps on every process), so that most steps queue without waiting
    used = clock_before / budget if budget > 0 else 0.0
    last_iter = start_iter
    for it in range(start_iter, cfg.max_iters):
        lr = lr_at(it, cfg, used)
        for group in optimizer.param_groups:
            group['lr'] = lr
        x, y = lm_batch(train_tok, soft, cfg, gen)  # every process draws the same batch, (B, T)
        # one process holds the whole batch (its weight would be exactly 1); under torchrun each
        # process's mean loss is weighted by its share of the batch's targets (times world, as
        # DDP averages): the gradient is the one-process gradient of the whole batch's mean loss
        weight = n_targets(y[mine]) * world / n_targets(y) if world > 1 else None
        x, y = x[mine], y[mine]
        loss = lm_step(fwd, optimizer, scaler, autocast, x, y, cfg.grad_clip, weight)
        done, last_iter = it + 1 - start_iter, it + 1
        if budget > 0 and (world == 1 or done % CLOCK_EVERY == 0):
            used = agree((clock_before + now() - t0) / budget, dist.ReduceOp.MAX)
        out_of_time = used >= 1
        if done == 1:
            wait_for(cfg.device)
            t_first = now()  # the first step also compiles, under --compile: the estimate times the next 19
            if cfg.compile:
                log(f"LM: the first step, which compiles the model, took {t_first - t0:.1f}s")
        if done == 20 and it + 1 < cfg.max_iters:  # a first estimate, before the first log line
            wait_for(cfg.device)
            total = (t_first - t0) + (now() - t_first) / (done - 1) * (cfg.max_iters - start_iter - 1)
            log(f"LM: about {fmt_time(min(total, budget - clock_before) if budget > 0 else total)} of training "
                f"(timed on the first 20 steps)")
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters or out_of_time:
            loss_all = agree(loss.item(), dist.ReduceOp.SUM) / world  # the whole batch's mean loss (waits for the step)
            elapsed = now() - t0
            eta = elapsed / done * (cfg.max_iters - it - 1)
            if budget > 0:
                eta = min(eta, max(0.0, budget - clock_before - elapsed))
            # tokens and model FLOP a second over the steps after the first (which compiles, under
            # --compile), the evals and checkpoints between them included; the first step alone
            # while it is the only one
            steps, seconds = (done - 1, now() - t_first) if done > 1 else (1, elapsed)
            tok_s = steps * tokens_per_step / max(seconds, 1e-9)
            log(f"iter {it + 1}/{cfg.max_iters} | loss {loss_all:.4f} | lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s | "
                f"{tok_s * flop_per_token / 1e12:.3g} TFLOP/s | ETA {fmt_time(eta)}")
        if out_of_time:
            if it + 1 < cfg.max_iters:
                log(f"--lm_minutes={cfg.lm_minutes:g} used up: stopping at iter {it + 1} of {cfg.max_iters}")
            break
        if (it + 1) % cfg.eval_interval == 0 and it + 1 < cfg.max_iters and rank == 0:
            vl = val_loss()
            log(f"iter {it + 1}: val loss {vl:.4f}")
            save(it + 1, val_loss=vl)
    train_seconds = now() - t0
    if rank != 0:  # rank 0 alone evaluates and writes
        return ckpt_path
    vl = val_loss()
    log(f"final val loss {vl:.4f} ({fmt_time(train_seconds)} training)")
    t1 = time.time()
    model.eval()
    with autocast():  # the precision chosen for training, where it was measured the faster
        rate = metrics.legal_move_rate(model, cfg.game, val_tok[:cfg.legal_games], cfg.device)
    log(f"legal-move rate on {min(cfg.legal_games, len(val_tok))} val games: {rate:.4f} "
        f"({time.time() - t1:.1f}s to measure)")
    save(last_iter, val_loss=vl, legal_move_rate=rate, train_seconds=train_seconds)
    log(f"wrote {ckpt_path}")
    return ckpt_path


# ----------------------------------------------------------------------------------------------
# The SAE stage

# Sparsity settings per architecture, in three grids, each chosen where its presets train; each
# L1-penalty architecture's three settings aim at L0 of about 150, 40 and 10 (README, Presets).
# Normalised activations, E||x||^2 = d_in; MSE summed over d_in. For another width a grid's
# coefficients are scaled by the penalty's rule (sweep_settings, sae.SAE.COEF_POWER), and
# --sae_coef_scale shifts the whole grid. Edit to taste.
#
# SWEEP (--sae_grid=cpu): chosen at width 128 on the Othello cpu preset's model at its SAE lr
# (1e-2, 1000 steps): each L1 setting read off a run of the grid before (standard 0.5 / 1.6 / 4,
# gated 1 / 3 / 7, p-annealing 0.35 / 1.2 / 3.5, gated p-annealing 0.6 / 2.5 / 6.5), on straight
# lines between its L0s on log-log axes, at L0 150, 40 and 10; JumpReLU's gave 164 / 44 / 12 and
# stays. The chess cpu preset shifts the grid (--sae_coef_scale) to its model's L0.
SWEEP_WIDTH = 128
SWEEP = {
    'standard': [{'coef': c} for c in (0.53, 1.7, 2.7)],
    'gated': [{'coef': c} for c in (0.77, 2.0, 4.3)],
    'p_anneal': [{'coef': c} for c in (0.22, 0.72, 1.7)],
    'gated_anneal': [{'coef': c} for c in (0.37, 1.1, 3.0)],
    'topk': [{'k': k} for k in (10, 40, 160)],
    'batch_topk': [{'k': k} for k in (10, 40, 160)],
    'jumprelu': [{'coef': c} for c in (0.03, 0.3, 2.0)],
}
# SWEEP_GPU (--sae_grid=gpu: the Othello gpu and paper presets): chosen at width 512 on the
# Othello gpu preset's model. There SWEEP as it was (standard 0.5 / 1.6 / 4), width-scaled, gave
# final L0 from 270 to 0.2 (one H200 run, 2907 steps: standard 195 / 16 / 1.0 at 1 / 3.2 / 8): L0
# falls faster with the coefficient on this model than on the cpu ones. Each setting below is
# read off that run's L0 against its coefficient (straight lines between its points on log-log
# axes) at L0 150, 40 and 10. An architecture it does not name takes SWEEP's settings.
SWEEP_GPU_WIDTH = 512
SWEEP_GPU = {
    'standard': [{'coef': c} for c in (1.1, 2.1, 3.7)],
    'gated': [{'coef': c} for c in (1.7, 3.4, 6.5)],
    'p_anneal': [{'coef': c} for c in (0.5, 1.1, 2.5)],
    'gated_anneal': [{'coef': c} for c in (0.8, 1.8, 4.0)],
    'jumprelu': [{'coef': c} for c in (0.25, 1.0, 8.0)],
}
# SWEEP_GPU_CHESS (--sae_grid=gpu_chess: the chess gpu and paper presets): chosen at width 512 on
# the chess gpu preset's model, read off its run's L0 against the coefficient in the same way
# (past the run's points, which reached L0 93 at most, along the nearest line extended).
# There SWEEP_GPU x0.67 gave L0 from 93 to 4.4 (one H200 run, 2359 steps: standard 56 / 16 / 7.8
# at 0.74 / 1.4 / 2.5), and JumpReLU's L0 moved 10 times over its coefficients' 32 times, so
# that no one scale of SWEEP_GPU spans 10 to 150 for every architecture there.
SWEEP_GPU_CHESS = {
    'standard': [{'coef': c} for c in (0.44, 0.88, 2.0)],
    'gated': [{'coef': c} for c in (0.75, 1.6, 3.8)],
    'p_anneal': [{'coef': c} for c in (0.21, 0.42, 0.91)],
    'gated_anneal': [{'coef': c} for c in (0.41, 0.87, 2.0)],
    'jumprelu': [{'coef': c} for c in (0.043, 0.2, 1.3)],
}
SWEEPS = {'cpu': (SWEEP_WIDTH, SWEEP), 'gpu': (SWEEP_GPU_WIDTH, SWEEP_GPU),
          'gpu_chess': (SWEEP_GPU_WIDTH, SWEEP_GPU_CHESS)}


SAE_OPTIONS = ('anneal_start',)  # TrainConfig fields passed to every architecture that takes them


def sweep_settings(arch, d_in, scale=1.0, grid='cpu'):
    """The settings of `arch` in SWEEPS[grid] (SWEEP where that grid does not name the arch) for
    SAEs on a residual stream of width d_in: each coefficient times (d_in / the grid's width) **
    COEF_POWER of the architecture (sae.SAE.COEF_POWER: the coefficient that keeps L0 where it
    was grows as sqrt(d_in) for an L1 penalty, as d_in for JumpReLU's L0 penalty) and times
    `scale` (--sae_coef_scale), to 3 significant digits. SWEEP at width 512: L1 coefficients x2,
    JumpReLU's x4."""
    width, settings = SWEEPS[grid]
    if arch not in settings:
        width, settings = SWEEPS['cpu']
    factor = (d_in / width) ** ARCHS[arch].COEF_POWER * scale
    return [dict(s, coef=float(f"{s['coef'] * factor:.3g}")) if 'coef' in s else dict(s) for s in settings[arch]]


def default_layer(n_layer):
    """The paper reads the residual stream after block 6 of 8: the same relative depth."""
    return max(0, round(0.75 * n_layer) - 1)


def sweep_grid(cfg, d_in):
    """The sweep of --sae_archs at width d_in: ({arch: [setting]}, [(arch, setting)] in order)."""
    settings = {a: sweep_settings(a, d_in, cfg.sae_coef_scale, cfg.sae_grid) for a in sae_archs(cfg)}
    return settings, [(a, s) for a in settings for s in settings[a]]


def control_grid(cfg, settings, sweep):
    """The random-init control's [(arch, setting)]: --control=one, each architecture's middle
    setting; sweep, the whole sweep."""
    return sweep if cfg.control == 'sweep' else [(a, ss[len(ss) // 2]) for a, ss in settings.items()]


def sae_name(arch, setting):
    return arch + ''.join(f'_{k}{v:g}' for k, v in setting.items())


class ActivationStream:
    """Endless (sae_batch, d) fp32 batches of the residual stream after block `layer` at the
    non-pad positions of random games, shuffled across games within a buffer of sae_buffer.
    Restartable: state() is the generator's state when the current buffer was filled and the
    number of batches taken from it; ActivationStream(..., state=that) fills that buffer again
    and goes on with the very batches the stream it came from would have given."""

    def __init__(self, model, tokens, layer, pad_id, cfg, seed, state=None):
        self.model, self.tokens, self.layer, self.pad_id, self.cfg = model, tokens, layer, pad_id, cfg
        self.gen = torch.Generator().manual_seed(seed)
        if state is not None:
            self.gen.set_state(state['rng'])
        self._fill()
        self.taken = state['taken'] if state is not None else 0

    def _fill(self):
        cfg, autocast = self.cfg, autocast_for(self.cfg)
        self.filled_from = self.gen.get_state()
        # games per model pass: sae_batch / 16, at least 64. The gpu presets' 512 (30k Othello
        # positions) make a refill of their 1M-activation buffer about 35 passes, each long
        # enough for a GPU; passes of 64 games, about 280 a refill, would each be a string of
        # small kernels and a wait for the data's pad mask. The cpu presets keep 64
        games = max(64, cfg.sae_batch // 16)
        chunks, n = [], 0
        while n < cfg.sae_buffer:
            idx = torch.randint(len(self.tokens), (games,), generator=self.gen)
            x = self.tokens[idx, :-1].long().to(cfg.device)  # (games, T)
            with torch.no_grad(), autocast():
                resid = self.model.residual(x, self.layer)  # (games, T, d)
            chunks.append(resid[x != self.pad_id].float())  # (n_valid, d)
            n += len(chunks[-1])
        self.buffer = torch.cat(chunks)  # (n, d), n >= sae_buffer
        self.perm = torch.randperm(len(self.buffer), generator=self.gen).to(self.buffer.device)
        self.taken = 0

    def state(self):
        return {'rng': self.filled_from, 'taken': self.taken}

    def __iter__(self):
        return self

    def __next__(self):
        B = self.cfg.sae_batch
        if (self.taken + 1) * B > len(self.buffer):
            self._fill()
        self.taken += 1
        return self.buffer[self.perm[(self.taken - 1) * B:self.taken * B]]


SAE_TIMING_STEPS = 20  # --sae_minutes: steps run before the step count is fitted to the budget, of which
SAE_SETTLING_STEPS = 2  # the first untimed, as slower than the rest: under --sae_compile the first compiles and
                        # with --sae_cuda_graphs the second records the graphs that later steps replay (on an
                        # H200, timing from the second step put 0.0345 s on steps that then ran at 0.030)


def new_sweep_saes(cfg, mine, d_sae, n_steps, first):
    """{name: SAE} for `mine` [(arch, setting)], new, on cfg.device, in
    train mode, normalised and centred on the first batch `first` (B, d_in). train_sae_sweep's,
    and warm_sae_compile's, so that the second process compiles the very SAEs the sweep trains."""
    saes = {}
    for arch, setting in mine:
        name = sae_name(arch, setting)
        kwargs = dict(setting, total_steps=n_steps)
        # the config's SAE options go to the architectures whose constructor takes them
        # (p-annealing's anneal_start), read from the signature rather than from arch names
        takes = inspect.signature(ARCHS[arch]).parameters
        kwargs.update({key: getattr(cfg, key) for key in SAE_OPTIONS if key in takes})
        # its own seed, from its name: the same init in any process and any sweep, and in the control
        # as in the sweep (the trained and the random-init model's SAEs of a name start alike)
        torch.manual_seed(cfg.seed * 2 ** 32 + zlib.crc32(name.encode()))
        sae = make_sae(arch, first.shape[1], d_sae, **kwargs).to(cfg.device)
        sae.set_act_scale(first)
        sae.init_b_dec(first)
        saes[name] = sae.train()
    return saes


def ready_to_train(saes, cfg):
    """The sweep's precision and compiling for `saes` (a list), new or resumed: their encoder and
    decoder products in bf16 where the LM's bf16 was measured (or known, CUDA) to be the faster,
    all else fp32 (sae.py; fp16 has no scaler here). Returns, under --sae_compile, their losses
    compiled as one function (sae.compile_losses: one forward and one backward a step for all
    of them, traced and compiled at their first step; under --sae_cuda_graphs two CUDA graphs a
    step) for train_step's `losses`, else None."""
    for sae in saes:
        sae.matmul_dtype = torch.bfloat16 if cfg.dtype == 'bfloat16' else torch.float32
    return compile_losses(saes, cuda_graphs=cfg.sae_cuda_graphs) if cfg.sae_compile and saes else None


def compile_stats():
    """torch.compile's running totals in this process: (seconds compiling, forwards and backwards;
    seconds of them tracing Python; autograd graphs its disk cache gave; autograd graphs looked
    for; inductor graphs its disk cache gave; inductor graphs looked for). The autograd cache
    holds a traced forward and backward whole, the inductor cache the kernels compiled from
    them. A difference of two of these says where a first step's time went: compiling, or
    loading from the caches (--sae_precompile), or neither (running, recording CUDA graphs)."""
    from torch._dynamo.utils import compilation_time_metrics as seconds, counters
    aot, inductor = counters['aot_autograd'], counters['inductor']
    return (sum(seconds.get('_compile.compile_inner', ())) + sum(seconds.get('backward._backward_impl', ())),
            sum(seconds.get('bytecode_tracing', ())), aot['autograd_cache_hit'],
            aot['autograd_cache_hit'] + aot['autograd_cache_miss'] + aot['autograd_cache_bypass'],
            inductor['fxgraph_cache_hit'], inductor['fxgraph_cache_hit'] + inductor['fxgraph_cache_miss'])


def warm_sae_compile(cfg_json):
    """The second process of --sae_precompile, started as the LM starts training: the sweep's
    SAEs, and then the random-init control's, built as train_sae_sweep builds them
    (new_sweep_saes, ready_to_train) at its shapes, take one compiled train_step on random
    activations (each set of SAEs is one compiled function). That leaves their compiled forward and
    backward in torch.compile's caches on disk (inductor's graph cache and its autograd cache,
    which the processes of one machine share), and the sweep's own first step loads them instead
    of compiling (the tiny preset's 21 SAEs on a 2-core CPU, with and without it: README, Presets).
    Prints its seconds. Its activations are random: nothing it computes is kept."""
    t0 = time.time()
    cfg = TrainConfig(**json.loads(cfg_json))
    first = torch.randn(cfg.sae_batch, cfg.n_embd, device=cfg.device)  # (B, d_in), as a batch of the sweep
    settings, sweep = sweep_grid(cfg, cfg.n_embd)
    for part in [sweep] + ([control_grid(cfg, settings, sweep)] if cfg.control != 'none' else []):
        saes = list(new_sweep_saes(cfg, part, cfg.sae_expansion * cfg.n_embd, cfg.sae_steps, first).values())
        train_step(saes, make_optimizer(saes, cfg.sae_lr), first, 0, cfg.sae_lr, losses=ready_to_train(saes, cfg))
    wait_for(cfg.device)
    print(f"{time.time() - t0:.1f}")


def start_sae_precompile(cfg, log):
    """--sae_precompile: warm_sae_compile in a second process, at a lower priority, with half this
    machine's cores for compiling; (process, its output) to hand to join_sae_precompile, or None where there is
    nothing to do (no --sae_compile, a stage of its own, several processes under torchrun)."""
    if not (cfg.sae_precompile and cfg.sae_compile and cfg.stage == 'all') or rank_and_world()[1] > 1:
        return None
    output = tempfile.TemporaryFile()  # no name: nothing is left behind, whatever happens
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS=str(max(1, (os.cpu_count() or 2) // 2)))
    # at a lower priority (nice 10, where the system has it): the data, the soft targets' worker
    # processes and the LM come first, and the compiling takes the cores they leave
    code = (f'import os; getattr(os, "nice", lambda n: 0)(10); import train; '
            f'train.warm_sae_compile({json.dumps(json.dumps(dataclasses.asdict(cfg)))})')
    process = subprocess.Popen([sys.executable, '-c', code], cwd=os.path.dirname(os.path.abspath(__file__)),
                               env=env, stdout=output, stderr=subprocess.STDOUT)
    log("sae: a second process compiles the sweep's losses while the LM trains (--sae_precompile)")
    return process, output


def join_sae_precompile(job, log, timeout=600):
    """Wait for start_sae_precompile's process (at most `timeout` s, then stop it) and say how
    it went; whatever it did, the sweep then compiles what the cache does not hold."""
    if job is None:
        return
    process, output = job
    try:
        process.wait(timeout=timeout)
        why = f"exit code {process.returncode}"
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        why = f"stopped after {timeout:g}s more"
    output.seek(0)
    last = (output.read().decode(errors='replace').strip().splitlines() or [''])[-1][:200]
    output.close()
    if process.returncode == 0:
        log(f"sae: the second process compiled the sweep's losses in {last}s, into torch.compile's cache")
    else:
        log(f"sae: the second process did not finish ({why}{': ' + last if last else ''}); "
            f"the sweep compiles its losses itself")


def train_sae_sweep(cfg, model, model_id, tokens, val_tokens, pad_id, sweep, out_dir, log=print, n_steps=None,
                    resume=None, checkpoint=None):
    """Train every SAE of `sweep` [(arch, setting)] on the same activation batches (the model
    runs once per batch, not once per SAE) and save each to out_dir/<name>.pt. Under torchrun
    each process trains its share, sweep[rank::world], on the batches it computes itself: the
    same batches, so the same files as one process writes. Steps: n_steps, else cfg.sae_steps,
    fewer if --sae_minutes says so (at least 5 x SAE_TIMING_STEPS).
    Every --sae_ckpt_minutes `checkpoint(state)` gets the whole sweep's state (each SAE with its
    training state and optimizer, the step, the stream's position, the logs so far); `resume`,
    such a state, continues the sweep from it. Returns (one dict per SAE of this process: its
    name, final scores, speed and the steps it trained; the steps)."""
    rank, world = rank_and_world()
    layer = resolved_layer(cfg, model.config.n_layer)
    d_in = model.config.n_embd
    d_sae = cfg.sae_expansion * d_in
    model.eval()
    held_out = next(ActivationStream(model, val_tokens, layer, pad_id,
                                     dataclasses.replace(cfg, sae_batch=8192, sae_buffer=8192), cfg.seed + 1))
    saes = {}
    mine = sweep[rank::world]
    if resume is None:
        stream = ActivationStream(model, tokens, layer, pad_id, cfg, cfg.seed)
        first = next(stream)  # normalisation and b_dec come from the first training batch
        fit_to_budget = n_steps is None and fits_to_budget(cfg)
        n_steps = n_steps or cfg.sae_steps
        saes = new_sweep_saes(cfg, mine, d_sae, n_steps, first)
        # the steps' time and number, each run's first step left out (it compiles under --sae_compile)
        # unless it is the only one; on a GPU the clock sees only the launches: replaced below
        seconds, timed_steps = 0.0, 0
        window = {name: [] for name in saes}
        history = {name: [] for name in saes}
        step = 0
    else:
        stream = ActivationStream(model, tokens, layer, pad_id, cfg, cfg.seed, state=resume['stream'])
        # a checkpoint is written only once the steps are fitted to --sae_minutes (below)
        fit_to_budget, n_steps, step = False, resume['n_steps'], resume['step']
        for name, saved in resume['saes'].items():
            saes[name] = sae_from_dict(saved, cfg.device).train()
        seconds, timed_steps, window, history = resume['seconds'], resume['timed_steps'], resume['window'], resume['history']
        log(f"sae: resuming {len(saes)} SAEs at step {step} of {n_steps}")
    # one optimiser for all (sae.make_optimizer), over the SAEs in their order (a resumed sweep's saved one)
    optimizer = make_optimizer(saes.values(), cfg.sae_lr) if saes else None
    if optimizer and resume is not None:
        optimizer.load_state_dict(resume['optimizer'])
    losses = ready_to_train(list(saes.values()), cfg)
    log(f"sae: {len(saes)} SAEs" + (f" (this process's share of {len(sweep)})" if world > 1 else "") +
        f", d_in {d_in} -> d_sae {d_sae}, layer {layer}, {n_steps} steps x {cfg.sae_batch} activations, "
        f"into {out_dir}/" + (f" (at most {cfg.sae_minutes:g} min)" if fit_to_budget else ""))
    t0 = saved_at = now()
    start = step
    t_timing = None  # the end of the first step (which compiles, under --sae_compile): steps are timed from it
    t_settled = None  # the end of the SAE_SETTLING_STEPS: the budget's fit times the steps after them
    compiled_before = compile_stats()
    while step < n_steps:
        x = first if step == 0 else next(stream)
        # linear warm-up, constant, then linear decay over the last 20% of steps
        lr = cfg.sae_lr * min(1.0, (step + 1) / cfg.sae_warmup, 5 * (1 - step / n_steps))
        if cfg.sae_cuda_graphs:  # each step's graphs are a new sequence (sae.compile_losses)
            torch.compiler.cudagraph_mark_step_begin()
        t = time.perf_counter()
        for name, stats in zip(saes, train_step(list(saes.values()), optimizer, x, step, lr, losses) if saes else []):
            window[name].append(stats['mse'])  # a tensor: read when logged
        if step > start or n_steps - start == 1:
            seconds, timed_steps = seconds + time.perf_counter() - t, timed_steps + 1
        if step == start:
            wait_for(cfg.device)
            t_timing = now()
            if cfg.sae_compile:
                spent, tracing, aot_hit, aot, fx_hit, fx = (b - a for a, b in zip(compiled_before, compile_stats()))
                log(f"sae: the first step, which compiles the SAEs' losses, took {t_timing - t0:.1f}s, "
                    f"{spent:.1f}s of it in torch.compile ({tracing:.1f}s tracing Python; from its disk "
                    f"cache {aot_hit} of {aot} autograd graphs, {fx_hit} of {fx} inductor graphs)")
        if step + 1 == start + SAE_SETTLING_STEPS:
            wait_for(cfg.device)
            t_settled = now()
        if step + 1 == start + SAE_TIMING_STEPS and n_steps > step + 1:
            wait_for(cfg.device)
            per_step = (now() - t_settled) / (SAE_TIMING_STEPS - SAE_SETTLING_STEPS)  # the steps after those
            if fit_to_budget:
                # with 10% to spare for the buffer refills still to come; the budget counts from the
                # sweep's start, its first step included (which compiles, under --sae_compile, for as
                # long as this machine takes: the steps get what compiling leaves, and the run ends
                # on time). Under torchrun every process takes the smallest count, so the control's
                # steps agree
                per_step *= 1.1
                left = cfg.sae_minutes * 60 - (now() - t0)
                fits = step + 1 + int(left / per_step)
                n_steps = agree(max(least_fitted_steps(cfg), min(n_steps, fits)), dist.ReduceOp.MIN)
                for sae in saes.values():
                    sae.set_total_steps(n_steps)
                fit_to_budget = False
                log(f"sae: {per_step:.3f}s a step: " + (
                    f"{n_steps} steps fit in --sae_minutes={cfg.sae_minutes:g}" if n_steps <= fits else
                    f"{max(fits, step + 1)} steps fit in --sae_minutes={cfg.sae_minutes:g}, fewer than a budgeted "
                    f"sweep's least, {n_steps}: it will take longer"))
            else:  # no budget: an estimate (e.g. --preset paper); after a resume, of this process's steps
                log(f"sae: about {fmt_time(now() - t0 + per_step * (n_steps - step - 1))} for "
                    + (f"{n_steps} steps" if start == 0 else f"the {n_steps - start} steps after step {start}")
                    + f" (timed on steps {start + SAE_SETTLING_STEPS + 1}-{start + SAE_TIMING_STEPS}; "
                    "buffer refills not counted)")
        if (step + 1) % cfg.sae_log_interval == 0 or step + 1 == n_steps:
            wait_for(cfg.device)
            # activations through the whole sweep per second, over the steps after the first (which
            # compiles, under --sae_compile, and is logged on its own)
            timed, elapsed = (step - start, now() - t_timing) if step > start else (1, now() - t0)
            rate = timed * cfg.sae_batch / elapsed
            flops = rate * len(saes) * SAE.flops_per_activation(d_in, d_sae)  # the dense count
            log(f"sae step {step + 1}/{n_steps} | {rate / 1e3:.1f}k act/s through all {len(saes)} SAEs "
                f"({rate * len(saes) / 1e3:.0f}k SAE-act/s = {flops / 1e12:.3g} TFLOP/s) | "
                + (f"ETA {fmt_time(elapsed / timed * (n_steps - step - 1))}" if not fit_to_budget else
                   f"ETA after step {SAE_TIMING_STEPS}, when the steps are fitted to --sae_minutes"))
            for name, sae in saes.items():
                mse = sum(float(v) for v in window[name]) / len(window[name])
                ev = metrics.sae_scores(sae, held_out)
                history[name].append({'step': step + 1, 'mse': mse, 'p': sae.p, 'coef': sae.coef, **ev})
                window[name] = []
                log(f"  {name:24s} mse {mse:8.3f} | L0 {ev['l0']:6.1f} | expl. var. {ev['explained_variance']:.3f} | "
                    f"dead {ev['dead_fraction']:.3f} | p {sae.p:.2f}")
        step += 1
        # not while the steps wait to be fitted to --sae_minutes: a resumed sweep could not fit them,
        # as the p-annealing schedules may have started by its 20th step (a kill in those first
        # steps starts the sweep over)
        if checkpoint and not fit_to_budget and step < n_steps and now() - saved_at >= cfg.sae_ckpt_minutes * 60:
            checkpoint({'step': step, 'n_steps': n_steps, 'stream': stream.state(),
                        'saes': {name: sae_to_dict(sae) for name, sae in saes.items()},
                        'optimizer': optimizer.state_dict() if optimizer else None,
                        'seconds': seconds, 'timed_steps': timed_steps,
                        'window': {name: [float(v) for v in w] for name, w in window.items()}, 'history': history})
            saved_at = now()
    # on a CPU `seconds` sums the steps' own times (buffer refills and the log lines' scoring left
    # out); a GPU ran the steps queued, unseen by the clock around them: there the wall time after
    # the first step (which compiles, under --sae_compile), refills and scoring included
    if cfg.device != 'cpu' and n_steps - start > 1:
        wait_for(cfg.device)
        seconds, timed_steps = now() - t_timing, n_steps - start - 1
    # the SAEs train in one step, sharing its optimiser: each gets an equal share of its time
    acts_per_s = timed_steps * cfg.sae_batch * len(saes) / max(seconds, 1e-9)
    results = []
    for name, sae in saes.items():
        sae.matmul_dtype = torch.float32  # scored as evaluate.py scores it: a loaded SAE computes in fp32
        final = metrics.sae_scores(sae, held_out)
        save_sae(sae.cpu(), os.path.join(out_dir, f'{name}.pt'), {
            'name': name, 'game': cfg.game, 'layer': layer, 'model': model_id,
            'train_config': dataclasses.asdict(cfg), 'final': final, 'history': history[name],
            'acts_per_s': acts_per_s, 'steps': n_steps})
        results.append({'name': name, **final, 'acts_per_s': acts_per_s, 'steps': n_steps})
    if not results:  # more processes than SAEs: this one had none
        return results, n_steps
    log(f"sae: wrote {len(saes)} SAEs to {out_dir}/ in {fmt_time(now() - t0)}; {acts_per_s / len(saes) / 1e3:.1f}k "
        f"act/s through all {len(saes)}, {acts_per_s / 1e3:.1f}k act/s an SAE"
        + (" (the steps' own time: buffer refills and scoring left out)" if cfg.device == 'cpu' else ""))
    for r in results:
        log(f"  {r['name']:24s} expl. var. {r['explained_variance']:.3f} | L0 {r['l0']:6.1f} | dead {r['dead_fraction']:.3f}")
    others = sorted({os.path.basename(p)[:-3] for p in glob.glob(os.path.join(out_dir, '*.pt'))} - {sae_name(*s) for s in sweep})
    if others:  # kept, never deleted: they may be a user's own runs
        log(f"note: {out_dir}/ also holds {len(others)} SAEs this run did not write ({', '.join(others)}); "
            f"evaluate.py scores every SAE trained on the current model: delete those files to leave them out")
    return results, n_steps


# each model's SAEs under out/<game>/: the trained LM's and the random-init control's (evaluate.py reads them)
SAE_DIRS = {'trained': 'saes', 'random': 'saes_random'}
SWEEP_FORMAT = 'boardgame-saes/sae-sweep'
SWEEP_VERSION = 3  # 2: one optimiser for the SAEs of a sweep (sae.make_optimizer), where 1 kept one each;
                   # 3: its options hold the block read, where 2 held --layer's -1 (the default depth)


def sweep_checkpoint(cfg):
    """The SAE stage's checkpoint (one per process under torchrun: each holds its share)."""
    rank, world = rank_and_world()
    name = 'sae_sweep.pt' if world == 1 else f'sae_sweep.{rank}of{world}.pt'
    return os.path.join(cfg.out_dir, cfg.game, name)


def sweep_checkpoints(cfg):
    """The SAE stage's checkpoints in the out directory, of any number of processes."""
    folder = glob.escape(os.path.join(cfg.out_dir, cfg.game))
    return sorted(glob.glob(os.path.join(folder, 'sae_sweep.pt'))
                  + glob.glob(os.path.join(folder, 'sae_sweep.*of*.pt')))


def sweep_options(cfg):
    """The options a resumed sweep must share with the one it continues."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if (k.startswith('sae_') and k not in ('sae_ckpt_minutes', 'sae_compile', 'sae_cuda_graphs')) or k in ('game', 'seed', 'layer', 'anneal_start', 'control')}


def holds_model(path, model):
    """Whether `path` holds `model`'s config and weights already. The control's model is rewritten
    only where it does not: a new file (its train_config differs) would have a new digest, and
    evaluate.py would take the control's SAEs of an earlier sweep as trained on another model."""
    try:
        saved, _ = load_checkpoint(path)
    except D.UserError:  # none there, or not a model this code reads: write it
        return False
    return saved.config == model.config and all(
        torch.equal(a, b.cpu()) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))


def train_saes(cfg, log=print):
    """The SAE stage: the sweep on the trained model, then the control on a random-init model.
    Its checkpoint (sweep_checkpoint) holds the part running (saes: the trained model's sweep;
    saes_random: the control), what the finished part returned and the running part's state; it
    is removed once the stage is done. --resume continues from it."""
    ckpt_path = os.path.join(cfg.out_dir, cfg.game, 'model.pt')
    model, ckpt = load_checkpoint(ckpt_path, cfg.game, cfg.device, D.dir_args(cfg.data_dir, cfg.out_dir))
    check_layer(cfg, model.config.n_layer, f"{ckpt_path} has {model.config.n_layer} layers")
    check_width(cfg, model.config.n_embd, f"{ckpt_path} has width {model.config.n_embd}")
    model_id = {'path': ckpt_path, 'iter': ckpt['iter'], 'sha256': D.file_digest(ckpt_path), 'random_init': False}
    sweep_path = sweep_checkpoint(cfg)
    saved = {'part': 'saes', 'state': None}
    if not cfg.resume:  # a killed sweep's checkpoints, of any number of processes: this one starts over
        if rank_and_world()[0] == 0:
            for path in sweep_checkpoints(cfg):
                os.remove(path)
        barrier()
    if cfg.resume and os.path.exists(sweep_path):
        hint = f'python train.py --game {cfg.game}{D.dir_args(cfg.data_dir, cfg.out_dir)} --stage sae'
        saved = D.load_file(sweep_path, SWEEP_FORMAT, hint, SWEEP_VERSION)
        if saved['model_sha256'] != model_id['sha256']:
            raise D.UserError(f"{sweep_path} is a sweep on another {ckpt_path}: run without --resume to start the sweep over")
        for key, value in saved['options'].items():
            if value != getattr(cfg, key):
                raise D.UserError(f"{sweep_path} is a sweep with --{key}={value}: resume with it "
                                  f"(or run without --resume to start the sweep over)")
        log(f"sae: resuming {sweep_path} ({saved['part']})")

    def checkpointer(part, done=None):
        return lambda state: D.atomic_save({'format': SWEEP_FORMAT, 'version': SWEEP_VERSION, 'part': part,
                                            'done': done, 'state': state, 'model_sha256': model_id['sha256'],
                                            'options': sweep_options(cfg), 'data_config': train['config'],
                                            'data_sha256': data_sha256}, sweep_path)

    train, val = ensure_data(cfg, log)
    data_sha256 = D.tokens_digest(train['tokens'])
    check_same_data(saved, train, data_sha256, sweep_path, cfg)
    T = model.config.block_size + 1
    tokens, val_tokens = train['tokens'][:, :T], val['tokens'][:, :T]
    settings, sweep = sweep_grid(cfg, model.config.n_embd)
    if saved['part'] == 'saes':
        done = train_sae_sweep(cfg, model, model_id, tokens, val_tokens, train['pad_id'], sweep,
                               os.path.join(cfg.out_dir, cfg.game, SAE_DIRS['trained']), log,
                               resume=saved['state'], checkpoint=checkpointer('saes'))
        saved = {'part': 'saes_random', 'state': None}
        if cfg.control != 'none':  # a kill in the control, before its first checkpoint, keeps the sweep done
            checkpointer('saes_random', done)(None)
    else:
        done = saved['done']
    results, n_steps = done
    if cfg.control != 'none':
        # the paper's control: the same shape, never trained
        torch.manual_seed(cfg.seed + 1)
        random_model = GPT(model.config).to(cfg.device)
        random_path = os.path.join(cfg.out_dir, cfg.game, 'model_random.pt')
        if rank_and_world()[0] == 0 and not holds_model(random_path, random_model):
            save_checkpoint(random_path, random_model, cfg.game, {'iter': 0, 'random_init': True,
                                                                   'train_config': dataclasses.asdict(cfg)})
        barrier()  # written before any process reads its digest
        random_id = {'path': random_path, 'iter': 0, 'sha256': D.file_digest(random_path), 'random_init': True}
        control = control_grid(cfg, settings, sweep)
        log(f"sae: control on a random-init model ({len(control)} SAEs)")
        # as many steps as the trained model's SAEs had (fewer than sae_steps under --sae_minutes)
        results = results + train_sae_sweep(cfg, random_model, random_id, tokens, val_tokens, train['pad_id'], control,
                                            os.path.join(cfg.out_dir, cfg.game, SAE_DIRS['random']), log,
                                            n_steps=n_steps, resume=saved['state'],
                                            checkpoint=checkpointer('saes_random', done))[0]
    barrier()  # every process is done (one that removed its checkpoint first would leave the
    # others' alone after a kill now, which no --resume could continue)
    if os.path.exists(sweep_path):  # done: a later --resume must not start this sweep again
        os.remove(sweep_path)
    return results


def main(argv):
    cfg = build_config(argv)
    # several processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE in each (README, "Several
    # processes"); process LOCAL_RANK of a machine takes its GPU of that number
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        if cfg.device.startswith('cuda'):
            cfg.device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(cfg.device)
        # the others wait for rank 0 while it makes missing data: allow an hour
        dist.init_process_group('nccl' if cfg.device.startswith('cuda') else 'gloo', timeout=timedelta(hours=1))
    rank, world = rank_and_world()
    if cfg.batch_size < world:
        raise D.UserError(f"train.py: --batch_size={cfg.batch_size} is not allowed with {world} processes: "
                          f"use at least {world} (each process takes batch_size // {world} rows or one more)")
    log = print if rank == 0 else (lambda *args: None)  # rank 0 alone logs
    cfg.dtype, precision = choose_precision(cfg.dtype, cfg.device, cfg.n_embd)
    if ddp:  # rank 0's measurement decides for all: a close call could go either way in each
        choice = [cfg.dtype, precision]
        dist.broadcast_object_list(choice, src=0)
        cfg.dtype, precision = choice
    out = os.path.join(cfg.out_dir, cfg.game)
    for sub in SAE_DIRS.values():  # fail now, not after the LM has trained
        D.check_output_dir(os.path.join(out, sub), 'out_dir')
    # --resume continues the stage that was running: the SAE sweep where its checkpoint exists
    # (under torchrun each process has its own: all of them, or none, as every process decides alike)
    resume_sweep = False
    if cfg.resume and cfg.stage != 'lm':
        sweeps = sweep_checkpoints(cfg)
        have = agree(int(os.path.exists(sweep_checkpoint(cfg))), dist.ReduceOp.SUM)  # of the `world` processes
        if sweeps and have == 0:
            raise D.UserError(f"{sweeps[0]} is the checkpoint of a sweep on another number of processes: resume "
                              f"with that number (torchrun --nproc_per_node), or delete it to start the sweep over")
        if 0 < have < world:
            raise D.UserError(f"{out}/ holds the sweep checkpoints of {have} of these {world} processes (a kill "
                              "came before each had written one, or as they removed theirs at the end): run without "
                              f"--resume to start the sweep over: `python train.py --game {cfg.game}"
                              f"{D.dir_args(cfg.data_dir, cfg.out_dir)} --stage sae`")
        resume_sweep = have == world
    log(f"train.py config: {dataclasses.asdict(cfg)}")
    log(f"precision: {cfg.dtype} ({precision})" + (f"; {world} processes ({dist.get_backend()})" if ddp else ""))
    t0 = time.time()
    # a second run on this out_dir refuses at once; under torchrun rank 0 holds the lock for all
    with D.lock_dir(out, 'out_dir') if rank == 0 else nullcontext():
        barrier()  # the others start once rank 0 holds the lock (and has removed a killed run's temp files)
        if cfg.stage in ('lm', 'all') and not resume_sweep:
            precompile = start_sae_precompile(cfg, log)
            try:
                train_lm(cfg, log, precision=precision)
            except BaseException:  # the second process goes too, without a word: the error is the news
                join_sae_precompile(precompile, lambda _: None, timeout=0)
                raise
            barrier()  # every process's SAE stage reads the model.pt rank 0 wrote
            log(f"LM stage done in {fmt_time(time.time() - t0)}")
            join_sae_precompile(precompile, log)
        if cfg.stage in ('sae', 'all'):
            t1 = time.time()
            train_saes(cfg, log)
            log(f"SAE stage done in {fmt_time(time.time() - t1)}")
        barrier()  # rank 0 keeps the lock until every process has written its files
    log(f"train.py done in {fmt_time(time.time() - t0)}; next: python evaluate.py --game {cfg.game}"
        f"{D.dir_args(cfg.data_dir, cfg.out_dir)}")
    if ddp:
        dist.destroy_process_group()


if __name__ == '__main__':
    D.run_cli(main)
