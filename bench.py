"""
Speed figures for the README, each measured as a ratio within one run (machines are shared
and noisy: compare numbers from the same run only).

Reads/writes nothing. Run: python bench.py               (about a minute on 2 CPU cores)
                          python bench.py --only=sae     (othello | lm | sae | metrics; machine:
                                                          the machine and its ceilings alone)
                          python bench.py --device=cuda  (the gpu preset's LM and SAE sweep on the
                                                          GPU, at its shapes: 8 x 512, context 59,
                                                          batch 512; d_in 512, d_sae 4096, batch 8192)

First the machine: processor, torch's CPU capability, threads, and this run's ceilings, a large
fp32 matmul and a bf16 one (GFLOP/s). Then each figure in its units and, where it is matmul
work, as a fraction of the fp32 ceiling (or bf16's, for bf16 autocast):

  othello  vectorised bitboard generator vs a naive per-square Python generator (games/s)
  lm       GPT training tokens/s at nanoGPT's yardstick shape (4 layers, 192 wide, context 255,
           batch 32; SHAPES below): fp32, and bf16 autocast where model.choose_precision's probe does not
           already show it far slower. FLOP per token: 6 x parameters (the position embedding
           left out) + 12 x layers x width x context (forward and backward, attention included),
           as nanoGPT counts them (model.GPT.flops_per_token).
  sae      SAE training activations/s at d_in 256, d_sae 2048, batch 4096 (SHAPES), one train_step per
           batch, for every architecture. FLOP per activation: 10 x d_in x d_sae, the dense
           minimum (the encoder and decoder matmuls forward, and the three backward products
           that give the two weights' gradients and the features'; x needs none:
           sae.SAE.flops_per_activation); on the CPU TopK-style
           SAEs skip most of the decoder's share.
  metrics  coverage + board reconstruction, 4096 features x 20,000 positions x 768 elements
On a GPU (--device=cuda) the LM and the SAEs are timed as the gpu preset trains them, against the
bf16 ceiling (where the GPU has bf16 units): the LM (Othello's 61 tokens) in bf16 autocast, eager
and torch.compile'd, then train.py's own step on the compiled blocks (train.lm_step: soft targets,
gradient clipping) and that step with its batches drawn from a set on the GPU (train.lm_batch), so
that what train.py adds to the plain step shows in one run, that step with Muon (--optimizer=muon)
in place of AdamW, and with the blocks as CUDA graphs (train.py's --lm_cuda_graphs, which no
preset turns on yet: what they are worth); the whole SAE sweep of train.py (its gpu
grid: 21 SAEs), bf16 matmuls, as train.py trains it: eager, with its SAEs' losses compiled as one
function (sae.compile_losses), and with that function run as CUDA graphs (train.py
--sae_cuda_graphs), and how many compiled functions CUDA graphs could not take; with --profile,
where a compiled step's device time goes, by kernel and by kind (matmul, top-k, the kernels
inductor fused, ...; the LM's plain step and train.py's after their figures, the sweep's after its
whole-sweep figures); then each architecture's 3 SAEs alone,
each way (--per_arch=False leaves them out). The first compiled step's time (tracing and
compiling; with graphs, the second's too, which records them) is shown beside it and left out of
the rate. Before them, the host floor: the whole sweep at a tiny shape, where the device's work is
negligible, is the time an eager step spends in Python and kernel launches, and caps the eager
sweep's rate at the real shape.
"""
import platform
import signal
import time
from dataclasses import dataclass

if __name__ == '__main__':  # Ctrl-C while torch loads (a second or two, nothing written yet):
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stop at once, no traceback; run_cli takes over

import numpy as np
import torch

import data as D
import metrics
from model import GPT, GPTConfig, choose_precision, wait_for
from sae import ARCHS, SAE, make_optimizer, make_sae, train_step


@dataclass
class BenchConfig:
    only: str = ''      # run one benchmark: othello | lm | sae | metrics; machine: the ceilings alone
    seconds: float = 5.0  # rough time per measurement
    device: str = 'cpu'   # cpu | cuda: the LM and SAE benchmarks on a GPU, at the gpu preset's shapes
    profile: bool = False  # with --device=cuda: where a compiled LM step's and sweep step's device time goes, by kernel
    per_arch: bool = True  # with --device=cuda: after the whole sweep, each architecture's 3 SAEs alone (on an
                           # H200 about two minutes, most of it compiling)


# (LM: layers, heads, width, context, batch; SAE: d_in, d_sae, batch) per device type: the CPU's
# are nanoGPT's yardstick shape and a 2-core-sized SAE; the GPU's are train.py's gpu preset's
SHAPES = {'cpu': {'lm': (4, 6, 192, 255, 32), 'sae': (256, 2048, 4096)},
          'cuda': {'lm': (8, 8, 512, 59, 512), 'sae': (512, 4096, 8192)}}


SHORT = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}  # dtype names as printed


def on_gpu(cfg):
    """Whether this run times the GPU set (the gpu preset's LM and SAE sweep, at SHAPES['cuda']);
    a test sets it for a CPU run at small shapes, so the GPU branches run in the tests too."""
    return cfg.device.startswith('cuda')


def first_call(fn, device):
    """Seconds of one call of fn, its GPU work included: the warm-up call, which also compiles
    where fn runs a compiled model."""
    t0 = time.perf_counter()
    fn()
    wait_for(device)
    return time.perf_counter() - t0


def timed(fn, seconds, min_reps=2, device='cpu', warm_up=True):
    """Seconds per call of fn, repeated for about `seconds`, after one warm-up call (warm_up=False:
    the caller has made it, e.g. with first_call)."""
    if warm_up:
        first_call(fn, device)
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    wait_for(device)
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


def processor_name():
    """The CPU's model name as the OS reports it (Linux: /proc/cpuinfo), else platform's guess."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_ceiling(dtype, seconds, device):
    """GFLOP/s of an n x n @ n x n matmul in `dtype`: the best over n = 256, 512, ... 2048 (8192
    on a GPU), doubling while the best rate so far predicts the next size's single call to take
    under `seconds` / 4 (bf16 is emulated, tens of times slower, on CPUs without bf16 units): 2 n^3
    FLOP over the mean time of back-to-back calls for about `seconds` / 4 (timed). The best, as a
    ceiling is: one size timed while the machine was busy neither lowers it nor stops the doubling
    early. Returns (GFLOP/s, n)."""
    best, n, n_max = (0.0, 0), 256, 8192 if device.startswith('cuda') else 2048
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        t = timed(lambda: a @ a, seconds / 4, min_reps=1, device=device)
        best = max(best, (2 * n ** 3 / t / 1e9, n))
        if n >= n_max or 2 * (2 * n) ** 3 / (best[0] * 1e9) > seconds / 4:
            return best
        n *= 2


def bench_machine(cfg):
    if cfg.device.startswith('cuda'):  # as training runs fp32 matmuls there (model.choose_precision)
        torch.backends.cuda.matmul.allow_tf32 = True
    # fp32 and bf16, and fp16 on a GPU that trains in it (no bf16 units: its bf16 is emulated)
    names = ['float32', 'bfloat16']
    if cfg.device.startswith('cuda') and choose_precision('auto', cfg.device, 512)[0] == 'float16':
        names.append('float16')
    measured = {name: matmul_ceiling(getattr(torch, name), cfg.seconds, cfg.device) for name in names}
    print(f"machine: {processor_name()}; torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    if cfg.device.startswith('cuda'):
        print(f"GPU: {torch.cuda.get_device_name()}, fp32 matmuls in TF32: {torch.backends.cuda.matmul.allow_tf32}")
    print("ceilings: " + ", ".join(f"{SHORT[name]} matmul {rate:.1f} GFLOP/s ({n}^3)" for name, (rate, n) in measured.items()))
    return {name: rate for name, (rate, n) in measured.items()}


def bench_othello(cfg, ceilings):
    rng = np.random.default_rng(0)
    naive = 20 / timed(lambda: [naive_othello_game(rng) for _ in range(20)], cfg.seconds)
    fast = 100_000 / timed(lambda: D.othello_games(100_000, seed=1), cfg.seconds)
    print(f"othello generation: vectorised {fast:,.0f} games/s, naive Python {naive:,.0f} games/s "
          f"-> {fast / naive:.0f}x")


def bf16_known_slower(device, width, rows):
    """Why bf16 is not timed at a (rows x width) @ (width x 4 width) matmul on `device`, from
    model.choose_precision's measurement (CPU) or knowledge (CUDA); '' where it may be faster."""
    reason = choose_precision('bfloat16', device, width, rows=rows)[1]
    return reason.split(': ', 1)[1].split(';')[0] if 'warning' in reason else ''


def bench_lm(cfg, ceilings):
    torch.manual_seed(0)
    L, H, D, T, B = SHAPES['cuda' if on_gpu(cfg) else 'cpu']['lm']
    # a GPU: the gpu preset's Othello LM (61 tokens, the pad the 61st); the CPU: chess's 33
    vocab = 61 if on_gpu(cfg) else 33
    model = GPT(GPTConfig(vocab_size=vocab, block_size=T, n_layer=L, n_head=H, n_embd=D,
                          pad_id=vocab - 1)).to(cfg.device)
    opt = model.configure_optimizer(1e-3, 0.1)
    x, y = (torch.randint(0, vocab - 1, (B, T), device=cfg.device) for _ in range(2))
    flop_per_token = model.flops_per_token()
    bf16_slower = bf16_known_slower(cfg.device, D, B * T)
    print(f"LM training ({L} layers, {D} wide, context {T}, batch {B}; {flop_per_token / 1e6:.1f} MFLOP a token):")
    # the CPU: fp32 and bf16 eager. A GPU: what the gpu preset trains with, the precision
    # choose_precision picks (bf16 where the GPU has bf16 units), eager and torch.compile'd
    if on_gpu(cfg):
        dtype = choose_precision('auto', cfg.device, D)[0]
        variants = [(f'{dtype} eager', dtype, False), (f'{dtype} compiled', dtype, True)]
    else:
        variants = [('fp32', 'float32', False), ('bf16 autocast', 'bfloat16', False)]
    walls, steps = {}, {}  # seconds a step per variant; the compiled steps, for --profile

    def report(name, dtype, wall, first=None):
        rate = B * T / wall
        print(f"  {name:16s} {rate:9,.0f} tok/s = {rate * flop_per_token / 1e9:8.1f} GFLOP/s, "
              f"{rate * flop_per_token / 1e9 / ceilings[dtype]:.0%} of the {SHORT[dtype]} matmul ceiling"
              + (f" (first step, compiling: {first:.1f}s)" if first is not None else ''))

    for name, dtype, compiled in variants:
        if dtype == 'bfloat16' and bf16_slower:
            print(f"  {name:16s} not timed: {bf16_slower}")
            continue
        fwd = model.compile_blocks() if compiled else model  # as train.py --compile

        def step(fwd=fwd, dtype=dtype):  # this variant's, kept for --profile after the loop
            with torch.autocast(cfg.device, dtype=getattr(torch, dtype), enabled=dtype != 'float32'):
                loss = fwd(x, y)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        first = first_call(step, cfg.device)  # compiles, where compiled
        walls[name] = timed(step, cfg.seconds, device=cfg.device, warm_up=False)
        report(name, dtype, walls[name], first if compiled else None)
        if compiled:
            steps['a compiled LM step'] = step
    if on_gpu(cfg):
        # train.py's own step (train.lm_step) on the compiled blocks: soft targets, gradient
        # clipping, the scaler; then with its batches too (train.lm_batch), drawn from a set on the
        # GPU, as train.py keeps it. Their rates against the plain compiled step's above are what
        # each adds. The set: random tokens and random legal-move bitboards (the same kernels
        # as real games' at the same shapes)
        from train import TrainConfig, autocast_for, lm_batch, lm_step, scaler_for
        tcfg = TrainConfig(game='othello', block_size=T, batch_size=B, soft_targets=True,
                           device=cfg.device, dtype=dtype)
        tokens = torch.randint(0, vocab - 1, (8 * B, T + 1), dtype=torch.uint8, device=cfg.device)
        legal = torch.randint(0, 2 ** 60, (8 * B, T), dtype=torch.int64, device=cfg.device)  # random bits
        autocast, scaler, gen = autocast_for(tcfg), scaler_for(tcfg), torch.Generator().manual_seed(0)
        fixed = lm_batch(tokens, legal, tcfg, gen)
        # and that with Muon on the blocks' matrices (train.py --optimizer=muon) in place of AdamW:
        # what a Muon step costs here, against the progress per step it buys (README, Chess)
        muon = model.configure_optimizer(1e-3, 0.1, kind='muon')
        drawn = lambda optimizer: lambda: lm_step(model, optimizer, scaler, autocast,  # a step on a drawn batch
                                                  *lm_batch(tokens, legal, tcfg, gen), tcfg.grad_clip)
        train_steps = {"train.py's step": lambda: lm_step(model, opt, scaler, autocast, *fixed, tcfg.grad_clip),
                       '+ its batches': drawn(opt), '+ Muon': drawn(muon)}
        for name, step in train_steps.items():
            walls[name] = timed(step, cfg.seconds, device=cfg.device)
            report(name, dtype, walls[name])
        steps["a step of train.py's LM, its batch drawn"] = train_steps['+ its batches']
        # the blocks as CUDA graphs (torch.compile's mode='reduce-overhead'), train.py's step and
        # batches around them: what graphs would be worth to the LM (train.py does not use them
        # yet). A failure costs this line only
        name = '+ CUDA graphs'
        model.compile_blocks(mode='reduce-overhead')
        try:
            first = first_call(train_steps['+ its batches'], cfg.device)  # compiles
            walls[name] = timed(train_steps['+ its batches'], cfg.seconds, device=cfg.device)  # records, then runs
            report(name, dtype, walls[name], first)
        except Exception as e:
            print(f"  {name:16s} failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
        model.compile_blocks()  # back to train.py's blocks (compiled already: from the cache) for --profile
    if cfg.profile:
        for what, step in steps.items():
            profile_step(step, cfg.device, walls, what)


def bench_sae(cfg, ceilings):
    torch.manual_seed(0)
    d_in, d_sae, B = SHAPES['cpu']['sae']
    x = torch.randn(B, d_in, device=cfg.device) * 3 + 1
    flop_per_act = SAE.flops_per_activation(d_in, d_sae)
    print(f"SAE training at d_in {d_in}, d_sae {d_sae}, batch {B} (one train_step a batch; "
          f"{flop_per_act / 1e6:.1f} MFLOP an activation, dense):")
    # bf16 matmuls (sae.matmul_dtype, what train.py uses where the LM runs bf16) where not known slower
    bf16_slower = bf16_known_slower(cfg.device, d_in, B)
    dtypes = ['float32'] + ([] if bf16_slower else ['bfloat16'])
    if bf16_slower:
        print(f"  bf16 matmuls not timed: {bf16_slower}")
    for arch in ARCHS:
        for dtype in dtypes:
            kw = {'k': 32} if 'topk' in arch else {}
            torch.manual_seed(0)
            sae = make_sae(arch, d_in, d_sae, total_steps=10**6, **kw).to(cfg.device)
            sae.matmul_dtype = getattr(torch, dtype)
            sae.set_act_scale(x)
            opt = make_optimizer(sae, 3e-4)  # as train.py (JumpReLU: its own threshold lr)
            step_no = [0]

            def step():
                train_step(sae, opt, x, step_no[0], 3e-4)
                step_no[0] += 1
            rate = B / timed(step, cfg.seconds / 2, device=cfg.device)
            print(f"  {arch:14s} {dtype:8s} {rate:9,.0f} act/s = {rate * flop_per_act / 1e9:6.1f} GFLOP/s, "
                  f"{rate * flop_per_act / 1e9 / ceilings[dtype]:.0%} of the {dtype} matmul ceiling")


def bench_sweep(cfg, ceilings):
    """A GPU: train.py's whole SAE sweep (its gpu grid, 3 settings of each architecture) as the
    gpu preset trains it, bf16 matmuls (where the GPU has bf16 units) and its SAEs' losses one
    compiled function, with and without CUDA graphs, one train_step of every SAE on each batch;
    eager beside it for the compiler's share; then each architecture's 3 SAEs alone."""
    from train import SWEEP, TrainConfig, new_sweep_saes, ready_to_train, sweep_grid
    torch.manual_seed(0)
    d_in, d_sae, B = SHAPES['cuda']['sae']
    x = torch.randn(B, d_in, device=cfg.device) * 3 + 1
    # bf16 matmuls where the LM trains in bf16, else fp32 (fp16 GPUs keep fp32 SAEs): train.py's
    # ready_to_train sets them from this dtype
    name = 'bfloat16' if choose_precision('auto', cfg.device, d_in)[0] == 'bfloat16' else 'float32'
    ceiling = ceilings[name]
    flop_per_act = SAE.flops_per_activation(d_in, d_sae)
    print(f"SAE sweep at d_in {d_in}, d_sae {d_sae}, batch {B}: train.py's SWEEP, {name} matmuls, "
          f"{flop_per_act / 1e6:.1f} MFLOP an activation per SAE (dense):")

    def sweep_step(archs, batch, width, mode):
        """One train_step of each SAE of SWEEP's settings for `archs` (d_sae = width) on batch
        (B, d_in), as a function: (step, the number of SAEs). mode: eager, compiled (compiled
        losses) or graphs (compiled losses run as CUDA graphs, as train.py --sae_cuda_graphs).
        The SAEs are made, put in precision and compiled by train.py's own functions."""
        sweep_cfg = TrainConfig(device=cfg.device, dtype=name, sae_compile=mode != 'eager',
                                sae_cuda_graphs=mode == 'graphs', sae_grid='gpu')
        mine = [s for s in sweep_grid(sweep_cfg, batch.shape[1])[1] if s[0] in archs]
        saes = list(new_sweep_saes(sweep_cfg, mine, width, 10**6, batch).values())
        losses = ready_to_train(saes, sweep_cfg)  # None, eager
        opt = make_optimizer(saes, 3e-4)  # one for all, as train.py's sweep
        step_no = [0]

        def step():
            if mode == 'graphs':  # a new sequence of graphs a step, as train.py's sweep
                torch.compiler.cudagraph_mark_step_begin()
            train_step(saes, opt, batch, step_no[0], 3e-4, losses)
            step_no[0] += 1
        return step, len(saes)

    # the host's share of a step: the whole sweep, eager, at a shape so small that the device's
    # work is negligible, is the time a step spends in Python and in launching kernels (compiled
    # losses cost the host about as much: README). No eager step at the real shape can be faster.
    # First, as it takes seconds where the rest takes minutes of compiling: a cut run still has it
    n = sum(len(s) for s in SWEEP.values())
    tiny_in, tiny_sae, tiny_B = 8, 256, 16  # d_sae above TopK's largest k
    floor = timed(sweep_step(SWEEP, torch.randn(tiny_B, tiny_in, device=cfg.device), tiny_sae, 'eager')[0],
                  cfg.seconds / 2, device=cfg.device)
    cap = n * B * flop_per_act / floor / 1e9
    print(f"  host floor: {floor * 1e3:.1f} ms a step of the whole sweep, eager, at d_in {tiny_in}, d_sae "
          f"{tiny_sae}, batch {tiny_B}: at d_in {d_in}, d_sae {d_sae}, batch {B} at most {B / floor:,.0f} act/s "
          f"= {cap:.1f} GFLOP/s, {cap / ceiling:.0%} of the {SHORT[name]} matmul ceiling, however fast the device")

    def measure(archs, mode):
        """(seconds a step of `archs`' SAEs in `mode` after its first step, which compiles, and
        with graphs its second, which records them; those first steps' seconds; the step; the
        number of SAEs)"""
        step, n_saes = sweep_step(archs, x, d_sae, mode)
        first = first_call(step, cfg.device)
        if mode == 'graphs':
            first += first_call(step, cfg.device)
        return timed(step, cfg.seconds / 2, device=cfg.device, warm_up=False), first, step, n_saes

    # the whole sweep first, as train.py trains it (all its SAEs' losses one compiled function):
    # the figures a run cut short must have
    modes = ['eager', 'compiled', 'graphs']
    seconds = {}  # per batch through every SAE of the sweep, in each mode
    compiled_step = None  # kept for --profile; the others' memory goes back
    cuda = torch.cuda.is_available() and cfg.device.startswith('cuda')
    for mode in list(modes):
        if cuda:
            torch.cuda.reset_peak_memory_stats(cfg.device)
        try:
            seconds[mode], first, step, _ = measure(SWEEP, mode)
            if mode == 'compiled':
                compiled_step = step
            del step
        except Exception as e:  # graphs' failure must not cost the rest
            if mode != 'graphs':
                raise
            print(f"  the whole sweep: CUDA graphs failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}); "
                  f"the rest without them")
            modes.remove('graphs')
            continue
        rate = B / seconds[mode]
        print(f"  the whole sweep, {mode}: {rate:,.0f} act/s through all {n} SAEs "
              f"({rate * n / 1e6:.2f}M SAE-act/s) = {rate * n * flop_per_act / 1e9:.1f} GFLOP/s, "
              f"{rate * n * flop_per_act / 1e9 / ceiling:.0%} of the {SHORT[name]} matmul ceiling"
              + (f" (compiling {first:.0f}s)" if mode != 'eager' else '')
              + (f"; peak GPU memory {torch.cuda.max_memory_allocated(cfg.device) / 2**30:.1f} GiB"
                 if cuda else ''))  # the kept compiled step's included
    # a compiled function that CUDA graphs could not take runs without them, and says so only in
    # torch's log: the count makes it visible here
    skips = torch._dynamo.utils.counters['inductor']['cudagraph_skips']
    print(f"  CUDA graphs skipped (torch's count): {skips}")
    if cfg.profile:
        profile_step(compiled_step, cfg.device, seconds, 'a compiled step of the whole sweep')
    del compiled_step  # its SAEs' memory back
    # then each architecture's share: its 3 SAEs alone, each way
    for arch in SWEEP if cfg.per_arch else ():
        line = f"  {arch:14s} x{len(SWEEP[arch])}"
        for mode in modes:
            per_batch, first, _, n_saes = measure([arch], mode)
            rate = n_saes * B * flop_per_act / per_batch / 1e9
            line += (f" | {mode} {rate:8.1f} GFLOP/s, {rate / ceiling:4.0%}"
                     + (f" (compiling {first:.0f}s)" if mode != 'eager' else ''))
        print(line)


def profile_step(step, device, seconds, what, reps=3):
    """Where one step's device time goes (a CPU: its CPU time), by kernel, over `reps` steps of
    torch.profiler, after two unprofiled ones (compiling): the total a step, beside the wall time
    a step took in each mode (`seconds`), and the kernels that take most of it. `what` names the
    step. On a GPU only the device's own events count (kernels, copies): an operator's device
    time is its kernels', which would count them twice (so would a label's span there, which torch
    marks as a user annotation). Then every kernel's time summed by kind (KERNEL_KINDS). A
    compiled step's kernels, not the graphs': a CUDA graph hides its kernels from the profiler,
    and runs the same ones. Device time near the wall time: the device bounds the step; well
    under it: the host still does."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    first_call(step, device)
    first_call(step, device)
    on_device = device.startswith('cuda')
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])) as prof:
        for _ in range(reps):
            step()
        wait_for(device)
    key = 'self_device_time_total' if on_device else 'self_cpu_time_total'  # microseconds
    # on a GPU the device's own events; not the spans of record_function's labels there (torch.compile's
    # regions, the optimizer's step), each the sum of kernels already counted: torch's own table skips them too
    events = [e for e in prof.key_averages()
              if not on_device or (e.device_type != DeviceType.CPU and not getattr(e, 'is_user_annotation', False))]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / reps / 1e3  # ms a step
    walls = ', '.join(f"{mode} {t * 1e3:.1f}" for mode, t in seconds.items() if t)
    print(f"  profile of {what}: {total:.1f} ms of {'device' if on_device else 'CPU'} "
          f"time a step (wall ms a step: {walls}); the most expensive:")
    for e in events[:12]:
        ms = getattr(e, key) / reps / 1e3
        print(f"    {ms:7.2f} ms {ms / total:4.0%} {e.count // reps:4d}x a step  {e.key[:100]}")
    by_kind = {}
    for e in events:
        kind = kernel_kind(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + getattr(e, key) / reps / 1e3
    print("  by kind: " + ', '.join(f"{kind} {ms:.2f} ms ({ms / total:.0%})"
                                    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])))


# what a kernel (on a GPU) or an operator (on a CPU) does, by its name: profile_step's totals
KERNEL_KINDS = (('matmul', ('gemm', 'nvjet', 'cutlass', 'xmma', 'triton_tem', 'aten::mm', 'aten::addmm', 'aten::bmm')),
                ('top-k and sorts', ('topk', 'TopK', 'radix', 'Radix', 'sort', 'Sort')),
                ('attention', ('flash', 'fmha', 'sdpa', 'attention')),
                ('fused by inductor', ('triton_',)),
                ('optimizer', ('adam', 'Adam', 'multi_tensor')),
                ('copies and fills', ('Memcpy', 'Memset', 'copy_', 'fill_', 'Fill')))


def kernel_kind(name):
    return next((kind for kind, marks in KERNEL_KINDS if any(m in name for m in marks)), 'other')


def bench_metrics(cfg, ceilings):
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
    D.check_options(cfg, 'bench.py', {'only': (lambda v: v in ('', 'othello', 'lm', 'sae', 'metrics', 'machine'),
                                               'othello, lm, sae, metrics or machine'), 'seconds': D.POSITIVE_REAL,
                                      'device': (lambda v: v in SHAPES, 'cpu or cuda')})
    if cfg.profile and not on_gpu(cfg):
        raise D.UserError("bench.py: --profile profiles the GPU's LM and sweep: add --device=cuda")
    if cfg.device == 'cuda' and not torch.cuda.is_available():
        raise D.UserError("bench.py: --device=cuda but torch sees no GPU here: use --device=cpu")
    print(f"bench.py config: {cfg}")
    ceilings = bench_machine(cfg)
    # a GPU: the gpu preset's LM and its SAE sweep; a CPU: every benchmark
    benches = (('lm', bench_lm), ('sae', bench_sweep)) if on_gpu(cfg) else \
        (('othello', bench_othello), ('lm', bench_lm), ('sae', bench_sae), ('metrics', bench_metrics))
    for name, fn in benches:
        if cfg.only in ('', name):
            fn(cfg, ceilings)


if __name__ == '__main__':
    D.run_cli(main)
