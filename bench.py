"""
Speed figures for the README, each measured as a ratio within one run (machines are shared
and noisy: compare numbers from the same run only).

Reads/writes nothing. Run: python bench.py            (about a minute on 2 CPU cores)
                          python bench.py --only=sae  (othello | lm | sae | metrics)

  othello  vectorised bitboard generator vs a naive per-square Python generator (games/s)
  lm       GPT training tokens/s at nanoGPT's yardstick shape (4 layers, 192 wide, context 255,
           batch 32): fp32 vs bf16 autocast
  sae      SAE training activations/s at d_in 256, d_sae 2048, batch 4096, one optimiser step
           per batch as train.py does it, for every architecture
  metrics  coverage + board reconstruction, 4096 features x 20,000 positions x 768 elements
"""
import time
from dataclasses import dataclass

import numpy as np
import torch

import data as D
import metrics
from model import GPT, GPTConfig
from sae import ARCHS, make_sae


@dataclass
class BenchConfig:
    only: str = ''      # run one benchmark: othello | lm | sae | metrics
    seconds: float = 5.0  # rough time per measurement


def timed(fn, seconds, min_reps=2):
    """Seconds per call of fn, after one warm-up call, repeated for about `seconds`."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps


def naive_othello_game(rng):
    """The baseline: one random game on an 8x8 list, scanning every square and direction."""
    board = [[0] * 8 for _ in range(8)]
    board[3][3] = board[4][4] = -1
    board[3][4] = board[4][3] = 1
    player, moves = 1, []

    def flips(r, c, p):
        out = []
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                run, rr, cc = [], r + dr, c + dc
                while (dr or dc) and 0 <= rr < 8 and 0 <= cc < 8 and board[rr][cc] == -p:
                    run.append((rr, cc))
                    rr, cc = rr + dr, cc + dc
                if run and 0 <= rr < 8 and 0 <= cc < 8 and board[rr][cc] == p:
                    out += run
        return out

    while True:
        legal = [(r, c) for r in range(8) for c in range(8) if board[r][c] == 0 and flips(r, c, player)]
        if not legal:
            player = -player
            legal = [(r, c) for r in range(8) for c in range(8) if board[r][c] == 0 and flips(r, c, player)]
            if not legal:
                return moves
        r, c = legal[rng.integers(len(legal))]
        for rr, cc in flips(r, c, player):
            board[rr][cc] = player
        board[r][c] = player
        moves.append(8 * r + c)
        player = -player


def bench_othello(cfg):
    rng = np.random.default_rng(0)
    naive = 20 / timed(lambda: [naive_othello_game(rng) for _ in range(20)], cfg.seconds)
    fast = 100_000 / timed(lambda: D.othello_games(100_000, seed=1), cfg.seconds)
    print(f"othello generation: vectorised {fast:,.0f} games/s, naive Python {naive:,.0f} games/s "
          f"-> {fast / naive:.0f}x")


def bench_lm(cfg):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=33, block_size=255, n_layer=4, n_head=6, n_embd=192, pad_id=32))
    opt = model.configure_optimizer(1e-3, 0.1)
    x, y = torch.randint(0, 32, (32, 255)), torch.randint(0, 32, (32, 255))
    rates = {}
    for name, bf16 in (('fp32', False), ('bf16 autocast', True)):
        def step():
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                loss = model(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates[name] = 32 * 255 / timed(step, cfg.seconds)
    print(f"LM training (4 layers, 192 wide, context 255, batch 32): fp32 {rates['fp32']:,.0f} tok/s, "
          f"bf16 autocast {rates['bf16 autocast']:,.0f} tok/s -> {rates['bf16 autocast'] / rates['fp32']:.2f}x; "
          f"vs the brief's nanoGPT yardstick 9.4k tok/s (another run): fp32 {rates['fp32'] / 9400:.2f}x")


def bench_sae(cfg):
    torch.manual_seed(0)
    x = torch.randn(4096, 256) * 3 + 1
    out = []
    for arch in ARCHS:
        kw = {'k': 32} if 'topk' in arch else {}
        sae = make_sae(arch, 256, 2048, total_steps=10**6, **kw)
        sae.set_act_scale(x)
        opt = sae.make_optimizer(3e-4)  # as train.py (JumpReLU: its own threshold lr)
        step_no = [0]

        def step():
            loss, _ = sae.loss(x, step_no[0])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sae.before_optimizer_step()
            opt.step()
            sae.after_optimizer_step(step_no[0])
            step_no[0] += 1
        out.append((arch, 4096 / timed(step, cfg.seconds / 2)))
    print("SAE training at d_in 256, d_sae 2048, batch 4096 (activations/s; the brief's yardstick for "
          "dictionary_learning's standard trainer, another run: 17k):")
    for arch, rate in out:
        print(f"  {arch:14s} {rate:9,.0f} act/s ({rate / 17000:.2f}x the yardstick)")


def bench_metrics(cfg):
    g = torch.Generator().manual_seed(0)
    F_, N, G = 4096, 20_000, 768
    labels = torch.rand(2 * N, G, generator=g) < 0.05
    acts = torch.relu(torch.randn(2 * N, F_, generator=g) - 2.0)  # ~2% of entries fire
    acts[:, :G] += 3.0 * labels  # some features track elements
    t0 = time.perf_counter()
    metrics.coverage(acts[:N], labels[:N])
    metrics.board_reconstruction(acts[:N], labels[:N], acts[N:], labels[N:])
    print(f"coverage + board reconstruction, {F_} features x {N:,} positions (train and test) x {G} "
          f"elements x 10 thresholds: {time.perf_counter() - t0:.1f}s (target: 10s)")


def main(argv):
    cfg = D.parse_config(BenchConfig(), argv, 'bench.py')
    D.check_options(cfg, 'bench.py', {'only': (lambda v: v in ('', 'othello', 'lm', 'sae', 'metrics'),
                                               'othello, lm, sae or metrics'), 'seconds': D.POSITIVE_REAL})
    print(f"bench.py config: {cfg}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, fn in (('othello', bench_othello), ('lm', bench_lm), ('sae', bench_sae), ('metrics', bench_metrics)):
        if cfg.only in ('', name):
            fn(cfg)


if __name__ == '__main__':
    D.run_cli(main)
