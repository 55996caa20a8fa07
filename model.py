"""
The game transformer: a small GPT in nanoGPT's spirit (pre-LayerNorm blocks, causal
self-attention through scaled_dot_product_attention, GELU MLP, weight-tied head).

Reads/writes: out/<game>/model.pt through save_checkpoint / load_checkpoint (train.py writes it,
evaluate.py and the SAE stage read it). Used by: python train.py --game chess

Beyond a normal GPT it exposes the residual stream for interpretability:
  residual(idx, layer)          -> the residual stream after block `layer` (0-based), (B, T, d)
  forward_from(resid, layer)    -> the rest of the forward pass from a given residual stream,
                                   so the stream can be replaced by zeros or an SAE's reconstruction
  mlp_hidden(idx, layer)        -> the GELU outputs of block `layer`'s MLP (a baseline dictionary)

Its optimizers (configure_optimizer): AdamW, or Muon on the blocks' weight matrices (class Muon,
orthogonalize), which the chess cpu preset uses.
"""
import math
import os
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
from torch.nn import functional as F

from data import UserError, atomic_save, load_file


@dataclass
class GPTConfig:
    vocab_size: int = 61
    block_size: int = 59   # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    pad_id: int = 60       # targets equal to pad_id are ignored by the loss
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, cache=None, pos=None):
        """x (B, T, C) -> (B, T, C), causal. cache=[] (a list): also append this call's keys and
        values (k, v), each (B, n_head, T, head_dim), to it: GPT.prefill.
        Decoding (GPT.decode_step): x (B, R, C) holds the next token of R continuations of each
        of the B sequences, at positions pos (B, R); cache is the dict this layer's prefill left
        ('k', 'v'), to which the continuations' own keys and values are added ('tail_k',
        'tail_v', (B, n_head, R, steps, head_dim)). A continuation that began at position
        start = pos - steps attends to the prefix's positions < start and to its own tokens."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if pos is None:
            if cache is not None:
                cache.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
            return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        # decoding: T is R here. The prefix is shared by all continuations of a sequence, so it
        # is attended to in place (no copy per continuation); each continuation's own tokens
        # are a short tail of its own. One softmax over both parts.
        steps = cache['tail_k'].shape[3] if 'tail_k' in cache else 0
        tail_k = torch.cat([cache['tail_k'], k[:, :, :, None]], 3) if steps else k[:, :, :, None]
        tail_v = torch.cat([cache['tail_v'], v[:, :, :, None]], 3) if steps else v[:, :, :, None]
        cache['tail_k'], cache['tail_v'] = tail_k, tail_v  # (B, n_head, R, steps + 1, head_dim)
        scale = 1 / math.sqrt(q.shape[-1])
        prefix = q @ cache['k'].transpose(-2, -1) * scale  # (B, n_head, R, L)
        start = pos - steps  # (B, R)
        after_start = torch.arange(prefix.shape[-1], device=x.device) >= start[:, None, :, None]
        own = (q[:, :, :, None, :] * tail_k).sum(-1) * scale  # (B, n_head, R, steps + 1)
        p = torch.cat([prefix.masked_fill(after_start, float('-inf')), own], -1).softmax(-1)
        L = prefix.shape[-1]
        y = p[..., :L] @ cache['v'] + (p[..., L:, None] * tail_v).sum(-2)  # (B, n_head, R, head_dim)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, pos=None):
        x = x + self.drop(self.attn(self.ln_1(x), cache, pos))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (as nanoGPT)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith('proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def n_params(self):
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def flops_per_token(self):
        """Training FLOP per token at context T = block_size, as nanoGPT counts them:
        6 x parameters (each weight's multiply-add forward, twice that backward; the tied head
        counted once, the position embedding, a lookup, not at all: n_params) + 12 x layers x
        width x T (attention's two products, forward and backward).
        Model-FLOPs utilisation is tokens/s times this over the machine's matmul ceiling."""
        c = self.config
        return 6 * self.n_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def embed(self, idx):
        T = idx.shape[1]
        assert T <= self.config.block_size, f"sequence of {T} tokens exceeds the context {self.config.block_size}"
        return self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, d)

    def head(self, x, targets):
        """Final LayerNorm, logits (B, T, vocab) and the mean cross-entropy over the targets:
        token ids (B, T), pad ignored; or next-token distributions (B, T, vocab), all-zero rows
        ignored: -sum_v p_v log softmax(logits)_v, whose expectation over sampled tokens it equals."""
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        if targets.is_floating_point():
            per_position = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1)  # (B, T), 0 where ignored
            # the mean over the positions with a target: the sum over all positions (the others
            # add 0) over their count. A boolean-mask index would take its size from the data,
            # which on a GPU waits for the data at every step
            return logits, per_position.sum() / (targets.sum(-1) > 0).sum().clamp_min(1)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=self.config.pad_id)
        return logits, loss

    compiled_blocks = None  # compile_blocks(): what forward() runs in place of self.blocks

    def compile_blocks(self, **options):
        """torch.compile(**options) each block for forward() (train.py --compile). The blocks are
        alike, so one trace serves every block. The gpu presets' model (8 x 512, context 59) on
        the 2-core AMD EPYC, an empty compile cache, alternating runs: its first training step
        (which compiles) took 15-19 s this way, 41-43 s with the whole model compiled (nanoGPT's
        way, which traces every block), and the steps after it were as fast. The embedding and
        the head run eagerly; prefill, decode_step and the passes that read one layer keep the
        plain blocks. The compiled blocks share the blocks' parameters: the saved weights are
        the same. Returns self."""
        self.compiled_blocks = [torch.compile(block, **options) for block in self.blocks]
        return self

    def forward(self, idx, targets=None, compiled=True):
        """idx (B, T) -> (logits (B, T, vocab), loss or None): head() gives the loss. compiled=False
        runs the plain blocks even after compile_blocks: train.py's evals and legal-move rate, under
        no_grad in eval mode, for which the compiled blocks would first trace and compile again
        (a graph without a backward), out of the LM's time budget."""
        x = self.embed(idx)
        for block in (compiled and self.compiled_blocks) or self.blocks:
            x = block(x)
        return self.head(x, targets)

    @torch.no_grad()
    def prefill(self, idx):
        """The forward pass of idx (B, T) that also keeps every block's keys and values, for
        decode_step: returns logits (B, T, vocab) and the cache, one dict per block with 'k' and
        'v' (B, n_head, T, head_dim)."""
        x, cache = self.embed(idx), []
        for block in self.blocks:
            layer = []
            x = block(x, layer)
            cache.append({'k': layer[0][0], 'v': layer[0][1]})
        return self.head(x, None)[0], cache

    @torch.no_grad()
    def decode_step(self, token, pos, cache):
        """Greedy decoding of many continuations of each prefilled sequence at once, one token
        each per call. token, pos (B, R): the next token of continuation r of sequence b and
        its position; the first call's pos is where each continuation begins (it sees the
        sequence before that, from the cache), and each later call's pos is one further.
        Returns the logits for the following position (B, R, vocab): what forward gives on the
        sequence cut at the continuation's start followed by its tokens so far (tests:
        test_decode_step_matches_forward)."""
        x = self.wte(token) + self.wpe(pos)  # (B, R, d)
        for block, layer in zip(self.blocks, cache):
            x = block(x, layer, pos)
        return self.head(x, None)[0]

    def _block_index(self, layer):
        """`layer` as a block index; anything else a ValueError (-1, a config's "default depth",
        would read the embeddings here, and a layer past the last the last block's output)."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer {layer} is not a block of this {len(self.blocks)}-block model: use "
                             f"0..{len(self.blocks) - 1} (an SAE's block: its meta['layer'])")
        return layer

    def residual(self, idx, layer):
        """Residual stream after block `layer` (0-based): (B, T, d)."""
        layer = self._block_index(layer)
        x = self.embed(idx)
        for block in self.blocks[:layer + 1]:
            x = block(x)
        return x

    def forward_from(self, resid, layer, targets=None):
        """Run blocks layer+1.. on `resid` (B, T, d), the stream after block `layer`."""
        x = resid
        layer = self._block_index(layer)
        for block in self.blocks[layer + 1:]:
            x = block(x)
        return self.head(x, targets)

    def mlp_hidden(self, idx, layer, with_residual=False):
        """The GELU activations inside block `layer`'s MLP: (B, T, 4d). with_residual: the pair
        (hidden, residual stream after block `layer`) from the same pass (eval mode: no dropout)."""
        layer = self._block_index(layer)
        x = self.residual(idx, layer - 1) if layer > 0 else self.embed(idx)
        block = self.blocks[layer]
        x = x + block.attn(block.ln_1(x))
        hidden = F.gelu(block.mlp.fc(block.ln_2(x)))
        return (hidden, x + block.mlp.proj(hidden)) if with_residual else hidden

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), kind='adamw'):
        """kind 'adamw': AdamW on every parameter (as nanoGPT). kind 'muon': Muon on the blocks'
        weight matrices, AdamW on the embeddings, LayerNorms and biases (class Muon)."""
        # decay the matrices only (the blocks' weights and both embeddings); biases and LayerNorms are not
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        if kind == 'muon':  # the blocks' matrices to Muon; the embeddings' (wte, tied to the head; wpe) to AdamW
            matrices = [(name, p) for name, p in self.named_parameters() if p.dim() >= 2]
            hidden = [p for name, p in matrices if name.startswith('blocks.')]
            embeddings = [p for name, p in matrices if not name.startswith('blocks.')]
            return Muon([{'params': hidden, 'muon': True, 'weight_decay': weight_decay},
                         {'params': embeddings, 'weight_decay': weight_decay},
                         {'params': no_decay, 'weight_decay': 0.0}], lr=lr, betas=betas)
        if kind != 'adamw':
            raise ValueError(f"configure_optimizer: unknown kind {kind!r} (adamw | muon)")
        groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
        # on a GPU one fused kernel updates every parameter (as nanoGPT): far fewer launches a step
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=next(self.parameters()).is_cuda)


def orthogonalize(G, steps=5):
    """The nearest semi-orthogonal matrix to G [m, n], approximately: U V^T where G = U S V^T is
    its singular value decomposition, by a quintic Newton-Schulz iteration that needs only
    matmuls. X = G / ||G||_F (every singular value in (0, 1]), then `steps` times
        X <- a X + (b A + c A^2) X,  A = X X^T,  (a, b, c) = (3.4445, -4.7750, 2.0315)
    which maps each singular value s to a s + b s^3 + c s^5 and leaves the singular vectors alone.
    These coefficients (Keller Jordan's, for Muon) push small singular values up fast, at the price
    of leaving each somewhere in about [0.7, 1.2] rather than exactly 1 (each step multiplies a
    small one by about a = 3.4, so one below about 1/500 of ||G||_F stays under 0.7 after five
    steps). Returns [m, n]. A stack G [k, m, n] is k matrices, each on its own (Muon's same-shaped
    matrices): one batched product where each matrix would take its own."""
    if G.shape[-2] > G.shape[-1]:  # A = X X^T on the smaller side
        return orthogonalize(G.mT, steps).mT
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    product_plus = torch.addmm if X.dim() == 2 else torch.baddbmm  # beta * input + alpha * (m1 @ m2)
    for _ in range(steps):
        A = X @ X.mT  # [m, m]
        B = product_plus(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = product_plus(X, B, X, beta=a)  # a X + B X
    return X


class Muon(torch.optim.AdamW):
    """Muon (momentum orthogonalised by Newton-Schulz, Jordan et al. 2024) on the parameter groups
    marked 'muon': True, torch.optim.AdamW itself on the others, in one optimizer: train.py's lr
    schedule, gradient clipping and checkpoints then treat it as they treat AdamW. For a weight
    matrix W [m, n] with gradient g, momentum mu = 0.95:
        buf <- mu buf + g;   u = g + mu buf  (Nesterov)
        W   <- W - lr wd W - lr * 0.2 sqrt(max(m, n)) * orthogonalize(u)
    An orthogonalised update moves every direction of W by the same amount, however lopsided the
    gradient is; its RMS is about 1 / sqrt(max(m, n)), so the factor 0.2 sqrt(max(m, n)) gives it
    the RMS of a typical AdamW update (about 0.2 lr): both parts take the same lr. On the chess
    cpu preset Muon reaches in 3000 steps a loss AdamW needs about 9000 for (README, "Chess")."""

    def __init__(self, groups, lr, betas=(0.9, 0.95), momentum=0.95):
        super().__init__(groups, lr=lr, betas=betas)
        for group in self.param_groups:
            group.setdefault('muon', False)
            group.setdefault('momentum', momentum)

    @torch.no_grad()
    def step(self, closure=None):
        hidden = []  # the Muon parameters and their gradients, hidden from AdamW's step below
        for group in self.param_groups:
            if not group['muon']:
                continue
            lr, mu = group['lr'], group['momentum']
            by_shape = {}  # the group's matrices by shape: every block's qkv weight together, ...
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state['step'], state['momentum_buffer'] = torch.tensor(0.0), torch.zeros_like(p)
                state['step'] += 1
                p.mul_(1 - lr * group['weight_decay'])  # decoupled weight decay, as AdamW
                state['momentum_buffer'].mul_(mu).add_(p.grad)
                by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                # the same-shaped matrices orthogonalised as one stack (k, m, n), each on its own:
                # a batched product where each matrix would take its own (on a GPU, a kernel
                # launch for all the blocks where each block would launch its own)
                u = torch.stack([p.grad.add(self.state[p]['momentum_buffer'], alpha=mu) for p in params])
                for p, update in zip(params, orthogonalize(u).unbind()):
                    p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(shape)))
                    hidden.append((p, p.grad))
                    p.grad = None  # AdamW skips a parameter without a gradient
        super().step()
        for p, grad in hidden:
            p.grad = grad


def choose_device(name='auto'):
    """The one place a device is picked: cuda, then mps, then cpu, unless `name` says which; a
    device this machine lacks is a UserError."""
    has_mps = getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'mps' if has_mps else 'cpu'
    kind, _, index = name.partition(':')
    if kind not in ('cpu', 'cuda', 'mps') or (index and (kind != 'cuda' or not index.isdigit())):
        raise UserError(f"--device={name} is not a device: use auto, cpu, cuda, cuda:N or mps")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (kind == 'cuda' and int(index or 0) >= n_cuda) or (kind == 'mps' and not has_mps):
        found = f"{n_cuda} CUDA device(s)" + (", mps" if has_mps else "")
        raise UserError(f"--device={name} is not available here (this machine has {found}): use --device=auto or cpu")
    return name


def wait_for(device):
    """Wait until the GPU has run the work queued on it, so that a clock read next counts it (the
    host runs ahead of the GPU by up to a queue of kernels); nothing on a CPU."""
    if device.startswith('cuda'):
        torch.cuda.synchronize(device)
    elif device.startswith('mps'):  # Apple's GPU queues its kernels too
        torch.mps.synchronize()


def matmul_seconds(dtype, rows, width, reps=3):
    """Best-of-`reps` seconds for one (rows, width) @ (width, 4 width) CPU matmul, the shape of a
    transformer MLP, with inputs in `dtype` (fp32 or bf16), after one warm-up call."""
    a, b = torch.randn(rows, width).to(dtype), torch.randn(width, 4 * width).to(dtype)
    a @ b
    best = float('inf')
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
BF16_MARGIN = 1.1  # bf16 autocast only where its matmul is at least this much faster than fp32


def choose_precision(name, device, width, rows=1024, timer=None):
    """The one place the LM's precision is picked: 'float32', 'bfloat16' (autocast: bf16 matmuls
    over fp32 weights) or, on CUDA only, 'float16' (autocast with a gradient scaler, train.py);
    SAE maths and loss reductions stay fp32 in any case.
    Returns (dtype, reason), the reason a sentence saying what was measured or read.

    auto on the CPU times the model's MLP matmul (rows x width @ width x 4 width, rows at most
    1024) both ways and takes bf16 only if it is BF16_MARGIN times faster: CPUs with bf16 units
    (AVX512-BF16, AMX) run it faster, CPUs without them (AVX2 only) emulate it tens of times
    slower. A small probe runs first, so a slow bf16 costs a fraction of a second to detect (only
    a close call is timed again at the model's shape). auto on CUDA: bf16 where the GPU has bf16
    units (compute capability 8 and up, which also gives TF32 to fp32 matmuls), else fp16 with a
    gradient scaler (T4, V100: their tensor cores run fp16, and fp32 has no TF32 there); on MPS:
    fp32. An explicit 'bfloat16' is kept, with a warning in the reason when it is measured (CPU)
    or known (CUDA: emulated) to be slower than the alternative.
    `timer(dtype, rows, width, reps)` returns seconds per matmul (tests pass a fake one)."""
    if name not in DTYPES:
        raise UserError(f"--dtype={name}: use auto, float32, bfloat16 or float16 (CUDA)")
    if name == 'float16' and not device.startswith('cuda'):
        raise UserError(f"--dtype=float16 is for CUDA GPUs (with a gradient scaler), not {device}: "
                        "use auto, float32 or bfloat16")
    if name == 'float32':
        if device.startswith('cuda'):
            torch.backends.cuda.matmul.allow_tf32 = True  # a no-op on GPUs without TF32
        return 'float32', 'asked for (--dtype=float32)'
    if device.startswith('cuda'):
        bf16_units = torch.cuda.is_bf16_supported(including_emulation=False)
        if name == 'float16':
            return 'float16', 'asked for (--dtype=float16): fp16 autocast with a gradient scaler'
        if bf16_units:
            torch.backends.cuda.matmul.allow_tf32 = True
            return 'bfloat16', f"{'asked for' if name == 'bfloat16' else 'auto'}: this GPU has bf16 units"
        if name == 'bfloat16':
            return 'bfloat16', 'asked for (--dtype=bfloat16); warning: this GPU has no bf16 units, so it is emulated and slow'
        return 'float16', 'auto: this GPU has no bf16 units: fp16 autocast with a gradient scaler'
    if device != 'cpu':
        return name if name != 'auto' else 'float32', f"{device}: bf16 autocast is not measured here"
    timer = timer or matmul_seconds
    capability = torch.backends.cpu.get_cpu_capability()
    # the probe: about 2^24 multiply-adds, a fraction of a second even where bf16 is emulated; best
    # of 3 both ways, as one timing of a small matmul can be stalled several times over (at width
    # 32 one probe in 30 read bf16 at 0.34x, against about 1.9x, with a single bf16 timing)
    probe_rows = max(16, min(rows, 256, 2 ** 22 // (width * width)))
    speedup = timer(torch.float32, probe_rows, width, 3) / timer(torch.bfloat16, probe_rows, width, 3)
    shape = probe_rows
    if speedup > 0.5:  # close enough that the small probe may mislead: time the real shape
        shape = min(rows, 1024)
        speedup = timer(torch.float32, shape, width, 3) / timer(torch.bfloat16, shape, width, 3)
    measured = (f"a ({shape}x{width}) @ ({width}x{4 * width}) matmul runs {speedup:.2f}x as fast "
                f"in bf16 as in fp32 on this CPU ({capability})")
    if name == 'bfloat16':
        warn = '' if speedup >= 1 else '; warning: slower than fp32 here, --dtype=auto would use fp32'
        return 'bfloat16', f'asked for (--dtype=bfloat16): {measured}{warn}'
    return ('bfloat16' if speedup >= BF16_MARGIN else 'float32'), f'auto: {measured}'


def save_checkpoint(path, model, game, extra):
    """Atomically write the model's config, weights and `extra` (train config, step, metrics)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({'format': 'boardgame-saes/model', 'version': 1, 'game': game,
                 'model_config': asdict(model.config), 'model': state, **extra}, path)


def load_checkpoint(path, game=None, device='cpu', dirs=''):
    """Rebuild the exact model from its checkpoint. Returns (model, checkpoint dict), the model in
    train mode, as built (.eval() to read it). `dirs`: the caller's non-default
    --data_dir/--out_dir (data.dir_args), for the command an error names."""
    # the stage that writes it: the LM, or (model_random.pt, the control's model) the SAE stage
    stage = 'sae' if os.path.basename(path) == 'model_random.pt' else 'lm'
    hint = f"python train.py --game {game or '<game>'}{dirs} --stage {stage}"
    ckpt = load_file(path, 'boardgame-saes/model', hint, keys=('model_config', 'model', 'iter'))
    if game is not None and ckpt.get('game') != game:
        raise UserError(f"{path} is a model of {ckpt.get('game')}, not {game}: run `{hint}`")
    try:  # a config or weights this code's GPT does not take (another version's, edited by hand)
        model = GPT(GPTConfig(**ckpt['model_config']))
        model.load_state_dict(ckpt['model'])
    except (TypeError, RuntimeError) as e:
        why = ' '.join(str(e).split())  # load_state_dict's message spans lines
        raise UserError(f"{path} does not fit this code's GPT ({why[:200]}): run `{hint}`") from None
    return model.to(device), ckpt
