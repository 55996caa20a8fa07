"""
Game transcripts and their ground-truth board states: the first stage of the pipeline.

Reads:  nothing (Othello, random chess), the Stockfish binary (--source stockfish), or a .pgn file.
Writes: data/<game>/train.pt and data/<game>/val.pt  -- dict(tokens [N, T] uint8, itos, pad_id,
        config, format, version, n_skipped); data/<game>/labels.pt -- board-state properties of
        the held-out games that evaluate.py scores SAEs on (the first n_label_games val games).
Run:    python data.py --game othello            (60-move synthetic games, ~50k games/s)
        python data.py --game chess --source random|stockfish|PATH.pgn

Othello: a bitboard engine vectorised over a batch of games with numpy (one uint64 per side per
game), so one Python step advances every game by one move. Square s = 8 * rank + file (a1 = 0,
h8 = 63). Tokens: the 60 playable squares (ids 0..59) plus a pad token (id 60).
Chess: PGN text in the paper's format ';1.e4 e5 2.Nf3 ...' over its 32-character vocabulary, plus
a pad token (id 32) for games shorter than the context; python-chess is the rules engine.
"""
import contextlib
import ctypes
import dataclasses
import glob
import hashlib
import inspect
import logging
import math
import multiprocessing
import multiprocessing.util
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

try:
    import fcntl  # the out_dir lock; absent on Windows, where runs are not locked
except ImportError:
    fcntl = None

if __name__ == '__main__':  # Ctrl-C while torch loads (a second or two, nothing written yet):
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # stop at once, no traceback; run_cli takes over

import numpy as np
import torch
import chess
import chess.engine
import chess.pgn

FORMAT_VERSION = 1


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file...): printed as one line, exit code 2."""


class DataError(UserError):
    pass


# ----------------------------------------------------------------------------------------------
# Config handling shared by every script: one dataclass of defaults, overridable as --key=value.

def parse_config(cfg, argv, script, help=True):
    """Override dataclass `cfg` in place from ['--key=value' | '--key', 'value', ...].
    Values are converted to the type of the field's own default (not of the value a preset set:
    a preset's 12 minutes leaves --lm_minutes=0.5 a float); unknown keys are an error.
    --help (or -h) prints config_help with the values so set and exits (help=False: ignored)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ('--help', '-h'):
            i += 1
            continue
        if not arg.startswith('--'):
            raise UserError(f"{script}: unexpected argument {arg!r}; options look like --key=value")
        key, eq, val = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in fields:
            raise UserError(f"{script}: unknown option --{key}; known: " + ' '.join(f'--{k}' for k in fields))
        default = fields[key].default
        if not eq:  # --key value, or a bare --flag for booleans
            if isinstance(default, bool) and (i + 1 == len(argv) or argv[i + 1].startswith('--')):
                val = 'true'
            elif i + 1 < len(argv):
                i += 1
                val = argv[i]
            else:
                raise UserError(f"{script}: option --{key} needs a value")
        setattr(cfg, key, _convert(val, default, key, script))
        i += 1
    if help and ('--help' in argv or '-h' in argv):
        print(config_help(cfg, script))
        sys.exit(0)
    return cfg


def config_help(cfg, script):
    """--help: the script's docstring (what it reads and writes, how to run it), then each option of
    dataclass `cfg` as --name=value, its value in `cfg`, with the comment beside it in the source,
    and the source's section comments between them."""
    doc = (sys.modules[type(cfg).__module__].__doc__ or '').strip().split('\n\n')
    lines = ['\n\n'.join(doc[:2]), '', f'options of {script} with the values this command line gives them',
             '(--name=value or --name value; an unknown name is an error):']
    field = re.compile(r'    (\w+): [\w.]+ = .+?(?:\s+# ?(.*))?$')  # name: type = default  # comment
    names = {f.name for f in dataclasses.fields(cfg)}
    for line in inspect.getsource(type(cfg)).splitlines()[1:]:
        m = field.match(line)
        if m and m.group(1) in names:
            option = f'  --{m.group(1)}={getattr(cfg, m.group(1))}'
            lines.append(f'{option:30s} {m.group(2) or ""}'.rstrip())
        elif line.startswith('    #'):  # a section
            lines.append(f'  {line.strip()}')
        elif line.strip().startswith('#'):  # a comment's next line
            lines.append(' ' * 31 + line.strip()[1:].strip())
    return '\n'.join(lines)


def _convert(val, default, key, script):
    try:
        if isinstance(default, bool):
            if val.lower() in ('1', 'true', 'yes', 'on'):
                return True
            if val.lower() in ('0', 'false', 'no', 'off'):
                return False
            raise ValueError
        if isinstance(default, int):
            return int(float(val)) if 'e' in val.lower() else int(val)
        if isinstance(default, float):
            return float(val)
        return val
    except (ValueError, OverflowError):
        raise UserError(f"{script}: --{key}={val!r} is not a valid {type(default).__name__}") from None


# Allowed values of numeric options, for check_options: (test, what the error message offers).
# NaN fails every comparison, so no test below lets it through.
POSITIVE = (lambda v: v >= 1, 'an integer >= 1')
NON_NEGATIVE = (lambda v: v >= 0, 'an integer >= 0')
POSITIVE_REAL = (lambda v: 0 < v < math.inf, 'a finite number > 0')
NON_NEGATIVE_REAL = (lambda v: 0 <= v < math.inf, 'a finite number >= 0')
FRACTION = (lambda v: 0 <= v < 1, 'a number in [0, 1)')
SEED = (lambda v: 0 <= v < 2 ** 31, 'an integer in [0, 2^31)')  # numpy's seeds are >= 0; torch's < 2^64
# --data_dir and --out_dir: empty would put the game's folder in the current one, data and runs together
DIRECTORY = (lambda v: v.strip() != '', 'a directory (. for the current one)')


def check_options(cfg, script, rules):
    """Refuse the first option outside its allowed values, before any work: one line naming the
    flag, its value and what is allowed. rules: {field: (test(value) -> bool, 'allowed values')},
    checked in order, so a rule may rely on the fields before it."""
    for key, (ok, allowed) in rules.items():
        value = getattr(cfg, key)
        if not ok(value):
            raise UserError(f"{script}: --{key}={value} is not allowed: use {allowed}")


def check_output_dir(path, flag):
    """Refuse, before any work, a directory to write in that cannot be one: some part of `path`
    is a regular file, or the nearest existing directory above it is read-only."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--{flag}: {existing} is a file, not a directory: remove it or pick another --{flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--{flag}: cannot write in {existing}: pick another --{flag}")


def _stop(signum, frame):
    raise KeyboardInterrupt  # a kill (SIGTERM) unwinds like Ctrl-C: temp files go, locks are freed


def out_of_memory(e):
    """The out-of-memory error behind exception `e`, or None: torch.OutOfMemoryError, Python's
    MemoryError, the CPU allocator's "can't allocate memory", a CUDA "out of memory" error, also
    where another error wraps it (`raise ... from`, or torch.compile's errors, which keep the one
    they caught as inner_exception). Not an error raised while handling one (__context__): that is
    a bug of its own."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or any(
                m in str(e) for m in ("can't allocate memory", "CUDA error: out of memory")):
            return e
        e = e.__cause__ or getattr(e, 'inner_exception', None)
    return None


def lost_peer(e):
    """Whether `e` says that this process lost the others of its torchrun (one of them stopped):
    gloo's "Connection closed by peer", or torch.distributed's own errors (NCCL's, the store's)."""
    import torch.distributed as dist
    return (dist.is_available() and dist.is_initialized()
            and (isinstance(e, dist.DistError) or 'Connection closed by peer' in str(e)))


def run_cli(main):
    """Every script's entry point: progress lines appear at once (also in a log file), and a
    UserError is one line on stderr with exit code 2, never a traceback, and so is running out of
    memory (sizes too large for the machine); Ctrl-C or a kill is one line and exit code 130,
    after every temp file has been removed (atomic_write)."""
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts quiet it while torch loads
    signal.signal(signal.SIGTERM, _stop)
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; every file written so far is complete (none is half-written)", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, MemoryError) as e:  # torch's out of memory: a CPU's allocator, or a GPU's
        cause = out_of_memory(e)
        if cause is None and lost_peer(e):  # torchrun: another process stopped, its error is the news
            print(f"error: process {os.environ.get('RANK')} of this torchrun stopped: another one did (its "
                  "error is above)", file=sys.stderr)
            sys.exit(2)
        if cause is None:
            raise
        why = ' '.join(str(cause).split())[:200]
        print(f"error: out of memory ({why}): use smaller sizes (--batch_size, --sae_batch, --sae_buffer, "
              "--n_embd, ...) or another --device; every file written so far is complete", file=sys.stderr)
        sys.exit(2)


def atomic_write(writers):
    """Write files so that a crash, a full disk, Ctrl-C or a kill never leaves half a file or a
    temp file: writers maps each path to write(tmp_path), which writes that file's contents to
    tmp_path. All are written first, to temp names beside their paths (`<path>.tmp<pid>`, removed
    on any failure; no stage reads them), then renamed into place in the given order. With several
    files the last is deleted before the renames begin: a set whose last file marks it complete
    (data.py's labels.pt) shows as incomplete, never as a mix of old and new files.
    A failed write (disk full, permissions) is a UserError; the previous files are unchanged."""
    tmps = {path: f"{path}.tmp{os.getpid()}" for path in writers}
    for path in writers:  # before anything is written or removed
        if os.path.isdir(path):
            raise UserError(f"could not write {path}: a directory is there, not a file: remove it "
                            "(nothing was written)")
    try:
        try:
            for path, write in writers.items():
                os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
                write(tmps[path])
        except (OSError, RuntimeError) as e:
            # torch.save on a full disk: its zip writer raises a RuntimeError while the OSError
            # (ENOSPC) that caused it is handled; any other RuntimeError is not ours to explain
            cause = e if isinstance(e, OSError) else e.__context__
            if not isinstance(cause, OSError):
                raise
            raise UserError(f"could not write {path}: {cause.strerror or cause} "
                            "(the previous file, if any, is unchanged)") from None
        if len(writers) > 1 and os.path.exists(path):
            os.remove(path)  # `path` is the last file here
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def _torch_writer(obj):
    def write(tmp):
        with open(tmp, 'wb') as f:  # through a Python file, a full disk is an OSError (ENOSPC)
            torch.save(obj, f)
        # what is saved must load safely: fail now, not later. The unpickler checks every object;
        # mapped (mmap), the tensors' bytes are not read back, and stay off any GPU they came from
        torch.load(tmp, weights_only=True, map_location='cpu', mmap=True)
    return write


def atomic_save(obj, path):
    """torch.save `obj` to `path` through atomic_write: a crash never leaves half a file."""
    atomic_write({path: _torch_writer(obj)})


def tokens_digest(tokens):
    """Short sha256 of a token tensor's values: which games a run trained on, whatever file or
    options they came from (a resumed run checks it)."""
    return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:16]


def file_digest(path):
    """Short sha256 of a file: an SAE records the model file it read, so stale SAEs are caught."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_file(path, kind, hint, version=FORMAT_VERSION, keys=()):
    """torch.load a plain-data file (weights_only: no pickled code runs) and check its format tag.
    `kind` is the expected 'format' field, `version` the 'version' field, `keys` those it must hold;
    `hint` the command that (re)makes the file."""
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `{hint}`")
    if os.path.isdir(path):  # a path given by hand, one level short: not a file to delete
        raise UserError(f"{path} is a directory, not a {kind} file: name the file in it, or run `{hint}`")
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception:  # a truncated file, or another file given by hand (results.json): its path is the news
        raise UserError(f"{path} is corrupt or not a boardgame-saes file: if it is the file meant, delete it "
                        f"and run `{hint}`") from None
    if not isinstance(obj, dict) or obj.get('format') != kind:
        raise UserError(f"{path} is not a {kind} file: run `{hint}`")
    if obj.get('version') != version:
        raise UserError(f"{path} has format version {obj.get('version')}, this code reads {version}: run `{hint}`")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, which a {kind} file holds: run `{hint}`")
    return obj


_LOCKED = set()  # directories this process holds the lock of (train.py's out_dir and data_dir may be one)


@contextlib.contextmanager
def lock_dir(path, flag):
    """Hold an exclusive lock on directory `path` (made if missing) for the `with` block, so a
    second run writing there refuses at once instead of mixing its files with this one's. The lock
    is flock on path/.lock, which holds the owner's pid for the message: the OS releases it when
    the process ends, however it ends, so a dead run never blocks the next. Temp files found under
    `path` once the lock is held can only be left by a killed run: they are removed. On leaving,
    the lock file goes, and so do the directories made here if the run left them empty."""
    path = os.path.abspath(path)
    if fcntl is None or path in _LOCKED:
        yield
        return
    existing = path
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # a file where a directory should be, say, or no permission
        raise UserError(f"cannot make directory {path} ({e.strerror}): pick another --{flag}") from None
    lock = os.path.join(path, '.lock')
    while True:
        try:
            f = open(lock, 'a+')
        except OSError as e:  # a read-only directory, say
            raise UserError(f"cannot write {lock} ({e.strerror}): pick another --{flag}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or '?'
            f.close()
            raise UserError(f"{path} is in use by another run (pid {owner}): wait for it to end or pick "
                            f"another --{flag}") from None
        try:  # the file we locked may have been removed by its last owner meanwhile: then again
            if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        for tmp in glob.glob(os.path.join(glob.escape(path), '**', '*.tmp[0-9]*'), recursive=True):
            os.remove(tmp)
        _LOCKED.add(path)
        yield
    finally:
        _LOCKED.discard(path)
        os.remove(lock)  # while still locked, so no one can lock this file after us
        f.close()
        d = path
        while d != existing and not os.listdir(d):
            os.rmdir(d)
            d = os.path.dirname(d)


# ----------------------------------------------------------------------------------------------
# Othello: bitboards, vectorised over games

U64 = np.uint64
BIT = U64(1) << np.arange(64, dtype=U64)  # BIT[s] is the bitboard of square s
FULL = U64(0xFFFFFFFFFFFFFFFF)
NOT_FILE_A = U64(0xFEFEFEFEFEFEFEFE)  # after a shift towards file h, bits that wrapped land on file a
NOT_FILE_H = U64(0x7F7F7F7F7F7F7F7F)
# the 8 directions as (shift, mask to apply after shifting); +8 is one rank up, +1 one file right
DIRECTIONS = [(8, FULL), (-8, FULL), (1, NOT_FILE_A), (-1, NOT_FILE_H),
              (9, NOT_FILE_A), (7, NOT_FILE_H), (-7, NOT_FILE_A), (-9, NOT_FILE_H)]
OTHELLO_SQUARES = [s for s in range(64) if s not in (27, 28, 35, 36)]  # token id -> square
OTHELLO_ITOS = ['abcdefgh'[s % 8] + str(s // 8 + 1) for s in OTHELLO_SQUARES] + ['<pad>']
OTHELLO_PAD = 60
SQUARE_TO_TOKEN = np.full(64, -1, np.int64)
SQUARE_TO_TOKEN[OTHELLO_SQUARES] = np.arange(60)
START_BLACK = BIT[28] | BIT[35]  # e4, d5; Black moves first
START_WHITE = BIT[27] | BIT[36]  # d4, e5


def _shift(b, s, mask):
    return ((b << U64(s)) if s > 0 else (b >> U64(-s))) & mask


def othello_legal(own, opp):
    """Bitboard of legal moves for the side owning `own`: empty squares that close a line of
    opponent discs against an own disc, found by flooding 'opponent' runs from own discs."""
    empty = ~(own | opp)
    moves = np.zeros_like(own)
    for s, m in DIRECTIONS:
        run = _shift(own, s, m) & opp
        for _ in range(5):  # a run of opponent discs is at most 6 long
            run |= _shift(run, s, m) & opp
        moves |= _shift(run, s, m) & empty
    return moves


def othello_flips(own, opp, move):
    """Discs flipped when the side `own` plays bitboard `move` (0 = no move flips nothing)."""
    flipped = np.zeros_like(own)
    for s, m in DIRECTIONS:
        run = _shift(move, s, m) & opp
        for _ in range(5):
            run |= _shift(run, s, m) & opp
        # the run is flipped only if an own disc closes it
        flipped |= np.where(_shift(run, s, m) & own, run, U64(0))
    return flipped


def to_planes(b):
    """(N,) uint64 bitboards -> (N, 64) bool."""
    return (b[..., None] & BIT) != 0


def othello_games(n_games, seed, chunk=8192, workers=1, progress=print):
    """n random games (each move uniform among the legal ones), as token ids [n, 60] uint8,
    padded with OTHELLO_PAD after the game ends. A side with no move passes (no token).
    Made in chunks (the arrays stay in cache), chunk i seeded by (seed, i): reproducible, and the
    same for any number of `workers` (processes, for big sets)."""
    jobs = [(min(chunk, n_games - i), seed, i // chunk) for i in range(0, n_games, chunk)]
    # progress lines only for big sets (100 chunks: 800k games and more)
    parts = _map_with_progress(_othello_job, jobs, workers, progress, f'othello games, chunks of {chunk}',
                               min_parallel=2, min_report=100)
    return np.concatenate(parts or [np.zeros((0, 60), np.uint8)])


def _othello_job(args):
    n_games, seed, i = args
    return _othello_chunk(n_games, np.random.default_rng([seed, i]))


def _othello_chunk(n_games, rng):
    own = np.full(n_games, START_BLACK)  # the side to move
    opp = np.full(n_games, START_WHITE)
    tokens = np.full((n_games, 60), OTHELLO_PAD, np.uint8)
    alive = np.ones(n_games, bool)
    for t in range(60):
        legal = othello_legal(own, opp)
        stuck = alive & (legal == 0)
        if stuck.any():  # pass: the other side moves, if it can; else the game is over
            own, opp = np.where(stuck, opp, own), np.where(stuck, own, opp)
            legal = np.where(stuck, othello_legal(own, opp), legal)
            alive &= legal != 0
            if not alive.any():
                break
        # pick the r-th legal square, r uniform in [0, number of legal moves)
        legal_planes = to_planes(legal)  # (n, 64)
        r = (rng.random(n_games) * legal_planes.sum(1)).astype(np.int64)
        square = (np.cumsum(legal_planes, 1) > r[:, None]).argmax(1)
        move = np.where(alive, BIT[square], U64(0))
        flipped = othello_flips(own, opp, move)
        own, opp = opp & ~flipped, own | flipped | move  # the other side is to move next
        tokens[:, t] = np.where(alive, SQUARE_TO_TOKEN[square], OTHELLO_PAD)
    return tokens


def othello_bitboards(tokens):
    """Replay token sequences [N, T] and return the board after each position's move as uint64
    bitboards [N, T] (numpy), relative to the player to move next (passes handled):
      mine, theirs  - discs of the player to move next / of the other player
      legal         - that player's legal moves (empty after the game ends)
      flipped       - discs flipped by the move just played
    Positions at or after a pad token repeat the final board (the game is over: no legal moves).
    Raises DataError on an illegal move."""
    tokens = np.asarray(tokens, dtype=np.int64)
    N, T = tokens.shape
    out = {k: np.zeros((N, T), np.uint64) for k in ('mine', 'theirs', 'legal', 'flipped')}
    own = np.full(N, START_BLACK)
    opp = np.full(N, START_WHITE)
    done = np.zeros(N, bool)
    for t in range(T):
        tok = tokens[:, t]
        done |= tok == OTHELLO_PAD
        square = np.asarray(OTHELLO_SQUARES + [0])[np.clip(tok, 0, 60)]
        move = np.where(done, U64(0), BIT[square])
        legal = othello_legal(own, opp)
        stuck = ~done & (legal == 0)  # the side to move must pass before this move
        own, opp = np.where(stuck, opp, own), np.where(stuck, own, opp)
        legal = np.where(stuck, othello_legal(own, opp), legal)
        bad = ~done & ((legal & move) == 0)
        if bad.any():
            g = int(np.nonzero(bad)[0][0])
            raise DataError(f"illegal Othello move {OTHELLO_ITOS[tokens[g, t]]} at game {g}, position {t}")
        flipped = othello_flips(own, opp, move)
        own, opp = np.where(done, own, opp & ~flipped), np.where(done, opp, own | flipped | move)
        # who moves next? `own` now, unless it has no move and the other side does
        nxt_legal = othello_legal(own, opp)
        other_legal = othello_legal(opp, own)
        pass_next = (nxt_legal == 0) & (other_legal != 0)
        out['mine'][:, t] = np.where(pass_next, opp, own)
        out['theirs'][:, t] = np.where(pass_next, own, opp)
        out['legal'][:, t] = np.where(pass_next, other_legal, nxt_legal)  # empty once neither side can move
        out['flipped'][:, t] = flipped
    return out


def othello_states(tokens):
    """othello_bitboards as bool tensors [N, T, 64] (square s = 8 * rank + file)."""
    return {k: torch.from_numpy(to_planes(v)) for k, v in othello_bitboards(tokens).items()}


def othello_legal_bitboards(tokens, chunk=8192, workers=1, progress=print):
    """Legal-move bitboards after each position, tokens [N, T] -> int64 tensor [N, T] (the bits of
    the uint64 boards), replayed in chunks to bound memory (in `workers` processes for big sets).
    Kept for a whole training set, this is 8 bytes a position; othello_soft_targets expands a
    batch of it."""
    tokens = np.asarray(tokens)
    jobs = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk)]
    parts = _map_with_progress(_legal_job, jobs, workers, progress, f'legal moves, chunks of {chunk} games',
                               min_parallel=2, min_report=100)
    return torch.from_numpy(np.concatenate(parts or [np.zeros((0, tokens.shape[1]), np.uint64)]).view(np.int64))


def _legal_job(tokens):
    return othello_bitboards(tokens)['legal']


_TOKEN_BITS = {}  # device -> (60,) int64: each move token's square bit, copied to a device once


def othello_soft_targets(legal):
    """The exact next-token distribution of the random-game source: uniform over the legal moves.
    legal [B, T] int64 bitboards -> float [B, T, 61] (the pad token gets 0); a position with no
    legal move (the game is over) gets an all-zero row, which the loss ignores."""
    bits = _TOKEN_BITS.get(legal.device)  # kept: a copy to a GPU at every training step would wait for it
    if bits is None:
        bits = _TOKEN_BITS[legal.device] = torch.from_numpy(BIT.view(np.int64))[OTHELLO_SQUARES].to(legal.device)
    soft = ((legal[..., None] & bits) != 0).float()  # (B, T, 60)
    soft = soft / soft.sum(-1, keepdim=True).clamp(min=1)
    return torch.nn.functional.pad(soft, (0, 1))


# ----------------------------------------------------------------------------------------------
# Chess  (CHESS_SECTION: transcripts, PGN import, board-state properties)

CHESS_CHARS = ' #+-.0123456789;=BKNOQRabcdefghx'  # the paper's 32-character vocabulary
CHESS_PAD_ID = len(CHESS_CHARS)                     # 32: one extra token beyond the characters
CHESS_ITOS = list(CHESS_CHARS) + ['<pad>']


# -----------------------------------------------------------------------------
# transcripts

def moves_to_transcript(sans):
    """SAN moves from the start position -> ';1.e4 e5 2.Nf3 Nc6 3.Bb5'."""
    parts = [';']
    for i, san in enumerate(sans):
        if i % 2 == 0:
            parts.append(f'{" " if i else ""}{i // 2 + 1}.{san}')
        else:
            parts.append(f' {san}')
    return ''.join(parts)

def _scan_transcript(transcript):
    """
    Walk a transcript and yield its events in order:
      ('dot', i, None, None)       a move number's '.' at character i (White to move there)
      ('move', i, san, complete)   a SAN move starting at character i; complete is False when the
                                   move is the last thing in the string (it may have been cut)
    Robust to a transcript cut anywhere: a trailing '12' (number without its dot) is ignored.
    """
    n = len(transcript)
    for m in re.finditer(r'[^ ]+', transcript):
        start, tok = m.start(), m.group()
        if tok.startswith(';'):
            start, tok = start + 1, tok[1:]
        complete = m.end() < n  # followed by a space, so nothing of it was cut off
        if '.' in tok:
            num, _, san = tok.partition('.')
            dot = start + len(num)
            yield ('dot', dot, None, None)
            if san:
                yield ('move', dot + 1, san, complete)
        elif tok and not tok.isdigit():
            yield ('move', start, tok, complete)

def transcript_to_moves(transcript, last_is_complete=False, as_moves=False):
    """
    Parse a transcript back into SAN moves (chess.Move objects if as_moves), checking each is
    legal (raises DataError if not). A cut can leave a different legal move ('O-O' from
    'O-O-O', 'Nf3' from 'Nf3+'), so the last move is dropped unless the caller knows the
    transcript was not cut (last_is_complete=True).
    """
    board, sans = chess.Board(), []
    for kind, i, san, complete in _scan_transcript(transcript):
        if kind != 'move' or not (complete or last_is_complete):
            continue
        try:
            move = board.parse_san(san)
        except ValueError as e:
            raise DataError(f'illegal or unparseable move {san!r} at character {i} of transcript') from e
        sans.append(move if as_moves else san)
        board.push(move)
    return sans

def _game_over(board, moves):
    # the automatic game ends (no claims needed): mate, stalemate, dead position, 75 moves, fivefold
    return (not moves or board.is_insufficient_material() or board.halfmove_clock >= 150
            or board.is_fivefold_repetition())

def _play(board, pick_move, max_chars):
    """
    Play from the start position, choosing moves with pick_move(board, legal_moves), until the
    game is over or the transcript reaches max_chars. Returns the transcript cut to max_chars.
    The length is tracked as we go so we never build more text than needed.
    """
    parts, length, ply = [';'], 1, 0
    while length < max_chars:
        moves = list(board.legal_moves)
        if _game_over(board, moves):
            break
        move = pick_move(board, moves)
        san = board.san(move)
        part = (f'{" " if ply else ""}{ply // 2 + 1}.{san}' if ply % 2 == 0 else f' {san}')
        parts.append(part)
        length += len(part)
        board.push(move)
        ply += 1
    return ''.join(parts)[:max_chars]

def random_game(seed, max_chars):
    """
    One game of uniformly random legal moves, as a transcript of at most max_chars characters.
    We stop once the text is long enough and cut it here to exactly max_chars (mid-move is fine);
    a game that ends earlier gives a shorter transcript. Same seed -> same game.
    """
    rng = random.Random(seed)
    return _play(chess.Board(), lambda board, moves: rng.choice(moves), max_chars)

def san_bodies(board, moves):
    """The SAN of each legal move in `moves` without its check suffix, as python-chess writes it:
    castling 'O-O' / 'O-O-O'; a pawn: its file and 'x' if it captures, the square, '=' and the
    promotion piece; a piece: its letter, the from-file (or rank, or both) when another piece of
    its kind can go to the same square, 'x' if it captures, the square. One pass over the moves:
    python-chess's own san() regenerates the legal moves for each move to disambiguate."""
    kinds = [board.piece_type_at(m.from_square) for m in moves]
    sources = {}  # (piece type, to square) -> from squares of the legal moves there
    for m, kind in zip(moves, kinds):
        sources.setdefault((kind, m.to_square), []).append(m.from_square)
    bodies = []
    for m, kind in zip(moves, kinds):
        frm, to = m.from_square, m.to_square
        if board.is_castling(m):
            bodies.append('O-O-O' if chess.square_file(to) < chess.square_file(frm) else 'O-O')
            continue
        capture = 'x' if board.is_capture(m) else ''
        if kind == chess.PAWN:
            promotion = '=' + chess.piece_symbol(m.promotion).upper() if m.promotion else ''
            bodies.append((chess.FILE_NAMES[chess.square_file(frm)] + capture if capture else '')
                          + chess.SQUARE_NAMES[to] + promotion)
            continue
        others = [s for s in sources[kind, to] if s != frm]
        same_file = any(chess.square_file(s) == chess.square_file(frm) for s in others)
        same_rank = any(chess.square_rank(s) == chess.square_rank(frm) for s in others)
        where = ((chess.FILE_NAMES[chess.square_file(frm)] if same_rank or not same_file else '')
                 + (chess.RANK_NAMES[chess.square_rank(frm)] if same_file else '')) if others else ''
        bodies.append(chess.piece_symbol(kind).upper() + where + capture + chess.SQUARE_NAMES[to])
    return bodies


def chess_next_char_counts(transcript):
    """
    The exact next-character distributions of a random game, as counts: uint8 array
    (len(transcript), len(CHESS_ITOS)) whose row i, divided by its sum, is the distribution of
    character i + 1 given characters 0..i, the end of the game on the pad id. In a random game
    every move is uniform over the legal moves and the text is a fixed function of the moves, so:
      - the move numbers, their '.', and the space before a move are determined: a count of 1;
      - inside a move, having typed p, every legal move whose SAN starts with p counts once: a
        longer SAN for its next character, a SAN equal to p for the move's end: the space, or the
        pad id where the game is over after it (mate, stalemate, the automatic draws). 'O-O'
        against 'O-O-O' is the one case where both happen at one prefix.
    The last row of a transcript cut at max_chars is the distribution of the character cut off.
    Counts fit a byte: a chess position has at most 218 legal moves.
    Cost: the SAN of a move is its body (san_bodies) and a check suffix ('+' or '#') found by
    playing the move. Only a move whose body is a prefix of the text typed can need its suffix,
    so only those (the move played, and 'O-O' under 'O-O-O') are played; the rest are counted
    from their bodies: about 4x faster than python-chess's san() for every legal move.
    DataError if the text is not a legal game.
    """
    n = len(transcript)
    counts = np.zeros((n, len(CHESS_ITOS)), np.uint8)
    if n == 0 or transcript[0] != ';':
        raise DataError(f"a chess transcript starts with ';': got {transcript[:10]!r}")
    stoi = {c: k for k, c in enumerate(CHESS_CHARS)}
    space = stoi[' ']
    board, i, ply = chess.Board(), 0, 0  # i: the character whose row comes next
    moves = list(board.legal_moves)

    def cannot_follow():
        return DataError(f"character {i + 1} ({transcript[i + 1]!r}) of {transcript!r} cannot follow "
                         f"{transcript[:i + 1]!r} in a legal game")

    while i < n:
        if _game_over(board, moves):
            raise DataError(f"{transcript!r} goes on after the game is over, at character {i + 1}")
        for c in (f'{ply // 2 + 1}.' if ply % 2 == 0 else ''):  # the move number: determined
            counts[i, stoi[c]] = 1
            if i + 1 < n and transcript[i + 1] != c:
                raise cannot_follow()
            i += 1
            if i >= n:
                return counts
        end = transcript.find(' ', i + 1)
        typed = transcript[i + 1:end if end >= 0 else n]  # this move's text (cut if the string is)
        # every legal move's SAN as (text, whether the game is over after it, the move, the legal
        # moves after it). Only a move whose body is a prefix of the text typed can end inside it,
        # so only those are played to find their check suffix and whether the game ends.
        alive = []
        for move, body in zip(moves, san_bodies(board, moves)):
            if not typed.startswith(body):
                alive.append((body, False))
                continue
            board.push(move)
            after = list(board.legal_moves)
            suffix = ('#' if not after else '+') if board.is_check() else ''
            alive.append((body + suffix, _game_over(board, after), move, after))
            board.pop()
        for j in range(len(typed) + 1):  # row i + j: the text typed so far is typed[:j]
            p = typed[:j]
            alive = [a for a in alive if a[0].startswith(p)]
            for a in alive:
                counts[i + j, stoi[a[0][j]] if len(a[0]) > j else CHESS_PAD_ID if a[1] else space] += 1
            nxt = transcript[i + j + 1] if i + j + 1 < n else None
            if nxt is not None and counts[i + j, stoi.get(nxt, CHESS_PAD_ID)] == 0:
                i += j
                raise cannot_follow()
            if i + j + 1 >= n:
                return counts
            if nxt == ' ':
                break
        _, _, move, moves = next(a for a in alive if a[0] == typed)  # the space: the move is complete
        board.push(move)
        i += len(typed) + 1
        ply += 1
    return counts


def chess_next_char_distributions(transcript):
    """chess_next_char_counts as a float tensor of distributions (each row divided by its sum)."""
    counts = torch.from_numpy(chess_next_char_counts(transcript)).float()
    return counts / counts.sum(1, keepdim=True)


def chess_soft_target_counts(tokens, workers=1, progress=print, chunk=128):
    """chess_next_char_counts of every game of `tokens` (N, T), token ids of random games: uint8
    tensor (N, T, vocab) whose row t counts the character after position t (all zero past the
    end of the game). Games in chunks over `workers` processes; the same for any count."""
    jobs = [tokens[i:i + chunk].numpy() for i in range(0, len(tokens), chunk)]
    parts = _map_with_progress(_soft_counts_job, jobs, workers, progress,
                               f'chess soft targets, chunks of {chunk} games', min_parallel=2, min_report=20)
    return torch.from_numpy(np.concatenate(parts or [np.zeros((0, tokens.shape[1], len(CHESS_ITOS)), np.uint8)]))


def _soft_counts_job(tokens):
    out = np.zeros((*tokens.shape, len(CHESS_ITOS)), np.uint8)
    for g, row in enumerate(tokens):
        text = decode_chess(row)
        out[g, :len(text)] = chess_next_char_counts(text)
    return out


def load_chess_soft_targets(data_dir='data', workers=1, log=print):
    """The soft-target counts (chess_soft_target_counts) of data/chess/train.pt, kept beside it in
    soft_targets.pt (made once, about 12 ms of CPU a game; remade when train.pt changes)."""
    game_dir = os.path.join(data_dir, 'chess')
    path, train_path = os.path.join(game_dir, 'soft_targets.pt'), data_paths('chess', data_dir)['train']
    digest = file_digest(train_path)
    if os.path.exists(path):  # a cache: a stale or unreadable one is remade, not an error
        try:
            obj = load_file(path, 'boardgame-saes/soft-targets', '')
        except UserError:
            obj = {}
        if obj.get('train_sha256') == digest:
            log(f"soft targets: {path} (made from this {train_path})")
            return obj['counts']
        log(f"soft targets: {path} is stale or unreadable: remaking it")
    train = load_data('chess', 'train', data_dir)
    if train['config'].get('source') != 'random':
        raise UserError(f"--soft_targets needs random games: {train_path} holds games from "
                        f"{train['config'].get('source')!r} (drop --soft_targets, or remake the data with --source random)")
    t0 = time.time()
    counts = chess_soft_target_counts(train['tokens'], workers, log)
    with lock_dir(game_dir, 'data_dir'):
        atomic_save({'format': 'boardgame-saes/soft-targets', 'version': FORMAT_VERSION, 'game': 'chess',
                     'train_sha256': digest, 'counts': counts}, path)
    log(f"soft targets: next-character distributions of {len(counts)} train games in {time.time() - t0:.1f}s, "
        f"kept in {path} ({counts.numel() / 2 ** 20:.0f} MB)")
    return counts


# -----------------------------------------------------------------------------
# stockfish games

STOCKFISH_MISSING = "stockfish not found: install it with `apt-get install -y stockfish` (or pass --source random)"
_ENGINES = {}  # (pid, path) -> SimpleEngine: one engine per process, reused across games

def find_stockfish(engine_path='stockfish'):
    """Resolve the engine binary: a path, a name on PATH, or Debian's /usr/games. Else DataError."""
    candidates = [engine_path]
    if os.path.basename(engine_path) == engine_path:  # a bare name: also look where Debian puts it
        candidates += [os.path.join(d, engine_path) for d in ('/usr/games', '/usr/local/games')]
    for c in candidates:
        found = shutil.which(c)
        if found:
            return found
    raise DataError(STOCKFISH_MISSING)

def _engine(engine_path):
    # keyed by pid: an engine (and its reader thread) does not survive a fork, so a pool worker
    # must open its own; it is then reused for every game the worker plays.
    key = (os.getpid(), engine_path)
    if key not in _ENGINES:
        path = find_stockfish(engine_path)
        engine = chess.engine.SimpleEngine.popen_uci(path)
        engine.configure({'Threads': 1, 'Hash': 16})  # one thread: node-limited search is deterministic
        _ENGINES[key] = engine
        # quit it when the process exits: the engine's thread would otherwise keep a pool worker
        # alive at pool.join() (multiprocessing runs these finalizers in workers and at exit)
        multiprocessing.util.Finalize(engine, _quit_engine, args=(engine,), exitpriority=10)
    return _ENGINES[key]

def _quit_engine(engine):
    try:
        engine.quit()
    except chess.engine.EngineError:
        pass  # already quit (close_engines, then the exit finalizer)

def close_engines():
    """Quit the engines this process opened."""
    for key in [k for k in _ENGINES if k[0] == os.getpid()]:
        _quit_engine(_ENGINES.pop(key))

def stockfish_game(seed, max_chars, engine_path='stockfish'):
    """
    One Stockfish-vs-Stockfish game as a transcript of at most max_chars characters (cut here,
    like random_game). Games differ through the seed:
      - the opening: the first 2-8 plies are uniformly random legal moves;
      - the strength: each side searches a node budget drawn log-uniformly in [1k, 50k];
      - mistakes: each move is replaced by a random legal move with probability eps ~ U(0, 0.1).
    We vary strength with node limits and our own seeded mistakes rather than 'Skill Level',
    because Stockfish seeds its skill randomness from the clock; with Threads=1, a fresh hash per
    game ('ucinewgame') and node limits, the same seed gives the same game.
    The engine stays open for the next game in this process: call close_engines() when done, as
    python-chess's engine thread would otherwise keep the interpreter from exiting (chess_games
    does this for you; pool workers close theirs when they exit).
    """
    rng = random.Random(seed)
    engine = _engine(engine_path)
    n_random = rng.randint(2, 8)
    nodes = {color: int(round(10 ** rng.uniform(3, np.log10(50_000)))) for color in (chess.WHITE, chess.BLACK)}
    eps = rng.uniform(0.0, 0.1)
    game_id = object()  # a new game object makes python-chess send ucinewgame (a fresh hash)

    def pick(board, moves):
        # draw from rng on every move, whatever happens, so the random stream stays aligned
        u, random_move = rng.random(), rng.choice(moves)
        if board.ply() < n_random or u < eps:
            return random_move
        result = engine.play(board, chess.engine.Limit(nodes=nodes[board.turn]), game=game_id)
        return result.move if result.move in moves else random_move

    return _play(chess.Board(), pick, max_chars)

# -----------------------------------------------------------------------------
# PGN files

def _pgn_game_to_transcript(game):
    """A parsed PGN game -> transcript, or None when the game must be skipped."""
    if game.errors:  # python-chess records bad/illegal moves here instead of raising
        return None
    headers = game.headers
    if headers.get('Variant', 'Standard').lower() not in ('standard', 'chess', 'from position'):
        return None
    board = game.board()
    if type(board) is not chess.Board or board.chess960 or board.fen() != chess.STARTING_FEN:
        return None  # variants and games set up from a FEN
    sans = []
    for move in game.mainline_moves():
        if not board.is_legal(move):
            return None
        sans.append(board.san(move))
        board.push(move)
    if not sans:
        return None
    return moves_to_transcript(sans)

def pgn_games(path, n_games, max_chars, progress=print):
    """
    Stream up to n_games standard games from a .pgn file (one game in memory at a time) and return
    (transcripts cut to max_chars, number of games skipped). Skipped: games with an unparseable or
    illegal move, with no moves, variants, games starting from a FEN, and text python-chess's
    parser fails on. A binary file (NUL bytes) is refused.
    """
    if not os.path.isfile(path):
        raise DataError(f'PGN file not found: {path}')
    with open(path, 'rb') as f:
        if b'\0' in f.read(1 << 16):
            raise DataError(f'{path} is not a PGN file (it holds binary bytes): pass a text .pgn file')
    out, skipped = [], 0
    logging.getLogger('chess.pgn').setLevel(logging.CRITICAL)  # bad games are counted in `skipped`, not logged
    with open(path, encoding='utf-8-sig', errors='replace') as f:
        while len(out) < n_games:
            try:
                game = chess.pgn.read_game(f)  # reads at least one line, so the loop ends
            except Exception:  # python-chess raises on some malformed text (IndexError, ...)
                skipped += 1
                continue
            if game is None:
                break
            transcript = _pgn_game_to_transcript(game)
            if transcript is None:
                skipped += 1
            else:
                out.append(transcript[:max_chars])
    if not out:
        raise DataError(f'no valid games in PGN file {path} ({skipped} skipped)')
    progress(f'pgn: {len(out)} games from {path}, {skipped} skipped')
    return out, skipped

# -----------------------------------------------------------------------------
# many games, in parallel

def chess_game_seed(seed, i):
    """Seed of game i: depends only on (seed, i), so results do not depend on the worker count."""
    return int.from_bytes(hashlib.sha256(f'chess:{seed}:{i}'.encode()).digest()[:8], 'little')

def _random_job(args):
    seed, max_chars = args
    return random_game(seed, max_chars)

def _stockfish_job(args):
    seed, max_chars, engine_path = args
    return stockfish_game(seed, max_chars, engine_path)

def _map_with_progress(fn, jobs, workers, progress, what, min_parallel=64, min_report=0):
    """[fn(j) for j in jobs], in a Pool of `workers` processes for big inputs, in order, printing
    a progress line every ~10% with the rate (none for fewer than `min_report` jobs)."""
    n, out, t0 = len(jobs), [], time.time()
    if n < min_report:
        progress = lambda _: None
    step, next_report = max(1, n // 10), max(1, n // 10)

    def report(done):
        rate = done / max(time.time() - t0, 1e-9)
        progress(f'{what}: {done}/{n} ({rate:.1f}/s, ETA {(n - done) / rate:.0f}s)')

    if workers <= 1 or n < min_parallel:
        results = map(fn, jobs)
        pool = None
    else:
        pool = make_pool(workers)
        results = pool.imap(fn, jobs, chunksize=max(1, min(64, n // (workers * 20))))
    finished = False
    try:
        for r in results:
            out.append(r)
            if len(out) >= next_report:
                report(len(out))
                next_report += step
        finished = True
    finally:
        if pool is not None:
            if finished:
                pool.close()  # let workers exit normally, running their finalizers (engine quit)
            else:
                pool.terminate()  # Ctrl-C or an error: stop now, not after the queued jobs
            pool.join()
    return out


def make_pool(workers):
    """A process pool whose workers leave Ctrl-C to the main process (which then ends them), so
    an interrupted run prints one line, not a traceback per worker."""
    return multiprocessing.Pool(workers, initializer=_worker_signals)


def _worker_signals():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # run_cli's handler is inherited; terminate() sends SIGTERM
    if sys.platform.startswith('linux'):  # a kill -9 of the main process sends its workers that SIGTERM
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # (PR_SET_PDEATHSIG), not a BrokenPipe traceback each

def chess_games(n_games, source, seed, max_chars, workers=2, progress=print, engine_path='stockfish'):
    """
    n_games transcripts (each at most max_chars characters) and the number of games skipped.
    source: 'random' (uniform legal moves), 'stockfish', or a path to a .pgn file (seed unused).
    Game i uses chess_game_seed(seed, i), so the same seed gives the same games for any `workers`.
    """
    if source == 'random':
        jobs = [(chess_game_seed(seed, i), max_chars) for i in range(n_games)]
        return _map_with_progress(_random_job, jobs, workers, progress, 'random games'), 0
    if source == 'stockfish':
        find_stockfish(engine_path)  # fail here with a clear message, not inside a worker
        jobs = [(chess_game_seed(seed, i), max_chars, engine_path) for i in range(n_games)]
        try:
            return _map_with_progress(_stockfish_job, jobs, workers, progress, 'stockfish games'), 0
        finally:
            close_engines()  # engines opened here, in the main process (small n or workers=1)
    if source.endswith('.pgn') or os.path.exists(source):
        return pgn_games(source, n_games, max_chars, progress=progress)
    raise DataError(f"unknown chess source {source!r}: use 'random', 'stockfish' or a .pgn file")

# -----------------------------------------------------------------------------
# board state properties at the '.' characters

# 12 piece classes: white P N B R Q K, then black p n b r q k
CHESS_PIECE_SYMBOLS = 'PNBRQKpnbrqk'
CHESS_PIECE_NAMES = [f'{s}@{chess.square_name(sq)}' for sq in range(64) for s in CHESS_PIECE_SYMBOLS]

def _piece_class(piece):
    return (0 if piece.color == chess.WHITE else 6) + piece.piece_type - 1

# (square, class) pairs of the initial position: a piece on its own starting square counts as
# blank, so features that only say "nothing has moved yet" do not score.
_START_SQUARE_CLASSES = {(sq, _piece_class(p)) for sq, p in chess.Board().piece_map().items()}

CHESS_STRATEGY_SIZES = {
    'attacked_by_black': 64, 'white_legal_dest': 64, 'in_check': 1, 'can_give_check': 1,
    'has_queen': 1, 'can_capture_queen': 1, 'bishop_pair': 1, 'castling_any': 1,
    'castling_kingside': 1, 'castling_queenside': 1, 'fork': 1, 'pin': 1, 'en_passant': 1,
    'ambiguous_move': 1,
}
CHESS_STRATEGY_NAMES = {k: ([f'{k}@{chess.square_name(sq)}' for sq in range(64)] if g == 64 else [k])
                        for k, g in CHESS_STRATEGY_SIZES.items()}

# piece values for the fork rule; the king as an attacker is worth more than anything
_FORK_VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 100}

def _mask_to_bits(mask):
    """A python-chess 64-bit square set -> bool array [64] indexed by square (a1=0 .. h8=63)."""
    return np.unpackbits(np.frombuffer(mask.to_bytes(8, 'little'), dtype=np.uint8), bitorder='little').astype(bool)

def chess_piece_state(board):
    """bool [64*12], square-major: entry sq*12+c is True when class c stands on sq, except on its
    own starting square (there the square counts as blank, all zeros)."""
    out = np.zeros(64 * 12, dtype=bool)
    for sq, piece in board.piece_map().items():
        c = _piece_class(piece)
        if (sq, c) not in _START_SQUARE_CLASSES:
            out[sq * 12 + c] = True
    return out

def _has_fork(board, black_attacks):
    """
    fork: some White piece attacks two or more Black pieces (the king excluded: with White to
    move it cannot be attacked) that are each worth more than the attacker (P1 N3 B3 R5 Q9) or
    undefended (no Black piece attacks their square). Pins on the attacker are ignored.
    """
    black = board.occupied_co[chess.BLACK] & ~board.kings
    for sq in chess.SquareSet(board.occupied_co[chess.WHITE]):
        value = _FORK_VALUE[board.piece_type_at(sq)]
        hits = 0
        for target in chess.SquareSet(board.attacks_mask(sq) & black):
            if _FORK_VALUE[board.piece_type_at(target)] > value or not (black_attacks >> target) & 1:
                hits += 1
                if hits >= 2:
                    return True
    return False

def chess_strategy_state(board):
    """The 14 strategy properties of a White-to-move position: dict name -> bool array [G_k]."""
    assert board.turn == chess.WHITE
    white, black = board.occupied_co[chess.WHITE], board.occupied_co[chess.BLACK]
    moves = list(board.legal_moves)
    # squares attacked by Black: union of every Black piece's attack set (the same squares that
    # board.is_attacked_by(BLACK, sq) reports, defended own pieces included)
    black_attacks = 0
    for sq in chess.SquareSet(black):
        black_attacks |= board.attacks_mask(sq)
    dest = 0
    for m in moves:
        dest |= chess.BB_SQUARES[m.to_square]
    black_queens = board.queens & black
    white_bishops = board.bishops & white
    # ambiguous: two White pieces of one type (pawns excluded: pawn SAN names the file anyway)
    # can legally move to one square, i.e. a move whose SAN needs a disambiguating file or rank
    seen, ambiguous = {}, False
    for m in moves:
        pt = board.piece_type_at(m.from_square)
        if pt == chess.PAWN:
            continue
        key = (pt, m.to_square)
        if key in seen and seen[key] != m.from_square:
            ambiguous = True
            break
        seen[key] = m.from_square
    bits = {
        'in_check': board.is_check(),
        'can_give_check': any(board.gives_check(m) for m in moves),
        'has_queen': bool(board.queens & white),
        'can_capture_queen': any(black_queens >> m.to_square & 1 for m in moves),
        # the bishop pair: White has bishops on both square colours
        'bishop_pair': bool(white_bishops & chess.BB_LIGHT_SQUARES) and bool(white_bishops & chess.BB_DARK_SQUARES),
        'castling_any': board.has_castling_rights(chess.WHITE),
        'castling_kingside': board.has_kingside_castling_rights(chess.WHITE),
        'castling_queenside': board.has_queenside_castling_rights(chess.WHITE),
        'fork': _has_fork(board, black_attacks),
        # pin: some White piece is absolutely pinned to the White king
        'pin': any(board.is_pinned(chess.WHITE, sq) for sq in chess.SquareSet(white & ~board.kings)),
        'en_passant': board.has_legal_en_passant(),
        'ambiguous_move': ambiguous,
    }
    out = {'attacked_by_black': _mask_to_bits(black_attacks), 'white_legal_dest': _mask_to_bits(dest)}
    for k, v in bits.items():
        out[k] = np.array([bool(v)])
    return {k: out[k] for k in CHESS_STRATEGY_SIZES}

def _labels_job(args):
    """Labels for a chunk of games; game indices are relative to the chunk."""
    transcripts, max_chars, max_positions = args
    games, poss, pieces = [], [], []
    strategy = {k: [] for k in CHESS_STRATEGY_SIZES}
    for g, transcript in enumerate(transcripts):
        board, count = chess.Board(), 0
        for kind, i, san, complete in _scan_transcript(transcript[:max_chars]):
            if count >= max_positions:
                break
            if kind == 'dot':
                if board.turn != chess.WHITE:
                    raise DataError(f'game {g}: move number at character {i} but Black is to move')
                games.append(g)
                poss.append(i)
                pieces.append(chess_piece_state(board))
                for k, v in chess_strategy_state(board).items():
                    strategy[k].append(v)
                count += 1
            elif complete:  # an incomplete last move has no '.' after it: it never matters
                try:
                    board.push_san(san)
                except ValueError as e:
                    raise DataError(f'game {g}: illegal or unparseable move {san!r} at character {i}') from e
    P = len(games)
    return {
        'game': np.array(games, dtype=np.int64),
        'pos': np.array(poss, dtype=np.int64),
        'piece': np.array(pieces, dtype=bool).reshape(P, 64 * 12),
        'strategy': {k: np.array(v, dtype=bool).reshape(P, CHESS_STRATEGY_SIZES[k]) for k, v in strategy.items()},
    }

def chess_labels(transcripts, max_chars=256, max_positions=20, workers=1):
    """
    Board state properties at the first max_positions '.' characters (index < max_chars) of
    each game. The board there is the position after all moves before the '.' (White to move).
    Returns numpy arrays, P = number of positions in all games:
      game [P] int64, pos [P] int64 (character index of the '.'),
      piece [P, 768] bool (square-major x 12 classes 'PNBRQKpnbrqk', start-square pieces blank),
      piece_names [768], strategy {name: bool [P, G_k]}, strategy_names {name: [G_k] names}.
    workers > 1 labels chunks of games in a process pool (worth it for big inputs).
    """
    transcripts = list(transcripts)
    n_chunks = 1 if workers <= 1 or len(transcripts) < 200 else workers * 4
    bounds = np.linspace(0, len(transcripts), n_chunks + 1).astype(int)
    jobs = [(transcripts[a:b], max_chars, max_positions) for a, b in zip(bounds[:-1], bounds[1:])]
    if n_chunks == 1:
        parts = [_labels_job(jobs[0])]
    else:
        with make_pool(workers) as pool:
            parts = pool.map(_labels_job, jobs)
    for part, a in zip(parts, bounds[:-1]):
        part['game'] += a  # chunk-relative -> global game index
    return {
        'game': np.concatenate([p['game'] for p in parts]),
        'pos': np.concatenate([p['pos'] for p in parts]),
        'piece': np.concatenate([p['piece'] for p in parts]),
        'piece_names': list(CHESS_PIECE_NAMES),
        'strategy': {k: np.concatenate([p['strategy'][k] for p in parts]) for k in CHESS_STRATEGY_SIZES},
        'strategy_names': {k: list(v) for k, v in CHESS_STRATEGY_NAMES.items()},
    }

# -----------------------------------------------------------------------------
# tokenizer

_CHESS_STOI = np.full(256, -1, dtype=np.int64)  # byte -> token id, -1 outside the vocabulary
_CHESS_STOI[np.frombuffer(CHESS_CHARS.encode(), dtype=np.uint8)] = np.arange(len(CHESS_CHARS))

def encode_chess(transcripts, T, pad_id=CHESS_PAD_ID):
    """Transcripts -> LongTensor [N, T] of indices into CHESS_CHARS, cut to T and padded with pad_id."""
    out = np.full((len(transcripts), T), pad_id, dtype=np.int64)
    for n, t in enumerate(transcripts):
        ids = _CHESS_STOI[np.frombuffer(t[:T].encode('latin-1', errors='replace'), dtype=np.uint8)]
        if (ids < 0).any():
            bad = sorted({c for c in t[:T] if c not in CHESS_CHARS})
            raise DataError(f'transcript {n} has characters outside the chess vocabulary: {bad}')
        out[n, :len(ids)] = ids
    return torch.from_numpy(out)

def decode_chess(ids):
    """Token ids (list, array or 1-D tensor) -> string; pad tokens are dropped."""
    ids = ids.tolist() if hasattr(ids, 'tolist') else list(ids)
    return ''.join(CHESS_CHARS[i] for i in ids if i != CHESS_PAD_ID)

# -----------------------------------------------------------------------------
# legal-move checks for generated text

def move_boundaries(transcript):
    """Character indices where a move's SAN begins: just after each '.' (White's moves) and just
    after the space that follows a White move (Black's moves). Only indices inside the string."""
    return [i for kind, i, _, _ in _scan_transcript(transcript) if kind == 'move']

def is_legal_continuation(prefix, generated, strict=False):
    """
    prefix: a transcript ending at a move boundary (just after 'N.' or after the space that
    follows a White move); generated: text the model wrote after it. True when the move text
    (generated up to the first space) is a legal SAN move in the position after the prefix's
    moves (legal_move_text). Before a White move the text must start with its move number.
    Raises DataError if the prefix itself does not replay legally.
    """
    board = chess.Board()
    for san in transcript_to_moves(prefix, last_is_complete=prefix.endswith(' ')):
        board.push_san(san)
    text = generated.split(' ', 1)[0]
    if board.turn == chess.WHITE and not prefix.endswith('.'):
        # the model must first write the move number, e.g. '2.'
        number = f'{board.fullmove_number}.'
        if not text.startswith(number):
            return False
        text = text[len(number):]
    return legal_move_text(board, text, strict)


def legal_move_text(board, text, strict=False):
    """True when `text` is a legal SAN move on `board`. python-chess's parse_san is lenient (a
    missing or wrong '+' is accepted, as with the paper's push_san check); strict=True also
    requires exactly python-chess's SAN."""
    if not text:
        return False
    ordinary = chess.SAN_REGEX.match(text)  # not castling or a null move: it names its destination
    if ordinary and chess.parse_square(ordinary.group(4)) not in {m.to_square for m in board.legal_moves}:
        return False  # parse_san would refuse it too, after formatting the position for its message
    try:
        move = board.parse_san(text)
    except ValueError:
        return False
    if not move:  # '--' / '0000' parse as a null move, which is not a chess move
        return False
    return board.san(move) == text if strict else True


# ----------------------------------------------------------------------------------------------
# Board-state labels for the games evaluation scores SAEs on

def make_labels(game, tokens, max_chars=256, workers=2):
    """Board-state properties at every scored position of `tokens` [N, T].
    Returns dict(game_idx [P], pos [P], sets, names): the activation read at tokens[game_idx, pos] is scored
    against sets[name] bool [P, G]; a nested dict is a set of equally weighted properties.
    Othello: every position before the last token (the LM's inputs), mine/theirs relative to the
    player to move next (empty dropped) and legal-move squares. Chess: the '.' characters
    (White to move), the first 20 per game within max_chars; piece planes and strategy set."""
    if game == 'othello':
        states = othello_states(tokens[:, :-1].long())
        valid = tokens[:, :-1] != OTHELLO_PAD  # (N, T-1); a position exists once its move was played
        g, p = valid.nonzero(as_tuple=True)
        sets = {'mine_theirs': torch.cat([states['mine'], states['theirs']], -1)[g, p],  # (P, 128)
                'legal': states['legal'][g, p]}  # (P, 64)
        names = {'mine_theirs': [f'mine@{s}' for s in SQUARE_NAMES] + [f'theirs@{s}' for s in SQUARE_NAMES],
                 'legal': [f'legal@{s}' for s in SQUARE_NAMES]}
        return {'game_idx': g, 'pos': p, 'sets': sets, 'names': names}
    transcripts = [decode_chess(row) for row in tokens]
    lab = chess_labels(transcripts, max_chars=min(max_chars, tokens.shape[1] - 1), workers=workers)
    sets = {'piece': torch.from_numpy(lab['piece']),
            'strategy': {k: torch.from_numpy(v) for k, v in lab['strategy'].items()}}
    names = {'piece': lab['piece_names'], 'strategy': lab['strategy_names']}
    return {'game_idx': torch.from_numpy(lab['game']), 'pos': torch.from_numpy(lab['pos']), 'sets': sets, 'names': names}


SQUARE_NAMES = ['abcdefgh'[s % 8] + str(s // 8 + 1) for s in range(64)]


# ----------------------------------------------------------------------------------------------
# The stage: make, save and load the data sets

@dataclass
class DataConfig:
    game: str = 'othello'      # othello | chess
    n_games: int = 0           # training games (0: the game's default below)
    n_val: int = 0             # held-out games (0: the game's default below)
    source: str = 'random'     # chess: random | stockfish | PATH.pgn   (Othello: always random)
    max_chars: int = 256       # chess: characters kept per game (the LM's context + 1)
    n_label_games: int = 2000  # held-out games labelled with board states (evaluate.py: half train, half test)
    seed: int = 1337
    workers: int = 2           # processes for generation and chess labelling
    data_dir: str = 'data'


DEFAULT_GAMES = {'othello': (500_000, 4000), 'chess': (30_000, 3000)}  # (train, val): the cpu preset's


def data_paths(game, data_dir='data'):
    d = os.path.join(data_dir, game)
    return {k: os.path.join(d, f'{k}.pt') for k in ('train', 'val', 'labels')}


def prepare(cfg, log=print):
    """Make train/val token sets and the labels of the first n_label_games val games."""
    if cfg.game not in DEFAULT_GAMES:
        raise UserError(f"unknown game {cfg.game!r}: use --game othello or --game chess")
    check_options(cfg, 'data.py', {'data_dir': DIRECTORY, 'n_games': NON_NEGATIVE, 'n_val': NON_NEGATIVE, 'seed': SEED,
                                   'max_chars': (lambda v: v >= 2, 'an integer >= 2'),
                                   'n_label_games': POSITIVE, 'workers': POSITIVE})
    check_output_dir(os.path.join(cfg.data_dir, cfg.game), 'data_dir')
    with lock_dir(os.path.join(cfg.data_dir, cfg.game), 'data_dir'):
        return _prepare(cfg, log)


def _prepare(cfg, log):
    n_train = cfg.n_games or DEFAULT_GAMES[cfg.game][0]
    n_val = cfg.n_val or DEFAULT_GAMES[cfg.game][1]
    t0 = time.time()
    n_skipped = 0
    if cfg.game == 'othello':
        if cfg.source != 'random':
            raise UserError("Othello games are always synthetic: drop --source (or use --game chess)")
        tokens = torch.from_numpy(othello_games(n_train + n_val, cfg.seed, workers=cfg.workers, progress=log))
        itos, pad_id = OTHELLO_ITOS, OTHELLO_PAD
    else:
        games, n_skipped = chess_games(n_train + n_val, cfg.source, cfg.seed, cfg.max_chars,
                                       workers=cfg.workers, progress=log)
        if len(games) < n_train + n_val:  # a short PGN file: --n_games to train on (fewer where that
            # would leave under a tenth of the file, or --n_val if less), the rest to validate, up to --n_val
            if len(games) < 2:
                raise DataError(f"{cfg.source}: only 1 usable game; need at least 2 (one to train on, one to validate)")
            least_val = min(n_val, max(1, len(games) // 10))
            n_train = min(n_train, len(games) - least_val)  # at least 1, and so is n_val (least_val or more)
            n_val = min(n_val, len(games) - n_train)
            games = games[:n_train + n_val]  # val is tokens[n_train:]
        itos, pad_id = CHESS_ITOS, CHESS_PAD_ID
        tokens = encode_chess(games, cfg.max_chars, pad_id).to(torch.uint8)
    log(f"data: {len(tokens)} {cfg.game} games in {time.time() - t0:.1f}s "
        f"({len(tokens) / max(time.time() - t0, 1e-9):,.0f} games/s)" + (f", {n_skipped} skipped" if n_skipped else ""))
    meta = dict(format='boardgame-saes/data', version=FORMAT_VERSION, game=cfg.game, itos=itos,
                pad_id=pad_id, config=dataclasses.asdict(cfg), n_skipped=n_skipped)
    paths = data_paths(cfg.game, cfg.data_dir)
    t0 = time.time()
    val = tokens[n_train:]
    labels = make_labels(cfg.game, val[:cfg.n_label_games], cfg.max_chars, cfg.workers)
    log(f"data: board states of {min(len(val), cfg.n_label_games)} val games "
        f"({len(labels['pos'])} positions) in {time.time() - t0:.1f}s")
    # the labels last: their presence means the whole set is complete (a failure keeps the old set)
    atomic_write({paths['train']: _torch_writer({**meta, 'tokens': tokens[:n_train].clone()}),
                  paths['val']: _torch_writer({**meta, 'tokens': val.clone()}),
                  paths['labels']: _torch_writer({**meta, 'format': 'boardgame-saes/labels', **labels})})
    log(f"data: wrote {paths['train']} ({n_train} games), {paths['val']} ({len(val)}), {paths['labels']}")
    return paths


def dir_args(data_dir='data', out_dir='out'):
    """The ` --data_dir=... --out_dir=...` a suggested command needs: those not at their defaults,
    so that a hint given to a run with its own directories writes where that run reads."""
    return ((f" --data_dir={data_dir}" if data_dir != 'data' else '')
            + (f" --out_dir={out_dir}" if out_dir != 'out' else ''))


def load_data(game, split, data_dir='data'):
    """Load data/<game>/<split>.pt (split: train | val | labels), checking format and game."""
    path = data_paths(game, data_dir)[split]
    hint = f"python data.py --game {game}{dir_args(data_dir)}"
    kind = 'boardgame-saes/labels' if split == 'labels' else 'boardgame-saes/data'
    keys = (('sets', 'names', 'game_idx', 'pos', 'config') if split == 'labels'
            else ('tokens', 'pad_id', 'itos', 'config'))
    obj = load_file(path, kind, hint, keys=keys)
    if obj.get('game') != game:
        raise DataError(f"{path} holds {obj.get('game')} data, not {game}: run `{hint}`")
    return obj


def main(argv):
    cfg = parse_config(DataConfig(), argv, 'data.py')
    print(f"data.py config: {dataclasses.asdict(cfg)}")
    prepare(cfg)


if __name__ == '__main__':
    run_cli(main)
