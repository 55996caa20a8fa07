"""
Sparse autoencoders (SAEs): one small class per architecture, all with one interface.

Used by `python train.py --game chess --stage sae` (trains SAEs on residual-stream activations
streamed from the LM) and by evaluate.py (loads them and encodes activations into features).
Reads nothing by itself; `save` writes one `.pt` file per SAE and `load` rebuilds any SAE from
that file alone.

Architectures. The paper (Karvonen et al. 2024) trains standard and gated SAEs, each also with its
p-annealing (its p-annealing section), and TopK as a comparison; BatchTopK and JumpReLU are the
other kinds in common use. With x the normalised activation (below), f the features and
x_hat = f W_dec + b_dec, each minimises, averaged over a batch:
    standard      f = ReLU((x - b_dec) W_enc + b_enc)
                  ||x - x_hat||^2 + coef * sum_i f_i                       (L1)
    gated         f = 1[pi_gate > 0] * ReLU(pi_mag), gate and magnitude paths sharing W_enc
                  (Rajamanoharan et al. 2024); ||x - x_hat||^2 + coef * sum_i ReLU(pi_gate)_i
                  + ||x - (ReLU(pi_gate) W_dec + b_dec)||^2 with the decoder detached there
    p_anneal      standard with the penalty coef * sum_i f_i^p, p annealed from 1 toward p_end:
                  sum_i f_i^p tends to the L0 count as p -> 0, but is not convex for p < 1, so
                  training starts at the convex L1 and moves p down step by step (PAnnealing)
    gated_anneal  gated with coef * sum_i ReLU(pi_gate)_i^p, annealed the same way
    topk          f keeps the k largest of ReLU((x - b_dec) W_enc + b_enc) per row, no penalty;
                  ||x - x_hat||^2 + an AuxK term that revives dead features (Gao et al. 2024)
    batch_topk    the k * B largest over a batch of B rows in training, a threshold after
    jumprelu      f = z * 1[z > theta]; ||x - x_hat||^2 + coef * (number of active features),
                  trained through straight-through estimators (Rajamanoharan et al. 2024b)
Each class's docstring gives its details.

Conventions shared by every architecture:
- Parameters W_enc (d_in, d_sae), W_dec (d_sae, d_in), b_enc (d_sae,), b_dec (d_in,); plain
  tensors, no hidden transposes. Decoder rows W_dec[i] are kept at unit norm.
- Raw activations x are scaled by one scalar buffer `act_scale` so that E||x||^2 = d_in.
  encode(x) works on x * act_scale, decode(f) divides its output by act_scale, so
  decode(encode(x)) lives in RAW space. b_dec and all features live in the normalised space.
- loss(x, step) takes RAW activations and computes everything in the normalised space, in fp32.
  MSE is the squared error SUMMED over the d_in dimensions, averaged over the batch:
  mse = mean_b ||x_b - x_hat_b||^2 (normalised units; E||x||^2 = d_in, so the zero
  reconstruction scores about d_in). Penalties are per-row sums averaged over the batch too.
- stats: a dict with the same keys for every architecture (STATS_KEYS): p and coef are floats,
  the rest 0-dim tensors on the SAE's device. Reading one (float(v)) waits for the step on a GPU,
  so the training loop reads them only when it logs.
- Matmul precision: `matmul_dtype` (fp32 unless train.py sets bf16 where it measured bf16 the
  faster, as for the LM): the encoder and decoder products, their biases added in the same call
  (addmm: bf16 inputs and bias, fp32 accumulation, a bf16 result), come back as fp32 at once;
  parameters, optimiser state, every other operation and the loss stay fp32
  (TopK's sparse decode, where it is a gather and not a matmul, fp32 too). Loaded SAEs compute in fp32.
  One exception, exact: TopK's training picks its top k among the encoder's bf16 outputs
  before they become fp32, whose values are those same bf16 numbers; the picks are then fp32.
- Decoder rows stay at unit norm: the backward removes each row's own direction from W_dec's
  gradient (SAE._W_dec), and after_optimizer_step renormalises the rows.
- Training step: loss.backward(); opt.step(); sae.after_optimizer_step(step): `train_step`
  below, the one place it is written. It also steps several SAEs on one batch with one
  optimiser over them all (make_optimizer): the sweep.
"""

import math
from collections import deque

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import FORMAT_VERSION, UserError, atomic_save, load_file

FILE_FORMAT = 'boardgame-saes/sae'
FILE_VERSION = FORMAT_VERSION
STATS_KEYS = ('loss', 'mse', 'sparsity_loss', 'aux_loss', 'l0', 'explained_variance', 'p', 'coef')


def act_scale_for(x):
    """The scalar s with E||s * x||^2 = d_in, from a sample x (N, d_in). Computed in float64."""
    x = x.detach().to(torch.float64)
    mean_sq_norm = x.pow(2).sum(-1).mean().item()
    if not 0 < mean_sq_norm < math.inf:  # NaN fails both
        raise ValueError('act_scale_for: the activation sample is all zeros (or not finite)')
    return math.sqrt(x.shape[-1] / mean_sq_norm)


def active_per_row(f):
    """The mean number of non-zero entries per row of f (B, d_sae). Counted per row, then
    averaged, as the penalties sum: a compiled loss then computes the count and the penalty in
    one pass over f (a sum over all of f is another shape of reduction, which needs a pass of
    its own)."""
    return (f.detach() != 0).float().sum(-1).mean()


def lp_sum(acts, p):
    """sum_i acts_i^p per row, for acts >= 0, p a float or a 0-dim tensor. (B, d_sae) -> (B,)
    For p < 1 the derivative p * a^(p-1) is infinite at a = 0; zeros contribute nothing to the
    value, and clamping before the power keeps their (masked-out) gradient finite, not NaN."""
    if isinstance(p, float) and p == 1.0:
        return acts.sum(-1)
    active = acts > 0
    return (acts.clamp_min(1e-12).pow(p) * active.to(acts.dtype)).sum(-1)


# ----------------------------------------------------------------------------------------------
# the base class: parameters, normalisation, encode/decode, the shared loss and the decoder norm

ARCHS = {}  # arch name -> class: every class below that sets `arch` enters itself (SAE.__init_subclass__)


class SAE(nn.Module):
    """What every architecture shares (the module docstring's conventions): the parameters, the
    activation scale, encode / decode / forward on raw activations, the loss and its statistics.
    A subclass that sets `arch` is an architecture (sae.ARCHS); it writes _encode_n (encoding)
    and _train_forward (the training pass)."""
    arch = None
    DEFAULT_COEF = 5.0  # sparsity coefficient; a sweep variable, this is only a starting point
    # How the coefficient that keeps the same L0 grows with d_in (train.sweep_settings). With
    # E||x||^2 = d_in, L0 features of size about sqrt(d_in / L0) rebuild x, so an L1 penalty
    # coef * sum_i f_i ~ coef * sqrt(d_in * L0) balances a squared error ~ d_in at coef ~ sqrt(d_in):
    # power 1/2. An L0 penalty (JumpReLU: coef * the count) balances it at coef ~ d_in: power 1.
    COEF_POWER = 0.5

    def __init__(self, d_in, d_sae, *, coef=None, total_steps=None):
        super().__init__()
        coef = self.DEFAULT_COEF if coef is None else float(coef)
        # everything needed to rebuild this SAE: the constructor's keyword arguments
        self.cfg = dict(arch=self.arch, d_in=d_in, d_sae=d_sae, coef=coef, total_steps=total_steps)
        # decoder rows: random unit directions; encoder starts as the decoder's transpose (a copy)
        W_dec = torch.randn(d_sae, d_in)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.clone())       # (d_in, d_sae)
        self.W_dec = nn.Parameter(W_dec)                 # (d_sae, d_in)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))    # (d_sae,)
        self.b_dec = nn.Parameter(torch.zeros(d_in))     # (d_in,) in normalised space
        self.register_buffer('act_scale', torch.tensor(1.0))
        # training state that changes during training (p-annealing); saved in the file too
        self.p = 1.0
        self.coef = coef
        self.n_anneal_done = 0
        self.meta = {}

    def __init_subclass__(cls, **kwargs):
        # a class that names its own arch is an architecture make_sae and load know: one class
        # (and one SWEEP line in train.py) is all a new variant needs
        super().__init_subclass__(**kwargs)
        if 'arch' in cls.__dict__:
            ARCHS[cls.arch] = cls

    def lr_scales(self):
        """[(parameters, lr scale)]: every parameter at the base rate (JumpReLU's thresholds differ)."""
        return [(list(self.parameters()), 1.0)]

    # --- normalisation ---

    def set_act_scale(self, x_sample):
        """Set act_scale from a raw sample (N, d_in) so that E||x * act_scale||^2 = d_in."""
        self.act_scale.fill_(act_scale_for(x_sample))

    @torch.no_grad()
    def init_b_dec(self, x_sample, method='geometric_median', n_iter=50):
        """Set b_dec to the mean or geometric median of a RAW sample, in normalised space.
        Call after set_act_scale. Geometric median by Weiszfeld iterations in float64."""
        x = x_sample.detach().to(torch.float64) * self.act_scale.item()  # (N, d_in)
        centre = x.mean(0)
        if method == 'geometric_median':
            for _ in range(n_iter):
                weights = 1.0 / (x - centre).norm(dim=-1).clamp_min(1e-8)  # (N,)
                centre = (weights[:, None] * x).sum(0) / weights.sum()
        elif method != 'mean':
            raise ValueError(f"init_b_dec: method must be 'mean' or 'geometric_median', got {method!r}")
        self.b_dec.copy_(centre.to(self.b_dec.dtype))

    # --- encode / decode (public ones take and return RAW activations) ---

    def encode(self, x):
        """x (B, d_in) raw -> f (B, d_sae)."""
        return self._encode_n(x.float() * self.act_scale)

    def decode(self, f):
        """f (B, d_sae) -> x_hat (B, d_in) raw."""
        return self._decode_n(f.float()) / self.act_scale

    def forward(self, x):
        """x (B, d_in) raw -> (x_hat (B, d_in) raw, f (B, d_sae)). Rows only: a residual stream
        (B, T, d_in) goes in as x.flatten(0, 1)."""
        f = self.encode(x)
        return self.decode(f), f

    def _enc_bias(self):
        # (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc): with b_dec folded into the
        # bias, backward needs no (B, d_sae) @ (d_sae, d_in) product for b_dec's gradient (x needs
        # none), one matmul in six of a training step
        return self.b_enc - self.b_dec @ self.W_enc      # (d_sae,)

    matmul_dtype = torch.float32  # train.py sets torch.bfloat16 where it measured bf16 the faster
    loss_compiled = False          # compile_loss() sets it
    loss_graphed = False           # compile_loss(cuda_graphs=True) sets it

    def _scalar(self, name, value):
        # `value` in the 0-dim tensor kept as attribute `name` on the SAE's device, filled in place:
        # a fill is a kernel launch, where torch.tensor(value, device=...) would copy from the host
        # and wait for the GPU
        t = self.__dict__.get(name)
        if t is None or t.device != self.W_enc.device:
            t = self.__dict__[name] = torch.empty((), device=self.W_enc.device)
        return t.fill_(value)

    @staticmethod
    def flops_per_activation(d_in, d_sae):
        """Training FLOP per activation of an SAE d_in -> d_sae, the dense minimum: the encoder's
        and the decoder's products forward (2 x 2 x d_in x d_sae) and the three backward products
        that give the weights' and the features' gradients (3 x 2 x d_in x d_sae): 10 x d_in x
        d_sae, for every architecture, so that rates compare as work done. TopK's sparse decode on the CPU does
        less; gated's auxiliary decode does 4 x d_in x d_sae more (forward, and backward to the
        gate), not counted."""
        return 10 * d_in * d_sae

    def compile_loss(self, cuda_graphs=False, **options):
        """Compile _loss, the tensor work of a training loss, with torch.compile(**options): its
        forward and backward are traced once per architecture (TopK's k: below), and on a GPU
        the elementwise work around the matmuls fuses into a few kernels. loss(), train_step
        and saving are unchanged. Returns self. For one SAE: train.py's sweep (--sae_compile)
        compiles all its SAEs' losses as one function instead (compile_losses), whose options
        and state are these.
        cuda_graphs=True (a GPU; train.py --sae_cuda_graphs): the compiled forward and backward
        also run as CUDA graphs (torch.compile's mode='reduce-overhead'): the host launches one
        graph where it launched every kernel, so a step's host time no longer caps the GPU.
        Two rules come with it. A graph writes its outputs to the same memory every time it runs,
        so loss() returns its stats copied out of it. And whoever trains several SAEs, each with
        its own compiled loss, calls torch.compiler.cudagraph_mark_step_begin() once before each
        step of them all: SAEs of one architecture share one compiled loss, and the mark makes
        the step one sequence of graphs, each SAE's forward and backward recorded at its place in
        it, rather than the shared graph re-recorded for each SAE's parameters."""
        # every architecture traces the base class's _loss: one cached trace per class, more
        # than torch's default limit of traces for one function allows
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # TopK's k, an int on the module, sets a shape: by default each k is traced apart. With
        # this, the second k's trace takes k as a symbol and every later k reuses it (the sweep:
        # 9 traces, not 11, and 10-15% less time compiling them on a 2-core CPU)
        torch._dynamo.config.allow_unspec_int_on_nn_module = True
        if cuda_graphs:
            options['mode'] = 'reduce-overhead'
        self._loss = torch.compile(self._loss, **options)
        self.loss_compiled, self.loss_graphed = True, cuda_graphs
        return self

    def _matmul(self, bias, a, W, fp32_out=True):
        # bias + a @ W, (B, m) @ (m, n) -> (B, n) fp32; the product in matmul_dtype (bf16: tensor
        # cores, bf16 inputs and bias, fp32 accumulation, a bf16 result), back in fp32 at once
        # (fp32_out=False: left in matmul_dtype, for a top-k that only picks among its values).
        # The encoder's input is x itself, b_dec folded into the bias (_enc_bias), so its bf16
        # rounding scales with |x| rather than |x - b_dec|: on the Othello cpu model (the mean
        # 13% of E|x|^2) five SAEs trained in bf16 ended within 0.002 of fp32's explained
        # variance, and with x centred before the cast within 0.002 too (README, Precision)
        if self.matmul_dtype == torch.float32:
            return torch.addmm(bias, a, W)
        dt = self.matmul_dtype
        out = torch.addmm(bias.to(dt), a.to(dt), W.to(dt))
        return out.float() if fp32_out else out

    def _pre_acts(self, x, fp32_out=True):
        # x normalised (B, d_in) -> encoder pre-activations (B, d_sae), bias added inside the matmul
        return self._matmul(self._enc_bias(), x, self.W_enc, fp32_out)

    def _decode_n(self, f):
        # f (B, d_sae) -> normalised reconstruction (B, d_in)
        return self._matmul(self.b_dec, f, self._W_dec())

    # how _decode_sparse_n decodes: None picks (a GPU the matmul; a CPU the gather where fewer
    # than DENSE_FROM of the latents are kept a row, else the matmul); True or False forces one
    # (the tests run the GPU's way on the CPU)
    DENSE_DECODE = None
    # On the 2-core AMD EPYC (train_step of one TopK or BatchTopK SAE, 1 and 2 threads) the
    # gather was the faster at 4% kept (k 40 of 1024: 29 against 36 ms a step, batch 1024, d_in
    # 128), about even at 6-8%, and the matmul at 16% (k 160 of 1024: 40 against 52 ms; k 40 of
    # 256 at batch 256, d_in 32: 4.6 against 7.0): the gather's cost grows with the kept rows
    # B x k, the matmul's with B x d_sae at BLAS speed
    DENSE_FROM = 0.1

    def _decode_sparse_n(self, values, indices, rows=None, n_rows=None):
        """The reconstruction from only the active latents: values and indices (B, k), or flat
        (n,) with `rows` (n,), the row of each entry in any order, and n_rows = B; equal to
        _decode_n of the dense f. On a CPU at the cost of the active latents only: embedding_bag
        sums the W_dec rows it picks, weighted by the values, and its backward writes only those
        rows of W_dec's gradient. On a GPU the values are scattered into the dense f (B, d_sae)
        and decoded by _decode_n: a matmul on tensor cores, whose backward gives W_dec's gradient
        as one more matmul, where the gather's backward would add B * k rows one by one. A CPU
        that keeps a large share of the latents (DENSE_FROM) decodes by the matmul too."""
        d_sae = self.W_dec.shape[0]
        dense = self.DENSE_DECODE
        if dense is None:  # a GPU; a CPU where its rows keep DENSE_FROM of the latents, on average
            rows_n = n_rows if rows is not None else len(values)
            dense = self.W_dec.device.type != 'cpu' or values.numel() >= self.DENSE_FROM * d_sae * rows_n
        if dense:
            # f built in matmul_dtype, which _decode_n's matmul takes as it is: the same numbers as
            # an fp32 f cast there, without an fp32 (B, d_sae) tensor to write and read back
            values = values.to(self.matmul_dtype)
            if rows is None:  # (B, k): row b's picks are row b. scatter_add, not scatter: a row's
                # picks are distinct, so the sums are the values themselves, and inductor builds
                # f in one write where scatter first wrote zeros and then copied them (TopK's
                # compiled step: 19.6 bytes an entry where it was 23.7; README, On one GPU)
                f = values.new_zeros(len(indices), d_sae).scatter_add(1, indices, values)
            else:
                f = values.new_zeros(n_rows, d_sae).index_put((rows, indices), values)
            return self._decode_n(f)
        offsets = None
        if rows is not None:  # embedding_bag takes flat entries grouped by row: row r's from offsets[r]
            order = torch.argsort(rows)
            # a count per row by index_add_ (bincount's output size would depend on the data)
            counts = torch.zeros(n_rows, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
            offsets = torch.cumsum(counts, 0) - counts                    # (B,)
            values, indices = values[order], indices[order]
        return F.embedding_bag(indices, self._W_dec(), offsets, mode='sum', per_sample_weights=values) + self.b_dec

    def _encode_n(self, x):
        raise NotImplementedError

    def _train_forward(self, x):
        """x normalised (B, d_in) -> (l0, x_hat, sparsity_loss, aux_loss); may update buffers.
        l0: the mean number of non-zero features per row (a tensor, no gradient)."""
        raise NotImplementedError

    def _penalty(self, acts):
        # acts >= 0 (B, d_sae). L1 = sum_i |f_i| averaged over the batch; decoder rows are unit
        # norm, so no norm weighting. Per-row sums, as every (B, d_sae) reduction here (active_per_row)
        return self._coef_now() * acts.sum(-1).mean()

    def _coef_now(self):
        # the coefficient as _loss uses it: under compile_loss the 0-dim tensor loss() fills at
        # every step (one trace then serves every setting; a float would be baked into the trace,
        # a trace per value), eagerly the float itself
        return self._coef_tensor if self.loss_compiled else self.coef

    # --- the loss ---

    def loss(self, x, step):
        """x RAW activations (B, d_in) -> (loss, stats). All maths in fp32, normalised space.
        In three parts: _before_loss and _after_loss keep the training state that lives on the
        host (p-annealing's schedule and history, TopK's dead latents: subclasses extend them),
        and _loss is the tensor work, the part compile_loss (one SAE) or compile_losses (several
        SAEs in one graph) compiles."""
        self._before_loss(x, step)
        loss, stats = self._loss(x)
        return loss, self._after_loss(stats, step)

    def _before_loss(self, x, step):
        if self.loss_compiled:  # the coefficient as _loss takes it (_coef_now)
            self._scalar('_coef_tensor', self.coef)

    def _after_loss(self, stats, step):
        # _loss's stats -> loss()'s
        if self.loss_graphed:  # out of the graph's memory, which its next run overwrites: one copy
            stats = dict(zip(stats, torch.stack(list(stats.values())).unbind()))
        return dict(stats, p=float(self.p), coef=float(self.coef))

    def _loss(self, x):
        # the tensors of loss(): the same kernels every step, whatever the step, so that a
        # compiled _loss (compile_loss) is traced once and never waits for the host
        x = x.float() * self.act_scale                      # (B, d_in)
        l0, x_hat, sparsity_loss, aux_loss = self._train_forward(x)
        sq_err = (x - x_hat).pow(2).sum(-1)                 # (B,)
        mse = sq_err.mean()
        loss = mse + sparsity_loss + aux_loss
        with torch.no_grad():
            total_var = (x - x.mean(0)).pow(2).sum()
            fve = 1 - sq_err.sum() / total_var.clamp_min(1e-12)
            # no device->host copy here: on a GPU that would wait for every step of every SAE
            values = torch.stack([loss, mse, sparsity_loss, aux_loss, l0, fve]).detach()  # (6,)
        return loss, dict(zip(STATS_KEYS[:6], values.unbind()))

    # --- keeping decoder rows at unit norm: the gradient leaves the norms alone (_W_dec, in
    # the backward), and the rows are renormalised after each optimiser step ---

    def _W_dec(self):
        """W_dec (d_sae, d_in) as every decoder uses it: its own value, but the backward removes
        from its gradient the component along each row, g - (g . r) r with r = W_dec[i] /
        ||W_dec[i]||: a step along a row would only change the row's norm, which the
        renormalisation after each step undoes. In the backward rather than applied to
        W_dec.grad after it, so that a compiled loss fuses it into its backward kernels; and as
        plain tensor operations rather than an autograd.Function, so that torch.compile's
        autograd cache can keep the compiled loss on disk (it refuses graphs that hold a
        Function). How: along = (W_dec[i] . r) r is the row itself in value, and its gradient
        with r held constant is the projection (g . r) r; W_dec + (along.detach() - along) is
        W_dec exactly (a value minus itself is 0) and passes back g - (g . r) r. The projection
        is linear, so two uses (TopK's aux decode) sum to the projection of their sum."""
        W = self.W_dec
        rows = (W / W.norm(dim=1, keepdim=True)).detach()  # (d_sae, d_in) unit rows, constant
        along = (W * rows).sum(dim=1, keepdim=True) * rows  # (d_sae, d_in), W in value
        return W + (along.detach() - along)

    @torch.no_grad()
    def after_optimizer_step(self, step):
        """Renormalise decoder rows to unit norm (subclasses add annealing updates)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    def set_total_steps(self, total_steps):
        """Change the planned length of training before any scheduled update has happened
        (train.py's --sae_minutes fits the steps to a time budget after timing the first ones)."""
        self.cfg['total_steps'] = int(total_steps)

    def extra_repr(self):
        return ', '.join(f'{k}={v}' for k, v in self.cfg.items())


# ----------------------------------------------------------------------------------------------
# standard and gated

class StandardSAE(SAE):
    """f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec, L1 penalty."""
    arch = 'standard'

    def _encode_n(self, x):
        return self._pre_acts(x).relu_()                     # (B, d_sae), in place: no copy

    def _train_forward(self, x):
        f = self._encode_n(x)
        # L0 and the penalty before the decode, not after it. Under compile_loss the order
        # decides what the backward reads: torch.compile's partitioner chooses which forward
        # tensors the backward keeps and which it recomputes, and it does not recompute an
        # elementwise op that comes after a non-fusible use of its input (the decode's matmul).
        # After the decode, p-annealing's f^p terms and masks were kept as fp32 and bool
        # (B, d_sae) tensors, written and read back at every step; before it, the backward
        # recomputes them from the pre-activations it keeps anyway (README, On one GPU)
        l0, penalty = active_per_row(f), self._penalty(f)
        x_hat = self._decode_n(f)
        return l0, x_hat, penalty, x.new_zeros(())


class GatedSAE(SAE):
    """Gated SAE. The gate and magnitude paths share W_enc; the magnitude path scales it per
    feature by exp(r_mag). b_enc is the gate bias (b_gate), b_mag the magnitude bias.
        pi_gate = (x - b_dec) W_enc + b_enc,  pi_mag = (x - b_dec) W_enc * exp(r_mag) + b_mag
        f = 1[pi_gate > 0] * ReLU(pi_mag)
    Training loss: mse + coef * sum ReLU(pi_gate) + ||x - (ReLU(pi_gate) W_dec + b_dec)||^2 with
    the decoder detached in that auxiliary term (it trains the gate path to reconstruct)."""
    arch = 'gated'

    def __init__(self, d_in, d_sae, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.r_mag = nn.Parameter(torch.zeros(d_sae))    # (d_sae,)
        self.b_mag = nn.Parameter(torch.zeros(d_sae))    # (d_sae,)

    def _gate_and_mag(self, x):
        pi_gate = self._pre_acts(x)                      # (B, d_sae): (x - b_dec) W_enc + b_enc
        # pi_mag = (x - b_dec) W_enc exp(r_mag) + b_mag, from pi_gate without a second matmul
        scale = torch.exp(self.r_mag)                    # (d_sae,)
        pi_mag = torch.addcmul(self.b_mag - self.b_enc * scale, pi_gate, scale)
        return pi_gate, pi_mag

    @staticmethod
    def _gated(pi_gate, pi_mag):
        return (pi_mag * (pi_gate > 0).to(pi_mag.dtype)).relu_()   # (B, d_sae): 1[pi_gate > 0] ReLU(pi_mag)

    def _encode_n(self, x):
        return self._gated(*self._gate_and_mag(x))

    def _train_forward(self, x):
        pi_gate, pi_mag = self._gate_and_mag(x)
        f = self._gated(pi_gate, pi_mag)
        gate_acts = F.relu(pi_gate)                      # (B, d_sae)
        # L0 and the penalty before the decodes, as in StandardSAE
        l0, penalty = active_per_row(f), self._penalty(gate_acts)
        x_hat = self._decode_n(f)
        x_hat_gate = self._matmul(self.b_dec.detach(), gate_acts, self.W_dec.detach())
        aux_loss = (x - x_hat_gate).pow(2).sum(-1).mean()
        return l0, x_hat, penalty, aux_loss


# ----------------------------------------------------------------------------------------------
# p-annealing (the paper's method), as a mixin over standard and gated

class PAnnealing:
    """p-annealing, the paper's method (its p-annealing section): the penalty is
    coef * L_p with L_p = sum_i f_i^p per row (lp_sum), averaged over the batch.
    Schedule: p starts at 1; n_anneal_steps updates at steps evenly spread from anneal_start
    (a fraction of training, or a step) to the final step (total_steps - 1) set p to the values
    of linspace(1, p_end, n_anneal_steps) in turn. As in the paper's code the first update keeps
    p = 1 and the last sets p_end on the final step, so the last trained p is about 0.29 for 10
    updates and p_end = 0.2.
    Coefficient rescale: a smaller p changes the size of L_p (features below 1 grow, above 1
    shrink), so at each update coef <- coef * mean(L_p) / mean(L_p_next), the means taken over
    the last history_len batches before the update, each batch's L_p_next computed with the next
    p on the same features. The penalty's value is then continuous across the update, and only
    its shape changes. (tests: test_penalty_value_continuous_at_each_rescale, test_p_schedule.)
    Updates run in after_optimizer_step(step), so loss(x, step) uses the p set by updates at
    earlier steps: see p_at(step)."""

    def _init_anneal(self, anneal_start, p_end, n_anneal_steps, history_len):
        if self.cfg['total_steps'] is None:
            raise ValueError(f'{self.arch}: p-annealing needs total_steps')
        self.cfg.update(anneal_start=anneal_start, p_end=p_end, n_anneal_steps=n_anneal_steps,
                        history_len=history_len)
        self.lp_history = deque(maxlen=history_len)  # (mean L_p, mean L_p_next) per batch
        self._schedule = self.p_schedule()

    def anneal_start_step(self):
        # a float is a fraction of training, an int a step
        start, total = self.cfg['anneal_start'], self.cfg['total_steps']
        return int(round(start * total)) if isinstance(start, float) else int(start)

    def p_schedule(self):
        """List of (step, p) updates: after the optimiser step `step`, p becomes `p`."""
        n, last = self.cfg['n_anneal_steps'], self.cfg['total_steps'] - 1
        first = min(self.anneal_start_step(), last)
        steps = torch.linspace(first, last, n, dtype=torch.float64).round().long().tolist()
        ps = torch.linspace(1.0, self.cfg['p_end'], n, dtype=torch.float64).tolist()
        return list(zip(steps, ps))

    def set_total_steps(self, total_steps):
        if self.n_anneal_done:
            raise RuntimeError(f'{self.arch}: the p schedule has started; set total_steps before {self._schedule[0][0]}')
        super().set_total_steps(total_steps)
        self._schedule = self.p_schedule()

    def p_at(self, step):
        """The p that loss(x, step) uses: set by the last update at an earlier step."""
        p = 1.0
        for update_step, update_p in self._schedule:
            if update_step < step:
                p = update_p
        return p

    _history_p = None  # set by loss(): the next update's p, while this batch's L_p_next is kept
    _keep = False      # set by loss(): whether this batch's (L_p, L_p_next) joins the history

    def _before_loss(self, x, step):
        # a compiled _loss takes p as a 0-dim tensor, as every SAE its coefficient (SAE.loss): one
        # trace then serves every value; eager keeps floats, so p = 1 skips the power (lp_sum)
        as_arg = self._scalar if self.loss_compiled else (lambda name, v: float(v))
        self._p_arg = as_arg('_p_tensor', self.p)
        # keep history only in the window just before the next update: eager computes L_p_next
        # only there (saves a pow per step); a compiled loss computes it every step, so that
        # it is one trace (fused, the power costs little there) and keeps it only there
        self._history_p, self._keep = None, False
        if self.training and self.n_anneal_done < len(self._schedule):
            next_step, next_p = self._schedule[self.n_anneal_done]
            self._keep = next_step - step < self.cfg['history_len']
            if self._keep or self.loss_compiled:
                self._history_p = as_arg('_history_p_tensor', next_p)
        elif self.loss_compiled:
            self._history_p = as_arg('_history_p_tensor', self.p)
        super()._before_loss(x, step)

    def _after_loss(self, stats, step):
        if self._keep:  # host-side state, appended outside the tensor work; a copy (one small
            # kernel), as a CUDA graph's outputs are overwritten at its next run (SAE.compile_loss)
            self.lp_history.append(tuple(torch.stack(self._lp_pair).unbind()))
        return super()._after_loss(stats, step)

    def _penalty(self, acts):
        lp = lp_sum(acts, self._p_arg).mean()
        if self._history_p is not None:
            with torch.no_grad():  # (mean L_p, mean L_p_next): read by after_optimizer_step's rescale
                self._lp_pair = (lp.detach(), lp_sum(acts.detach(), self._history_p).mean())
        return self._coef_now() * lp

    @torch.no_grad()
    def after_optimizer_step(self, step):
        super().after_optimizer_step(step)
        schedule = self._schedule
        # `while`, not `if`: on very short runs several updates can fall on one step; the
        # later ones then find no history and keep coef (their p never trains anyway)
        while self.n_anneal_done < len(schedule) and schedule[self.n_anneal_done][0] <= step:
            p_next = schedule[self.n_anneal_done][1]
            if self.lp_history and p_next != self.p:
                lp_now = torch.stack([h[0] for h in self.lp_history]).mean().item()
                lp_next = torch.stack([h[1] for h in self.lp_history]).mean().item()
                if lp_next > 0:
                    self.coef = self.coef * lp_now / lp_next
            self.p = p_next
            self.n_anneal_done += 1
            self.lp_history.clear()  # the next update compares against a different p_next


class PAnnealSAE(PAnnealing, StandardSAE):
    """The standard SAE with p-annealing's penalty coef * sum_i f_i^p (PAnnealing)."""
    arch = 'p_anneal'

    def __init__(self, d_in, d_sae, *, anneal_start=0.2, p_end=0.2, n_anneal_steps=10,
                 history_len=10, **kw):
        StandardSAE.__init__(self, d_in, d_sae, **kw)
        self._init_anneal(anneal_start, p_end, n_anneal_steps, history_len)


class GatedAnnealSAE(PAnnealing, GatedSAE):
    """The gated SAE with p-annealing's penalty on the gate, coef * sum_i ReLU(pi_gate)_i^p
    (PAnnealing)."""
    arch = 'gated_anneal'

    def __init__(self, d_in, d_sae, *, anneal_start=0.2, p_end=0.2, n_anneal_steps=10,
                 history_len=10, **kw):
        GatedSAE.__init__(self, d_in, d_sae, **kw)
        self._init_anneal(anneal_start, p_end, n_anneal_steps, history_len)


# ----------------------------------------------------------------------------------------------
# TopK and BatchTopK

class TopKSAE(SAE):
    """Keep the k largest of ReLU((x - b_dec) W_enc + b_enc) per row; no sparsity penalty (coef is
    unused and 0). AuxK loss (Gao et al. 2024): latents that have not fired for dead_tokens
    training rows are 'dead'; their ReLU'd pre-activations reconstruct the residual x - x_hat
    (detached), giving them gradient. The aux MSE is divided by the residual's variance (scale
    free) and weighted by aux_coef. Where more than aux_k latents are dead, the aux_k that have
    gone longest without firing take part (Gao et al. take each row's top aux_k of all the dead;
    the two agree while at most aux_k are dead, and this way no step needs a top-k over every
    latent, nor the host's word on how many are dead: _aux_loss). Training decodes from the k
    active latents only (_decode_sparse_n; a CPU that keeps under a tenth of the latents a row
    never builds the dense (B, d_sae) f)."""
    arch = 'topk'
    DEFAULT_COEF = 0.0

    def __init__(self, d_in, d_sae, *, k=32, aux_k=None, aux_coef=1 / 32, dead_tokens=10_000_000, **kw):
        super().__init__(d_in, d_sae, **kw)
        aux_k = d_in // 2 if aux_k is None else aux_k
        self.cfg.update(k=k, aux_k=aux_k, aux_coef=aux_coef, dead_tokens=dead_tokens)
        self.register_buffer('tokens_since_fired', torch.zeros(d_sae, dtype=torch.long))

    def _relu_pre(self, x):
        return self._pre_acts(x).relu_()                 # (B, d_sae)

    def _keep_topk_per_row(self, acts):
        values, indices = acts.topk(self.cfg['k'], dim=-1, sorted=False)  # (B, k)
        return torch.zeros_like(acts).scatter(-1, indices, values)       # (B, d_sae)

    def _encode_n(self, x):
        return self._keep_topk_per_row(self._relu_pre(x))

    def _select_train(self, pre):
        """The training selection from pre-activations (B, d_sae): (values, indices, rows) for
        _decode_sparse_n, the values fp32 and before their ReLU (rows None: (B, k) picks, row b's
        in row b), in no set order (unsorted, a GPU's top-k skips sorting them)."""
        values, indices = pre.topk(self.cfg['k'], dim=-1, sorted=False)  # (B, k)
        return values.float(), indices, None

    def _train_forward(self, x):
        # top-k of the pre-activations, then ReLU of the k values: the same features as top-k of
        # ReLU(pre) (a negative among the k becomes a kept zero), with no (B, d_sae) ReLU to run
        # forward and backward. pre stays in matmul_dtype: with bf16 matmuls its fp32 form would
        # hold the same numbers, and the top-k (a kernel that no compiler fuses, reading pre
        # several times) reads half the bytes; only the k picks become fp32
        pre = self._pre_acts(x, fp32_out=False)          # (B, d_sae) in matmul_dtype
        values, indices, rows = self._select_train(pre)
        values = values.relu()
        x_hat = self._decode_sparse_n(values, indices, rows, n_rows=x.shape[0])
        active = values.detach() > 0                     # a kept zero is not a firing latent
        if self.training:  # dead-latent bookkeeping counts training rows only
            self.tokens_since_fired += x.shape[0]
            # latents kept with a positive value fired: their counts restart. A count per latent
            # (index_add_), not a boolean-mask index: no shape depends on the data, so the GPU
            # never waits for the host to learn one
            fired = torch.zeros_like(self.tokens_since_fired).index_add_(0, indices.flatten(), active.flatten().long())
            self.tokens_since_fired.masked_fill_(fired > 0, 0)
        l0 = active.sum() / x.shape[0]
        return l0, x_hat, x.new_zeros(()), self._aux_loss(x, x_hat)

    # rows of training left before any latent can be dead (dead_tokens - the largest count, less
    # the rows since), kept on the host: while it is positive the aux loss is skipped without
    # reading the counts from the device. None: not known yet (a new SAE, or new counts from
    # load_state_dict), so the next training step reads the counts once; whoever sets the counts
    # by hand after a step sets it back to None
    rows_to_dead = None
    _aux_on = True  # set by loss(): whether some latent may be dead after this batch

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.rows_to_dead = None  # new counts: read them again at the next training step

    def _before_loss(self, x, step):
        if self.training:
            if self.rows_to_dead is None:
                self.rows_to_dead = self.cfg['dead_tokens'] - int(self.tokens_since_fired.max())
            self.rows_to_dead -= x.shape[0]
        # a compiled loss always computes the aux loss (zero while no latent is dead): one trace
        self._aux_on = self.loss_compiled or self.rows_to_dead is None or self.rows_to_dead <= 0
        super()._before_loss(x, step)

    def _aux_loss(self, x, x_hat):
        if not self._aux_on:  # no latent can be dead yet
            return x.new_zeros(())
        since = self.tokens_since_fired                                  # (d_sae,)
        dead = since >= self.cfg['dead_tokens']                          # (d_sae,)
        residual = (x - x_hat).detach()                                  # (B, d_in)
        # the aux_k longest-dead latents, the same for every row (ties in any order). Where at most
        # aux_k are dead they are all among them, and the live ones picked beside them are masked
        # out: every dead latent's ReLU(pre) rebuilds the residual, as a top aux_k of each row's
        # dead pre-activations would. Shapes never depend on the data, and a step with no dead
        # latent costs two small matmuls, not a top-k over every latent and a full decode
        aux_k = min(self.cfg['aux_k'], self.W_enc.shape[1])
        picks = since.topk(aux_k, sorted=False).indices                  # (aux_k,)
        # their pre-activations afresh from their encoder columns (a (B, d_in) x (d_in, aux_k)
        # matmul), not gathered from pre, whose gradient would be a (B, d_sae) tensor to scatter into
        pre = self._matmul(self._enc_bias()[picks], x, self.W_enc[:, picks])  # (B, aux_k)
        acts = (pre * dead[picks]).relu()                                # (B, aux_k)
        residual_hat = self._matmul(torch.zeros_like(self.b_dec), acts, self._W_dec()[picks])  # (B, d_in), no bias
        aux_mse = (residual - residual_hat).pow(2).sum(-1).mean()
        residual_var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        return self.cfg['aux_coef'] * aux_mse / residual_var * dead.any()  # 0 where none is dead


class BatchTopKSAE(TopKSAE):
    """Training (loss) keeps the k*B largest activations over the whole batch (B rows), so rows
    share a budget of k on average. That is undefined for one row, so encode() (inference)
    keeps activations above a threshold: an exponential moving average (decay threshold_decay)
    of the smallest activation kept in each training batch. Before any training step has set
    it (threshold < 0) encode falls back to top-k per row. encode_batch(x) exposes the
    training-time selection."""
    arch = 'batch_topk'

    def __init__(self, d_in, d_sae, *, threshold_decay=0.99, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.cfg.update(threshold_decay=threshold_decay)
        self.register_buffer('threshold', torch.tensor(-1.0))  # normalised units; < 0 = unset

    def _topk_over_batch(self, acts):
        """The k*B largest entries of acts (B, d_sae): values (k*B,) and flat indices, in no set
        order (a GPU's top-k of that many then skips sorting them).
        On a CPU a top-k over all B * d_sae entries is slow, so the candidates are each row's
        top 4k: an entry left out of them is at most its row's 4k-th value, so where every row's
        4k-th value is below the k*B-th candidate the candidates hold the answer; else (a row
        with more than 4k of the batch's largest) the whole batch is searched. That check reads
        a value on the host, so on a GPU (and under torch.compile) the whole batch is searched at
        once: a GPU's top-k needs no shortcut, and its steps then never wait for the host."""
        B, d_sae = acts.shape
        n, per_row = self.cfg['k'] * B, 4 * self.cfg['k']
        # (is_compiling first: under compile the size test would be traced, a guard on k)
        if not torch.compiler.is_compiling() and acts.device.type == 'cpu' and per_row < d_sae:
            # unsorted: sorted, the two top-k took 1.5x and 3x as long on a 2-core CPU (README, Speed)
            cand_values, cand_indices = acts.topk(per_row, dim=-1, sorted=False)  # (B, per_row)
            values, pos = cand_values.flatten().topk(n, sorted=False)    # (n,) into the candidates
            if (cand_values.min(-1).values < values.min()).all():
                rows = torch.div(pos, per_row, rounding_mode='floor')
                return values, rows * d_sae + cand_indices.flatten()[pos]
        return acts.flatten().topk(n, sorted=False)

    def _select_train(self, pre):
        values, flat = self._topk_over_batch(pre)
        values = values.float()
        if self.training:
            with torch.no_grad():  # on the device: no host read of the smallest kept value
                smallest_kept = values.min()
                decay = self.cfg['threshold_decay']
                ema = torch.where(self.threshold < 0, smallest_kept, decay * self.threshold + (1 - decay) * smallest_kept)
                # a batch whose k*B-th value is not positive (too few activations fire) leaves it
                self.threshold.copy_(torch.where(smallest_kept > 0, ema, self.threshold))
        # flat entries, each with its row: the GPU's dense decode scatters them as they are, and
        # only the CPU's gather groups them by row (_decode_sparse_n)
        d_sae = pre.shape[1]
        return values, flat % d_sae, torch.div(flat, d_sae, rounding_mode='floor')

    def encode_batch(self, x):
        """Training-time selection on RAW x (B, d_in): the top k*B activations of the batch."""
        acts = self._relu_pre(x.float() * self.act_scale)
        values, flat = self._topk_over_batch(acts)
        return torch.zeros_like(acts).flatten().scatter(0, flat, values).view_as(acts)

    def _encode_n(self, x):
        acts = self._relu_pre(x)
        if self.threshold < 0:
            return self._keep_topk_per_row(acts)
        return acts * (acts > self.threshold)


# ----------------------------------------------------------------------------------------------
# JumpReLU

def jumprelu_straight_through(z, theta, eps):
    """JumpReLU's features and L0 count with their straight-through gradients: z (B, d_sae)
    pre-activations, theta (d_sae,) thresholds, eps the bandwidth -> f = z * H(z - theta)
    (B, d_sae) and l0 = the mean over rows of sum_i H(z - theta)_i (a 0-dim tensor). With K the
    rectangle kernel (1 on |u| < 1/2, else 0):
        df/dz = H(z - theta),   df/dtheta = -(theta / eps) K((z - theta) / eps)
        H(z - theta) passes no gradient to z,   dH/dtheta = -(1 / eps) K((z - theta) / eps)
    Written as plain tensor operations, as an autograd.Function would keep torch.compile's
    autograd cache from storing a compiled loss: theta_step = theta - theta.detach() is 0 with
    gradient 1 to theta, so a term c * theta_step, c held constant, adds 0 to a value and c to
    its gradient with respect to theta."""
    with torch.no_grad():  # the masks as 0. / 1. floats: on a CPU a product with a float is several
        # times faster than a where() or a product with a bool (README, Speed)
        fires = (z > theta).to(z.dtype)                  # (B, d_sae) H(z - theta)
        window = ((z - theta).abs_() < eps / 2).to(z.dtype)  # (B, d_sae) K((z - theta) / eps)
        n_fired = fires.sum(-1).mean()                   # the count's value
        n_window = window.sum(0)                         # (d_sae,) K summed over the batch
    theta_step = theta - theta.detach()                  # (d_sae,) zeros, gradient 1 to theta
    f = z * fires + window * (theta_step * (-theta.detach() / eps))
    l0 = n_fired + (n_window * theta_step).sum() * (-1 / eps) / z.shape[0]
    return f, l0


class JumpReLUSAE(SAE):
    """f = z * H(z - theta), z = (x - b_dec) W_enc + b_enc, theta = exp(log_threshold) > 0
    per feature. Penalty coef * L0, trained through straight-through estimators with a
    rectangle kernel of width `bandwidth`. Both bandwidth and init_threshold are in normalised
    units, where activations are sqrt(d_in) times larger than with the unit mean squared norm
    the paper uses, hence defaults larger than its 0.001. Adam moves log_threshold about lr per
    step whatever the coefficient, so in a short run the L0 hardly depends on coef unless the
    thresholds learn faster: their lr is threshold_lr_scale times the rest (lr_scales)."""
    arch = 'jumprelu'
    DEFAULT_COEF = 1.0
    COEF_POWER = 1.0  # an L0 penalty (SAE.COEF_POWER)

    def __init__(self, d_in, d_sae, *, bandwidth=0.05, init_threshold=0.1, threshold_lr_scale=10.0, **kw):
        super().__init__(d_in, d_sae, **kw)
        self.cfg.update(bandwidth=bandwidth, init_threshold=init_threshold, threshold_lr_scale=threshold_lr_scale)
        self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(init_threshold)))

    def lr_scales(self):
        # the thresholds get their own lr: Adam moves log_threshold about lr per step whatever
        # the coefficient, so with the base lr a short run ends where it started
        rest = [p for name, p in self.named_parameters() if name != 'log_threshold']
        return [(rest, 1.0), ([self.log_threshold], self.cfg['threshold_lr_scale'])]

    def _encode_n(self, x):
        z = self._pre_acts(x)
        return z * (z > torch.exp(self.log_threshold))

    def _train_forward(self, x):
        f, l0 = jumprelu_straight_through(self._pre_acts(x), torch.exp(self.log_threshold), self.cfg['bandwidth'])
        x_hat = self._decode_n(f)
        # l0's value is the mean count of features with z > theta > 0: those f keeps non-zero
        return l0.detach(), x_hat, self._coef_now() * l0, x.new_zeros(())


# ----------------------------------------------------------------------------------------------
# make, save / load



def make_sae(arch, d_in, d_sae, **kwargs):
    if arch not in ARCHS:
        raise ValueError(f'unknown SAE arch {arch!r}; choose from {sorted(ARCHS)}')
    return ARCHS[arch](d_in, d_sae, **kwargs)


class SAEFileError(UserError, ValueError):
    """A missing, corrupt, foreign or outdated SAE file."""


def to_dict(sae, extra=None):
    """Everything that rebuilds `sae` and continues its training, as plain data (numbers,
    strings, lists, dicts, tensors; loads with weights_only): its cfg, state_dict (buffers
    included: act_scale, TopK's dead-latent counters, BatchTopK's threshold), its training state
    (p, coef, the annealing updates done and p-annealing's L_p history), and `extra`."""
    train_state = {'p': float(sae.p), 'coef': float(sae.coef), 'n_anneal_done': int(sae.n_anneal_done)}
    if hasattr(sae, 'lp_history'):  # p-annealing: the batches' (L_p, L_p_next) since the last update
        train_state['lp_history'] = [[a.detach().cpu(), b.detach().cpu()] for a, b in sae.lp_history]
    return {
        'format': FILE_FORMAT,
        'version': FILE_VERSION,
        'cfg': dict(sae.cfg),
        'state_dict': {k: v.detach().cpu().clone() for k, v in sae.state_dict().items()},
        'train_state': train_state,
        'extra': dict(extra or {}),
    }


def from_dict(checkpoint, device='cpu'):
    """The SAE of to_dict's `checkpoint`, on `device`, in train mode; `extra` becomes sae.meta."""
    cfg = dict(checkpoint['cfg'])
    sae = make_sae(cfg.pop('arch'), **cfg)
    sae.load_state_dict(checkpoint['state_dict'])
    sae.to(device)
    train_state = checkpoint.get('train_state', {})
    sae.p = train_state.get('p', 1.0)
    sae.coef = train_state.get('coef', sae.cfg['coef'])
    sae.n_anneal_done = train_state.get('n_anneal_done', 0)
    for a, b in train_state.get('lp_history', []):
        sae.lp_history.append((a.to(device), b.to(device)))
    sae.meta = checkpoint.get('extra', {})
    return sae


def save(sae, path, extra=None):
    """Atomically write the SAE (to_dict) and `extra` (plain python data: numbers, strings,
    lists, dicts, tensors) to path."""
    atomic_save(to_dict(sae, extra), path)


def load(path, game=None, dirs=''):
    """Rebuild any saved SAE from its file alone (in eval mode); `extra` becomes sae.meta.
    `game`, where given, must be the game of the model the SAE read (meta['game']), as
    model.load_checkpoint checks. `dirs`: the caller's non-default --data_dir/--out_dir
    (data.dir_args), for the command an error names."""
    hint = f'python train.py --game {game or "<game>"}{dirs} --stage sae'
    try:
        sae = from_dict(load_file(path, FILE_FORMAT, hint))
    except UserError as e:
        raise SAEFileError(str(e)) from None
    except Exception as e:
        raise SAEFileError(f'{path} does not match this code ({type(e).__name__}: {e}): run `{hint}`') from None
    if game is not None and sae.meta.get('game') != game:
        raise SAEFileError(f"{path} is an SAE of a model of {sae.meta.get('game')}, not {game}: run `{hint}`")
    return sae.eval()


# ----------------------------------------------------------------------------------------------
# training: the one SAE training step (train.py's sweep, bench.py and the tests all call it)

def make_optimizer(saes, lr):
    """One Adam over the parameters of `saes` (an SAE, or a list of SAEs that train_step trains
    together), a group per lr scale of their lr_scales() (JumpReLU's thresholds have their own).
    Each group carries 'lr_scale': train_step sets its lr to lr * lr_scale. Adam updates every
    parameter on its own, so SAEs sharing one optimizer train exactly as with one each (a test
    holds them bit for bit to that); shared, the sweep's optimiser step is one call, not one
    per SAE, which saves the host most of the optimiser's time a step (README)."""
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    groups = {}  # lr scale -> the parameters at it, in the SAEs' order
    for sae in saes:
        for params, scale in sae.lr_scales():
            groups.setdefault(scale, []).extend(params)
    # on a GPU one fused kernel updates every parameter (make the optimizer after .to(device))
    return torch.optim.Adam([{'params': params, 'lr': lr * scale, 'lr_scale': scale}
                             for scale, params in groups.items()], lr=lr, fused=saes[0].W_enc.is_cuda)


def compile_losses(saes, cuda_graphs=False, **options):
    """The training losses of several SAEs (a list) as ONE compiled function: x RAW (B, d_in) ->
    (the sum of their losses, [each SAE's _loss stats]), for train_step(..., losses=it). One
    forward and one backward a step for all of them, where compile_loss gives each SAE its own:
    the host launches (or, with cuda_graphs, replays) two graphs a step instead of two per SAE,
    and the device runs their kernels back to back. The sum's gradient is each SAE's own (their
    parameters are apart), so each trains exactly as alone; all their forward activations are
    held at once until the backward (each SAE's: a few (B, d_sae) tensors, 134 MB each in fp32 at
    the gpu presets' batch 8192 and d_sae 4096).
    Each SAE's loss() state (coefficients and p as 0-dim tensors, TopK's aux loss every step) is
    that of compile_loss; cuda_graphs and the rules that come with it: compile_loss. The SAEs'
    own _loss is traced, not a compiled one that compile_loss left on them."""
    saes = list(saes)
    for sae in saes:
        sae.loss_compiled, sae.loss_graphed = True, cuda_graphs

    def losses(x):
        outs = [type(sae)._loss(sae, x) for sae in saes]
        return sum(loss for loss, _ in outs), [stats for _, stats in outs]
    # every call makes a new `losses` on one code object, a trace of its own for each (the sweep's,
    # the control's; bench.py's 16): more than torch's default limit of traces for one function
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if cuda_graphs:
        options['mode'] = 'reduce-overhead'
    return torch.compile(losses, **options)


def train_step(saes, optimizer, x, step, lr, losses=None):
    """One optimiser step of each SAE of `saes` (an SAE, or a list sharing `optimizer`, from
    make_optimizer) on the same RAW activations x (B, d_in) at learning rate `lr` (each
    parameter group at lr * its 'lr_scale'). Returns the SAE's stats dict (a list: theirs).
    losses: compile_losses(saes), their losses in one compiled function; None: each SAE's
    loss() in turn (compiled by compile_loss, or not).
    The order matters: the renormalisation and any p-annealing update after the optimiser step
    (W_dec's gradient comes out of the backward without its components along the rows)."""
    one = isinstance(saes, SAE)
    saes = [saes] if one else saes
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    optimizer.zero_grad(set_to_none=True)
    if losses is None:
        stats = []
        for sae in saes:  # one SAE's forward and backward at a time: one SAE's activations in memory
            loss, sae_stats = sae.loss(x, step)
            loss.backward()
            stats.append(sae_stats)
    else:  # loss() in its three parts, the tensor work of all in one call
        for sae in saes:
            sae._before_loss(x, step)
        total, all_stats = losses(x)
        total.backward()
        stats = [sae._after_loss(sae_stats, step) for sae, sae_stats in zip(saes, all_stats)]
    optimizer.step()
    for sae in saes:
        sae.after_optimizer_step(step)
    return stats[0] if one else stats


def train_sae(sae, batches, lr=3e-4, warmup_steps=1000, total_steps=None):
    """Adam with linear lr warm-up over `batches` (an iterable of RAW (B, d_in) tensors), for
    total_steps steps (default sae.cfg['total_steps'], else until batches run out).
    Returns the list of per-step stats dicts."""
    total_steps = total_steps if total_steps is not None else sae.cfg['total_steps']
    optimizer = make_optimizer(sae, lr)
    warmup = max(1, warmup_steps)
    sae.train()
    history = []
    for step, x in enumerate(batches):
        if total_steps is not None and step >= total_steps:
            break
        history.append(train_step(sae, optimizer, x, step, lr * min(1.0, (step + 1) / warmup)))
    return history
