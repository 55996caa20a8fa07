"""
The test suite: python -m pytest -q test_all.py   (1.5 to 5 minutes on 2 CPU cores, by processor)

Known answers come from independent sources: Othello perft tables, a naive per-square Othello
implementation written here, python-chess for chess boards and legal moves, chess attacks from the
piece rules written here (checks, forks, pins), brute-force loops for the metrics, hand cases with
closed-form answers for the SAEs, and a fake clock for the time budgets.
"""
import contextlib
import copy
import dataclasses
import glob
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import random
import shutil
import re
import subprocess
import sys
import tempfile

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chess
import chess.pgn

import data as D
from data import (
    CHESS_CHARS, CHESS_PAD_ID, CHESS_STRATEGY_SIZES, DataError, chess_games, chess_labels,
    chess_strategy_state, close_engines, decode_chess, encode_chess, find_stockfish,
    is_legal_continuation, move_boundaries, moves_to_transcript, pgn_games, random_game,
    stockfish_game, transcript_to_moves,
)
import metrics
import sae as S
from model import GPT, GPTConfig, choose_precision, load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))

# torch.compile and the CUDA-graph step marks import torch's inductor, whose import warns of
# torch.jit's deprecation (14 lines, in whichever test compiles first): torch's own warning about
# its own code, nothing this project calls or can mend
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script_method` is deprecated:DeprecationWarning')


def run_script(*args, cwd=HERE):
    """Run one of the scripts as a user would; returns (exit code, stdout + stderr). The timeout
    only catches a hang: the longest run takes ~20 s alone, several minutes on a loaded machine."""
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


def tiny_middle_sae(arch):
    """The file name (no .pt) of `arch`'s middle setting (the control's) in a tiny-preset sweep."""
    import train as TR
    return TR.sae_name(arch, TR.sweep_settings(arch, TR.PRESETS['tiny'][0]['n_embd'])[1])


# ------------------------------------------------------------------------------------------------
# Othello: an independent, naive board on an 8x8 list (the kind of code data.py replaces)

NAIVE_DIRS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def naive_flips(board, player, r, c):
    if board[r][c] != 0:
        return []
    out = []
    for dr, dc in NAIVE_DIRS:
        run, rr, cc = [], r + dr, c + dc
        while 0 <= rr < 8 and 0 <= cc < 8 and board[rr][cc] == -player:
            run.append((rr, cc))
            rr, cc = rr + dr, cc + dc
        if run and 0 <= rr < 8 and 0 <= cc < 8 and board[rr][cc] == player:
            out += run
    return out


def naive_legal(board, player):
    return [(r, c) for r in range(8) for c in range(8) if naive_flips(board, player, r, c)]


def naive_has_move(board, player):
    return any(naive_flips(board, player, r, c) for r in range(8) for c in range(8))


def naive_start():
    board = [[0] * 8 for _ in range(8)]  # board[rank][file]; 1 = Black, -1 = White
    board[3][3] = board[4][4] = -1  # d4, e5 White
    board[3][4] = board[4][3] = 1   # e4, d5 Black
    return board


def naive_replay(game):
    """Replay one game's tokens on the naive board by the rules: every move must be legal, a side
    passes only when it has no legal move, and the game stops (a pad token) only when neither side
    has one. After each move yield (t, board, the player to move next (passes applied), the
    squares the move flipped, whether that player moves again because the other one passes)."""
    board, player = naive_start(), 1
    for t, tok in enumerate(game):
        if tok == D.OTHELLO_PAD:
            assert not naive_has_move(board, player) and not naive_has_move(board, -player), f"game stopped at move {t}"
            return
        r, c = divmod(D.OTHELLO_SQUARES[tok], 8)
        flips = naive_flips(board, player, r, c)
        assert flips, f"illegal move {D.OTHELLO_ITOS[tok]} at move {t + 1}"
        board[r][c] = player
        for rr, cc in flips:
            board[rr][cc] = player
        again = not naive_has_move(board, -player) and naive_has_move(board, player)
        player = player if again else -player
        yield t, board, player, flips, again


def othello_perft(depth):
    """Leaf counts at depths 1..depth from the start (a pass counts as a move, as in the
    standard tables), expanding every position one level at a time with data.py's vectorised
    move generator (othello_legal, othello_flips on uint64 bitboards)."""
    own, opp = np.array([D.START_BLACK]), np.array([D.START_WHITE])
    counts = []
    for _ in range(depth):
        legal = D.othello_legal(own, opp)
        must_pass = (legal == 0) & (D.othello_legal(opp, own) != 0)
        node, square = np.nonzero(D.to_planes(legal))
        move = D.BIT[square]
        flipped = D.othello_flips(own[node], opp[node], move)
        own, opp = (np.concatenate([opp[node] & ~flipped, opp[must_pass]]),
                    np.concatenate([own[node] | flipped | move, own[must_pass]]))
        counts.append(len(own))
    return counts


def test_othello_perft_matches_known_counts():
    assert othello_perft(8) == [4, 12, 56, 244, 1396, 8200, 55092, 390216]


def test_othello_games_are_legal_and_reproducible():
    a = D.othello_games(300, seed=7)
    assert a.shape == (300, 60) and a.dtype == np.uint8
    assert (a == D.othello_games(300, seed=7)).all()
    assert not (a == D.othello_games(300, seed=8)).all()
    n_moves = (a != D.OTHELLO_PAD).sum(1)
    assert n_moves.min() >= 9 and (n_moves == 60).mean() > 0.8  # most random games fill the board
    n_pass = 0
    for game in a[:100]:  # naive_replay checks every move, pass and ending by the rules
        n_pass += sum(again for *_, again in naive_replay(game.tolist()))
    assert n_pass > 0  # some games pass inside the game, so the replay checked passes too


def test_othello_data_is_the_same_for_any_number_of_workers():
    one = D.othello_games(2000, seed=3, chunk=256)
    two = D.othello_games(2000, seed=3, chunk=256, workers=2)
    assert one.shape == (2000, 60) and (one == two).all()
    legal = D.othello_legal_bitboards(one, chunk=256)
    assert torch.equal(legal, D.othello_legal_bitboards(one, chunk=256, workers=2))
    assert torch.equal(legal, D.othello_legal_bitboards(one))  # chunking changes nothing either
    assert legal.shape == (2000, 60) and legal.dtype == torch.int64


def test_othello_states_agree_with_naive_replay():
    tokens = torch.from_numpy(D.othello_games(40, seed=3)).long()
    states = D.othello_states(tokens)
    for g in range(len(tokens)):
        for t, board, player, flips, _ in naive_replay(tokens[g].tolist()):
            mine = [board[s // 8][s % 8] == player for s in range(64)]
            theirs = [board[s // 8][s % 8] == -player for s in range(64)]
            legal = [False] * 64
            for rr, cc in naive_legal(board, player):
                legal[rr * 8 + cc] = True
            flipped = [False] * 64
            for rr, cc in flips:
                flipped[rr * 8 + cc] = True
            assert states['mine'][g, t].tolist() == mine
            assert states['theirs'][g, t].tolist() == theirs
            assert states['legal'][g, t].tolist() == legal
            assert states['flipped'][g, t].tolist() == flipped


def test_othello_labels_score_every_input_position_against_the_naive_board():
    # make_labels('othello') reads the stream at each input token, the board after that move:
    # positions 0..n-1 of a game of n moves (the last of a 60-move game is never an input)
    games = D.othello_games(200, seed=1)
    n_moves = (games != D.OTHELLO_PAD).sum(1)
    pick = np.concatenate([np.flatnonzero(n_moves < 60), np.flatnonzero(n_moves == 60)[:3]])
    tokens = torch.from_numpy(games[pick]).long()  # games of 15, 59, 60, 60, 60 moves
    assert sorted(n_moves[pick].tolist()) == [15, 59, 60, 60, 60]
    lab = D.make_labels('othello', tokens)
    expected = []
    for g in range(len(tokens)):
        for t, board, player, *_ in naive_replay(tokens[g].tolist()):
            if t < tokens.shape[1] - 1:
                expected.append((g, t, copy.deepcopy(board), player))  # the board moves on
    assert list(zip(lab['game_idx'].tolist(), lab['pos'].tolist())) == [(g, t) for g, t, *_ in expected]
    for i, (g, t, board, player) in enumerate(expected):
        cells = [board[s // 8][s % 8] for s in range(64)]
        legal = {rr * 8 + cc for rr, cc in naive_legal(board, player)}
        assert lab['sets']['mine_theirs'][i].tolist() == [c == player for c in cells] + [c == -player for c in cells]
        assert lab['sets']['legal'][i].tolist() == [s in legal for s in range(64)]
    assert lab['names']['mine_theirs'][0] == 'mine@a1' and lab['names']['legal'][63] == 'legal@h8'


def test_othello_soft_targets_are_uniform_over_naive_legal_moves():
    tokens = torch.from_numpy(D.othello_games(30, seed=5)).long()
    soft = D.othello_soft_targets(D.othello_legal_bitboards(tokens, chunk=7))  # chunks of 7 games
    assert soft.shape == (30, 60, 61) and (soft[..., D.OTHELLO_PAD] == 0).all()
    n_moves = (tokens != D.OTHELLO_PAD).sum(1)
    for g in range(len(tokens)):
        assert (soft[g, n_moves[g]:] == 0).all()  # the game is over: ignored rows
        for t, board, player, *_ in naive_replay(tokens[g].tolist()):
            legal = naive_legal(board, player)  # empty after the last move
            expected = torch.zeros(61)
            for rr, cc in legal:
                expected[D.SQUARE_TO_TOKEN[rr * 8 + cc]] = 1 / len(legal)
            assert torch.allclose(soft[g, t], expected), (g, t)


def test_othello_states_handle_a_pass():
    # games where data.py says a side passes (the disc just played is the next mover's own), each
    # replayed on the naive board, which decides passes by the rules
    tokens = torch.from_numpy(D.othello_games(2000, seed=11)).long()
    states = D.othello_states(tokens)
    square = torch.as_tensor(D.OTHELLO_SQUARES + [0])[tokens]  # (N, 60), pad -> a dummy square
    again = states['mine'].gather(-1, square[..., None])[..., 0] & (tokens != D.OTHELLO_PAD)  # (N, 60)
    found = 0
    for g in again.any(1).nonzero()[:20, 0].tolist():
        for t, board, player, _, naive_again in naive_replay(tokens[g].tolist()):
            found += naive_again
            assert bool(again[g, t]) == naive_again
            assert states['mine'][g, t].tolist() == [board[s // 8][s % 8] == player for s in range(64)]
    assert found > 0


def test_othello_states_after_the_game_repeat_its_final_board():
    # games shorter than 60 moves (a side wiped out, or neither able to move): from the last
    # move on every position holds the board it left, with no legal move
    tokens = torch.from_numpy(D.othello_games(2000, seed=0)).long()
    n_moves = (tokens != D.OTHELLO_PAD).sum(1)
    short = (n_moves < 60).nonzero()[:, 0]
    assert len(short) >= 3 and n_moves.min() < 20
    states = D.othello_states(tokens[short])
    for i, g in enumerate(short.tolist()):
        last = n_moves[g].item() - 1
        for k in ('mine', 'theirs'):
            assert (states[k][i, last:] == states[k][i, last]).all(), (g, k)
        assert not states['legal'][i, last:].any()


def test_othello_states_reject_an_illegal_move():
    tokens = torch.full((1, 3), D.OTHELLO_PAD)
    tokens[0, 0] = D.OTHELLO_ITOS.index('a1')
    with pytest.raises(D.DataError, match='illegal'):
        D.othello_states(tokens)


# the README's exercise "a new board-state property": stable discs, and the rule they follow

def naive_stable(board):
    """Stable discs by the usual edge-anchored rule, as a fixpoint on the naive board: a disc is
    stable when, along each of the four lines through it (its row, its column, its two
    diagonals), the line is full or one of its two neighbours on it is off the board or a
    stable disc of the same colour. Such a disc can never be flipped. [64] bools by square."""
    stable = [[False] * 8 for _ in range(8)]

    def on_board(r, c):
        return 0 <= r < 8 and 0 <= c < 8

    def full(r, c, dr, dc):
        for sign in (1, -1):
            rr, cc = r + sign * dr, c + sign * dc
            while on_board(rr, cc):
                if board[rr][cc] == 0:
                    return False
                rr, cc = rr + sign * dr, cc + sign * dc
        return True

    def anchored(r, c, dr, dc):
        return any(not on_board(r + k * dr, c + k * dc) or (stable[r + k * dr][c + k * dc] and
                   board[r + k * dr][c + k * dc] == board[r][c]) for k in (1, -1))

    changed = True
    while changed:
        changed = False
        for r in range(8):
            for c in range(8):
                if board[r][c] and not stable[r][c] and all(
                        full(r, c, dr, dc) or anchored(r, c, dr, dc) for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1))):
                    stable[r][c] = changed = True
    return [stable[s // 8][s % 8] for s in range(64)]


def test_naive_stable_rule_known_answers():
    board = naive_start()
    assert not any(naive_stable(board))  # every disc of the start can still flip
    board[0][0] = board[0][1] = 1  # a1 (a corner) and b1 beside it on the edge, one colour
    board[1][1] = -1  # b2: open squares around it
    stable = naive_stable(board)
    assert stable[0] and stable[1] and not stable[9]
    assert all(naive_stable([[1] * 8 for _ in range(8)]))  # a full board: every line is full
    tokens = D.othello_games(3, seed=4)
    for game in tokens.tolist():  # a stable disc stays stable, and keeps its colour, to the end
        before = []
        for _, board, *_ in naive_replay(game):
            now = naive_stable(board)
            colour = [board[s // 8][s % 8] for s in range(64)]
            assert all(now[s] and colour[s] == c for s, c in before)
            before = [(s, colour[s]) for s in range(64) if now[s]]
        assert before  # some disc is stable by the end of a game


def test_othello_stable_discs_match_the_naive_rule():
    if not hasattr(D, 'othello_stable'):
        pytest.skip('exercise (README, Exercises): write data.othello_stable(mine, theirs)')
    tokens = torch.from_numpy(D.othello_games(10, seed=4)).long()
    states = D.othello_states(tokens)
    stable = D.othello_stable(states['mine'], states['theirs'])  # bool (N, T, 64)
    assert stable.shape == states['mine'].shape and stable.dtype == torch.bool
    for g in range(len(tokens)):
        for t, board, *_ in naive_replay(tokens[g].tolist()):
            assert stable[g, t].tolist() == naive_stable(board), (g, t)


# ------------------------------------------------------------------------------------------------
# Chess: python-chess is the oracle


def test_transcript_format_known_games():
    assert moves_to_transcript(['e4', 'e5', 'Nf3', 'Nc6', 'Bb5']) == ';1.e4 e5 2.Nf3 Nc6 3.Bb5'
    assert moves_to_transcript(['e4', 'e5', 'Nf3', 'Nc6', 'Bc4', 'Bc5', 'O-O']) == \
        ';1.e4 e5 2.Nf3 Nc6 3.Bc4 Bc5 4.O-O'
    assert moves_to_transcript(['e4', 'e5', 'Bc4', 'Nc6', 'Qh5', 'Nf6', 'Qxf7#']) == \
        ';1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#'
    assert moves_to_transcript([]) == ';'

def _replay_check(t, max_chars):
    """t uses the vocabulary, starts right, and replays legally; returns the board at the end."""
    assert set(t) <= set(CHESS_CHARS)
    assert t.startswith(';1.') and len(t) <= max_chars
    complete = len(t) < max_chars  # shorter than max_chars: the game ended, nothing was cut
    sans = transcript_to_moves(t, last_is_complete=complete)
    board = chess.Board()
    for san in sans:
        board.push_san(san)  # raises if illegal
    rebuilt = moves_to_transcript(sans)
    assert t.startswith(rebuilt) if not complete else t == rebuilt
    return board, complete

def test_random_games_valid_and_cut():
    ended = 0
    for seed in range(12):
        for max_chars in (256, 1024):
            t = random_game(seed, max_chars)
            board, complete = _replay_check(t, max_chars)
            if complete:
                ended += 1
                assert board.is_game_over()
        # stopping early is the same as cutting a longer game
        assert random_game(seed, 3000)[:256] == random_game(seed, 256)
    assert ended >= 1  # a game that ended before max_chars was checked to be over (seed 1 at 1024)
    long = [random_game(s, 1024) for s in range(12)]
    assert sum(len(t) == 1024 for t in long) >= 6  # most random games are long
    assert all(re.search(r'[+x]', t) for t in long)

def test_reproducible_and_worker_independent():
    a, skipped = chess_games(80, 'random', seed=3, max_chars=256, workers=1, progress=lambda s: None)
    b, _ = chess_games(80, 'random', seed=3, max_chars=256, workers=2, progress=lambda s: None)
    c, _ = chess_games(80, 'random', seed=4, max_chars=256, workers=2, progress=lambda s: None)
    assert skipped == 0 and len(a) == 80
    assert a == b
    assert a != c and len(set(a)) == 80

def test_progress_lines():
    lines = []
    chess_games(20, 'random', 0, 64, workers=1, progress=lines.append)
    assert 5 <= len(lines) <= 11 and all('/s' in l for l in lines)

# ---------------------------------------------------------------- PGN

PGN_GOOD_1 = """[Event "a"]
[White "x"]
[Black "y"]
[Result "1-0"]

1. e4 e5 2. Bc4 Nc6 3. Qh5 Nf6 4. Qxf7# 1-0
"""
PGN_ILLEGAL = """[Event "b"]
[Result "*"]

1. e4 e5 2. Nf3 Ke7 3. Qxe7 Nc6 4. d4 *
"""
PGN_GOOD_2 = """[Event "c"]
[Result "1/2-1/2"]

1. d4 { a comment } d5 2. c4 (2. Nf3 Nf6) dxc4 3. e3 $1 b5 4. a4 c6 5. axb5 cxb5 6. Qf3 1/2-1/2
"""

def test_pgn_skips_illegal(tmp_path):
    path = tmp_path / 'games.pgn'
    path.write_text('\n'.join([PGN_GOOD_1, PGN_ILLEGAL, PGN_GOOD_2]))
    lines = []
    games, skipped = pgn_games(str(path), 10, 1024, progress=lines.append)
    assert skipped == 1 and len(games) == 2
    assert games[0] == ';1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#'
    assert games[1] == ';1.d4 d5 2.c4 dxc4 3.e3 b5 4.a4 c6 5.axb5 cxb5 6.Qf3'  # mainline only
    assert any('1 skipped' in l for l in lines)
    # the same through chess_games, with a cut and a limit on the number of games
    games, skipped = chess_games(1, str(path), 0, 10, progress=lambda s: None)
    assert games == [';1.e4 e5 2'] and skipped == 0

def test_a_short_pgn_trains_on_n_games_and_validates_on_the_rest(tmp_path):
    # 20 games, fewer than --n_games + --n_val: --n_games still says how many to train on, the
    # rest validate up to --n_val; by default a tenth of the file validates
    path = tmp_path / 'twenty.pgn'
    path.write_text('\n'.join([PGN_GOOD_1, PGN_GOOD_2] * 10))
    # (--n_val below a tenth of the file: that many validate, and the rest train)
    for n_games, n_val, want in ((5, 0, (5, 15)), (5, 8, (5, 8)), (0, 0, (18, 2)), (19, 0, (18, 2)), (19, 1, (19, 1))):
        d = str(tmp_path / f'data{n_games}_{n_val}')
        D.prepare(D.DataConfig(game='chess', source=str(path), n_games=n_games, n_val=n_val, workers=1,
                               data_dir=d), log=lambda _: None)
        got = tuple(len(D.load_data('chess', split, d)['tokens']) for split in ('train', 'val'))
        assert got == want, (n_games, n_val)
    one = tmp_path / 'one.pgn'  # a single game cannot both train and validate
    one.write_text(PGN_GOOD_1)
    with pytest.raises(DataError, match=r'one.pgn: only 1 usable game; need at least 2 \(one to train on, one to'):
        D.prepare(D.DataConfig(game='chess', source=str(one), workers=1, data_dir=str(tmp_path / 'one')),
                  log=lambda _: None)
    assert not os.path.exists(tmp_path / 'one' / 'chess' / 'train.pt')


def test_pgn_skips_fen_variant_and_empty(tmp_path):
    fen_game = '[Event "f"]\n[SetUp "1"]\n[FEN "4k3/8/8/8/8/8/4P3/4K3 w - - 0 1"]\n\n1. e4 Kd7 *\n'
    variant = '[Event "v"]\n[Variant "Crazyhouse"]\n\n1. e4 e5 *\n'
    empty = '[Event "e"]\n[Result "*"]\n\n*\n'
    # the start pieces set up from a FEN: the game from the start position is taken; with Black
    # to move (or without castling rights) it is another game, skipped
    start = '[Event "s"]\n[SetUp "1"]\n[FEN "rnbqkbnr/pppppppp/8/8/8/8/PPPPPPPP/RNBQKBNR {} KQkq - 0 1"]\n\n{} *\n'
    black_first = start.format('b', '1... e5 2. e4')
    path = tmp_path / 'mixed.pgn'
    path.write_text('\n'.join([fen_game, variant, empty, PGN_GOOD_1, black_first, start.format('w', '1. d4 d5')]))
    games, skipped = pgn_games(str(path), 10, 256, progress=lambda s: None)
    assert games == [';1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#', ';1.d4 d5'] and skipped == 4
    # text python-chess's parser raises on (an IndexError: a NAG after a variation's end), between
    # two good games: counted as skipped, and the games after it are still read
    raises = '[Event "r"]\n\n1. g5 ) ! *\n'
    with pytest.raises(IndexError):
        chess.pgn.read_game(io.StringIO(raises))
    path.write_text('\n'.join([PGN_GOOD_1, raises, PGN_GOOD_2]))
    lines = []
    games, skipped = pgn_games(str(path), 10, 256, progress=lines.append)
    assert len(games) == 2 and skipped == 1 and lines == [f'pgn: 2 games from {path}, 1 skipped']

def test_pgn_errors_name_the_file(tmp_path):
    empty = tmp_path / 'empty.pgn'
    empty.write_text('')
    with pytest.raises(DataError, match='empty.pgn'):
        pgn_games(str(empty), 10, 256, progress=lambda s: None)
    bad = tmp_path / 'bad.pgn'
    bad.write_text(PGN_ILLEGAL)
    with pytest.raises(DataError, match='bad.pgn'):
        pgn_games(str(bad), 10, 256, progress=lambda s: None)
    with pytest.raises(DataError, match='missing.pgn'):
        chess_games(10, str(tmp_path / 'missing.pgn'), 0, 256, progress=lambda s: None)

# ---------------------------------------------------------------- stockfish

def test_stockfish_missing_message():
    with pytest.raises(DataError, match=r'^stockfish not found: install it with `apt-get install -y stockfish` \(or pass --source random\)$'):
        find_stockfish('no_such_engine_binary_xyz')
    with pytest.raises(DataError, match='stockfish not found'):
        chess_games(2, 'stockfish', 0, 64, engine_path='no_such_engine_binary_xyz', progress=lambda s: None)

def _has_stockfish():
    try:
        find_stockfish()
        return True
    except DataError:
        return False

@pytest.mark.skipif(not _has_stockfish(), reason='stockfish not installed')
def test_stockfish_games():
    try:
        a = stockfish_game(11, 120)
        b = stockfish_game(11, 120)
        c = stockfish_game(12, 120)
    finally:
        close_engines()
    assert a == b and a != c
    for t in (a, c):
        _replay_check(t, 120)

# ---------------------------------------------------------------- labels

def _random_moves(seed, n_plies):
    rng, board, sans = random.Random(seed), chess.Board(), []
    for _ in range(n_plies):
        moves = list(board.legal_moves)
        if not moves:
            break
        m = rng.choice(moves)
        sans.append(board.san(m))
        board.push(m)
    return sans

# Attacks from the piece rules alone (no python-chess attack tables): the oracle for squares
# attacked, checks, forks and pins. `pieces` maps square (a1 = 0, rank * 8 + file) -> symbol
# 'PNBRQK' (White) or 'pnbrqk' (Black).

STEPS = {'N': [(1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1)],
         'K': [(dr, df) for dr in (-1, 0, 1) for df in (-1, 0, 1) if (dr, df) != (0, 0)]}
RAYS = {'R': [(1, 0), (-1, 0), (0, 1), (0, -1)], 'B': [(1, 1), (1, -1), (-1, 1), (-1, -1)]}
RAYS['Q'] = RAYS['R'] + RAYS['B']
VALUE = {'P': 1, 'N': 3, 'B': 3, 'R': 5, 'Q': 9, 'K': 100}  # the fork rule's values


def naive_attacks(pieces, sq):
    """The squares the piece on sq attacks (a slider stops at the first piece, which it attacks)."""
    sym = pieces[sq]
    kind, (rank, file) = sym.upper(), divmod(sq, 8)
    out = set()
    if kind == 'P':
        lines, slide = [(1 if sym == 'P' else -1, df) for df in (-1, 1)], False
    elif kind in STEPS:
        lines, slide = STEPS[kind], False
    else:
        lines, slide = RAYS[kind], True
    for dr, df in lines:
        r, f = rank + dr, file + df
        while 0 <= r < 8 and 0 <= f < 8:
            out.add(r * 8 + f)
            if not slide or r * 8 + f in pieces:
                break
            r, f = r + dr, f + df
    return out


def naive_attackers(pieces, target, white):
    return {sq for sq, sym in pieces.items() if sym.isupper() == white and target in naive_attacks(pieces, sq)}


def naive_king(pieces, white):
    return next(sq for sq, sym in pieces.items() if sym == ('K' if white else 'k'))


def naive_fork(pieces):
    """Some White piece attacks two Black non-king pieces, each worth more than it or undefended."""
    for sq, sym in pieces.items():
        if sym.isupper():
            hits = [t for t in naive_attacks(pieces, sq) if t in pieces and pieces[t] in 'pnbrq'
                    and (VALUE[pieces[t].upper()] > VALUE[sym] or not naive_attackers(pieces, t, white=False))]
            if len(hits) >= 2:
                return True
    return False


def naive_pin(pieces):
    """Some White piece is pinned to its king: take it off the board and a Black piece that did
    not attack the king before does now (the king may be in check already)."""
    king = naive_king(pieces, white=True)
    before = naive_attackers(pieces, king, white=False)
    for sq, sym in pieces.items():
        if sym.isupper() and sym != 'K':
            without = {s: v for s, v in pieces.items() if s != sq}
            if naive_attackers(without, king, white=False) - before:
                return True
    return False


def naive_gives_check(board):
    """Some legal move leaves the Black king attacked: push each one and look."""
    for m in board.legal_moves:
        board.push(m)
        pieces = {sq: p.symbol() for sq, p in board.piece_map().items()}
        board.pop()
        if naive_attackers(pieces, naive_king(pieces, white=False), white=True):
            return True
    return False


def _expected(board):
    """The labels, computed directly: python-chess for legal moves and SAN, the piece rules
    above for attacks, checks, forks and pins."""
    start = chess.Board()
    piece = np.zeros((64, 12), dtype=bool)
    for sq in chess.SQUARES:
        p = board.piece_at(sq)
        if p is not None and start.piece_at(sq) != p:
            piece[sq, 'PNBRQKpnbrqk'.index(p.symbol())] = True
    legal = list(board.legal_moves)
    pieces = {sq: p.symbol() for sq, p in board.piece_map().items()}
    white_bishops = [sq for sq in board.pieces(chess.BISHOP, chess.WHITE)]
    colours = {(chess.square_file(sq) + chess.square_rank(sq)) % 2 for sq in white_bishops}
    disambiguated = False
    for m in legal:
        san = re.sub(r'[+#x]', '', board.san(m))
        if san[0] in 'NBRQK' and not san.startswith('O') and len(san) > 3:
            disambiguated = True
    s = {
        'attacked_by_black': np.array([bool(naive_attackers(pieces, sq, white=False)) for sq in chess.SQUARES]),
        'white_legal_dest': np.array([any(m.to_square == sq for m in legal) for sq in chess.SQUARES]),
        'in_check': bool(naive_attackers(pieces, naive_king(pieces, white=True), white=False)),
        'can_give_check': naive_gives_check(board),
        'has_queen': len(board.pieces(chess.QUEEN, chess.WHITE)) > 0,
        'can_capture_queen': any(board.piece_at(m.to_square) == chess.Piece(chess.QUEEN, chess.BLACK) for m in legal),
        'bishop_pair': colours == {0, 1},
        'castling_any': bool(board.castling_rights & chess.BB_RANK_1),
        'castling_kingside': bool(board.castling_rights & chess.BB_H1),
        'castling_queenside': bool(board.castling_rights & chess.BB_A1),
        'fork': naive_fork(pieces),
        'pin': naive_pin(pieces),
        'en_passant': any(board.is_en_passant(m) for m in legal),
        'ambiguous_move': disambiguated,
    }
    return piece.reshape(-1), s

def test_labels_match_python_chess():
    games = [_random_moves(seed, 120) for seed in range(8)]
    transcripts = [moves_to_transcript(g) for g in games]
    L = chess_labels(transcripts, max_chars=256, max_positions=20)
    P = len(L['game'])
    assert L['piece'].shape == (P, 768) and L['piece'].dtype == bool and len(L['piece_names']) == 768
    assert L['game'].dtype == np.int64 and L['pos'].dtype == np.int64
    assert set(L['strategy']) == set(CHESS_STRATEGY_SIZES)
    for k, g in CHESS_STRATEGY_SIZES.items():
        assert L['strategy'][k].shape == (P, g) and L['strategy'][k].dtype == bool
    row = 0
    for gi, (sans, t) in enumerate(zip(games, transcripts)):
        dots = [i for i, c in enumerate(t) if c == '.' and i < 256][:20]  # SAN never contains '.'
        assert list(L['pos'][L['game'] == gi]) == dots
        for k, dot in enumerate(dots):
            board = chess.Board()
            for san in sans[:2 * k]:  # before the k-th move number: 2k plies
                board.push_san(san)
            piece, s = _expected(board)
            assert L['game'][row] == gi and L['pos'][row] == dot
            assert np.array_equal(L['piece'][row], piece)
            assert set(s) == set(CHESS_STRATEGY_SIZES)  # every property has its oracle
            for name, v in s.items():
                assert np.array_equal(L['strategy'][name][row], np.atleast_1d(v)), (name, gi, k)
            row += 1
    assert row == P
    for name in ('in_check', 'can_give_check', 'fork', 'pin', 'can_capture_queen', 'ambiguous_move'):
        assert 0 < L['strategy'][name].sum() < P, name  # both answers occur: the comparison means something
    # the start position: every piece is on its own starting square, so no piece is labelled
    assert not L['piece'][L['pos'] == 2].any()
    assert L['piece_names'][chess.F3 * 12 + 1] == 'N@f3'

def test_labels_cut_and_partial_moves():
    t = random_game(5, 1024)
    full = chess_labels([t], max_chars=1024, max_positions=1000)
    cut = chess_labels([t[:256]], max_chars=256, max_positions=20)
    assert (cut['pos'] < 256).all() and len(cut['pos']) <= 20
    n = len(cut['pos'])
    assert np.array_equal(full['pos'][:n], cut['pos'])
    assert np.array_equal(full['piece'][:n], cut['piece'])
    # a cut in the middle of a move (even one that would parse as another move) is ignored
    assert len(chess_labels([';1.e4 e5 2.Nf3 Nc6 3.O-O'])['pos']) == 3
    five = chess_labels([';1.e4 e5 2.Nf3 Nc6 3.Bb5 a6 4.'], max_chars=256, max_positions=2)
    assert list(five['pos']) == [2, 10]

def test_chess_make_labels_score_only_input_positions():
    # make_labels('chess') labels the '.' characters the LM reads as inputs: a '.' that is the
    # last token of a row [N, T] is never one, whatever max_chars allows
    transcripts = [random_game(s, 256) for s in range(4)]
    T = max(i for i, c in enumerate(transcripts[0]) if c == '.' and i < 100) + 1  # row 0 ends on a '.'
    lab = D.make_labels('chess', D.encode_chess(transcripts, T), max_chars=256)
    for g, t in enumerate(transcripts):
        dots = [i for i, c in enumerate(t) if c == '.' and i < T - 1][:20]
        assert lab['pos'][lab['game_idx'] == g].tolist() == dots
    assert T - 1 not in lab['pos'].tolist() and lab['sets']['piece'].shape == (len(lab['pos']), 768)
    # a full context: the first 20 of each game's '.' (these games have more)
    lab = D.make_labels('chess', D.encode_chess(transcripts, 256))
    for g, t in enumerate(transcripts):
        dots = [i for i, c in enumerate(t) if c == '.' and i < 255]
        assert len(dots) > 20 and lab['pos'][lab['game_idx'] == g].tolist() == dots[:20]


def test_labels_workers_identical():
    ts = [random_game(s, 256) for s in range(220)]
    a = chess_labels(ts, workers=1)
    b = chess_labels(ts, workers=2)
    for k in ('game', 'pos', 'piece'):
        assert np.array_equal(a[k], b[k])
    for k in CHESS_STRATEGY_SIZES:
        assert np.array_equal(a['strategy'][k], b['strategy'][k])

def _last(t, name):
    return chess_labels([t], max_chars=256, max_positions=100)['strategy'][name][-1, 0]

def test_known_positions_via_transcripts():
    start = ';1.'
    assert _last(start, 'castling_any') and _last(start, 'castling_kingside') and _last(start, 'castling_queenside')
    assert not _last(start, 'ambiguous_move') and not _last(start, 'en_passant') and _last(start, 'has_queen')
    kings = ';1.e4 e5 2.Ke2 Ke7 3.'
    assert not _last(kings, 'castling_any')
    rook = ';1.Nf3 Nf6 2.Rg1 Rg8 3.'
    assert not _last(rook, 'castling_kingside') and _last(rook, 'castling_queenside') and _last(rook, 'castling_any')
    ep = ';1.e4 a6 2.e5 d5 3.'
    assert _last(ep, 'en_passant') and not _last(';1.e4 a6 2.e5 a5 3.', 'en_passant')
    amb = ';1.Nc3 Nc6 2.Nf3 Nf6 3.Nb5 Nb4 4.'  # Nb5 and Nf3 both reach d4
    assert _last(amb, 'ambiguous_move')
    check = ';1.d4 e5 2.e3 Bb4+ 3.'
    assert _last(check, 'in_check') and not _last(check, 'pin')
    assert _last(';1.e4 e5 2.Nf3 Qg5 3.', 'can_capture_queen')
    assert not _last(';1.e4 e5 2.Nf3 Qf6 3.', 'can_capture_queen')
    assert _last(';1.d4 e5 2.Nc3 Bb4 3.', 'pin')  # the c3 knight is pinned by Bb4 to the king on e1
    assert not _last(';1.d4 e5 2.Nc3 Be7 3.', 'pin')
    assert _last(';1.e4 e5 2.Bc4 Nc6 3.', 'can_give_check')  # Bxf7+
    assert not _last(start, 'can_give_check')
    assert _last(';1.e4 e5 2.Nf3 Nc6 3.Bc4 Bc5 4.', 'bishop_pair')
    assert not _last(';1.e4 d5 2.Bb5+ Bd7 3.Bxd7+ Qxd7 4.', 'bishop_pair')

def test_strategy_bits_match_the_piece_rules_deep_in_random_games():
    # later positions than the labels test reaches: checks, forks and pins of every kind
    n, counts = 0, dict.fromkeys(('in_check', 'can_give_check', 'fork', 'pin'), 0)
    for seed in range(10):
        board, rng = chess.Board(), random.Random(100 + seed)
        while not board.is_game_over() and board.ply() < 160:
            if board.turn == chess.WHITE and board.ply() % 6 == 0:
                got, (_, want) = chess_strategy_state(board), _expected(board)
                for name in ('attacked_by_black', *counts):
                    assert np.array_equal(got[name], np.atleast_1d(want[name])), (name, board.fen())
                for name in counts:
                    counts[name] += bool(want[name])
                n += 1
            board.push(rng.choice(list(board.legal_moves)))
    assert all(5 <= c <= n - 5 for c in counts.values()), (n, counts)


def _strategy(fen):
    return {k: v for k, v in chess_strategy_state(chess.Board(fen)).items()}

def test_fork_and_pin_boards():
    # White knight on d5 attacks the black queen on c7 and the black rook on e7: a fork
    assert _strategy('7k/2q1r3/8/3N4/8/8/8/K7 w - - 0 1')['fork'][0]
    # two pawns, each defended by the king on d8: not worth more than a knight, not hanging
    assert not _strategy('3k4/2p1p3/8/3N4/8/8/8/K7 w - - 0 1')['fork'][0]
    # the same pawns undefended (king far away): hanging pieces count
    assert _strategy('7k/2p1p3/8/3N4/8/8/8/K7 w - - 0 1')['fork'][0]
    # a queen on e4 attacking a rook (e7, defended by Bf8) and a knight (a8, defended by Kb8)
    assert not _strategy('nk3b2/4r3/8/8/4Q3/8/8/K7 w - - 0 1')['fork'][0]
    # ... with the bishop gone the rook hangs, but one target is not a fork
    assert not _strategy('nk6/4r3/8/8/4Q3/8/8/K7 w - - 0 1')['fork'][0]
    # ... with the king away too, both hang: a fork
    assert _strategy('n6k/4r3/8/8/4Q3/8/8/K7 w - - 0 1')['fork'][0]
    # the king forks too: on e4 it attacks the undefended knights on d5 and f5
    assert _strategy('7k/8/8/3n1n2/4K3/8/8/8 w - - 0 1')['fork'][0]
    # absolute pin: White knight on e4 between the black rook on e8 and the White king on e1
    assert _strategy('4r2k/8/8/8/4N3/8/8/4K3 w - - 0 1')['pin'][0]
    assert not _strategy('4r2k/8/8/8/4N3/8/8/3K4 w - - 0 1')['pin'][0]
    # en passant (b5xc6) that would leave the rank between the king and the rook empty: not legal,
    # so not available; with the king off that rank it is
    assert not _strategy('8/8/8/KPp4r/8/8/8/7k w - c6 0 1')['en_passant'][0]
    assert _strategy('8/8/8/1Pp4r/K7/8/8/7k w - c6 0 1')['en_passant'][0]

# ---------------------------------------------------------------- tokenizer and legal moves

def brute_force_next_chars(plies):
    """Every random game of `plies` moves from the start, each with its probability (a product of
    1 / number of legal moves), as (transcript text + ' ', probability): the oracle for the first
    plies of data.chess_next_char_distributions, by enumeration instead of by prefix counting."""
    games = [((), 1.0)]
    board = chess.Board()
    for _ in range(plies):
        longer = []
        for moves, p in games:
            for m in moves:
                board.push(m)
            legal = list(board.legal_moves)
            for m in legal:
                longer.append((moves + (m,), p / len(legal)))
            for _ in moves:
                board.pop()
        games = longer
    out = []
    for moves, p in games:
        sans = []
        for m in moves:
            sans.append(board.san(m))
            board.push(m)
        for _ in moves:
            board.pop()
        out.append((D.moves_to_transcript(sans) + ' ', p))
    return out


def naive_next_char_distributions(transcript):
    """The plain definition of data.chess_next_char_counts, as distributions: python-chess's
    SAN for every legal move at every prefix, and every move played to see if the game ends."""
    n = len(transcript)
    rows = torch.zeros(n, len(D.CHESS_ITOS))
    if n == 0 or transcript[0] != ';':
        raise D.DataError(f"a chess transcript starts with ';': got {transcript[:10]!r}")
    stoi = {c: k for k, c in enumerate(D.CHESS_CHARS)}
    board, i, ply = chess.Board(), 0, 0  # i: the character whose row comes next

    def fill(dist):
        """Row i <- dist ({token id: weight}); check that character i + 1 is possible."""
        total = sum(dist.values())
        for token, w in dist.items():
            rows[i, token] = w / total
        if i + 1 < n and rows[i, stoi.get(transcript[i + 1], D.CHESS_PAD_ID)] == 0:
            raise D.DataError(f"character {i + 1} ({transcript[i + 1]!r}) of {transcript!r} cannot follow "
                            f"{transcript[:i + 1]!r} in a legal game")

    while i < n:
        moves = list(board.legal_moves)
        if D._game_over(board, moves):
            raise D.DataError(f"{transcript!r} goes on after the game is over, at character {i + 1}")
        for c in (f'{ply // 2 + 1}.' if ply % 2 == 0 else ''):  # the move number: determined
            fill({stoi[c]: 1})
            i += 1
            if i >= n:
                return rows
        sans = [board.san(m) for m in moves]
        ends = {}  # move index -> whether the game is over after it (computed when asked)

        def game_over_after(k):
            if k not in ends:
                board.push(moves[k])
                ends[k] = D._game_over(board, list(board.legal_moves))
                board.pop()
            return ends[k]

        typed = ''
        while True:
            dist = {}
            for k, san in enumerate(sans):
                if san.startswith(typed):
                    nxt = stoi[san[len(typed)]] if len(san) > len(typed) else (
                        D.CHESS_PAD_ID if game_over_after(k) else stoi[' '])
                    dist[nxt] = dist.get(nxt, 0) + 1
            fill(dist)
            i += 1
            if i >= n or transcript[i] == ' ':
                break
            typed += transcript[i]
        if i >= n:
            return rows
        board.push(moves[sans.index(typed)])  # the space says the move is complete: typed is its SAN
        ply += 1
    return rows


def test_san_bodies_match_python_chess():
    # every legal move of every position of long random games (promotions, en passant, castling,
    # several queens): python-chess's san() is the body plus its check suffix
    for seed in range(4):
        rng, board = random.Random(seed), chess.Board()
        while True:
            moves = list(board.legal_moves)
            if D._game_over(board, moves):
                break
            for move, body in zip(moves, D.san_bodies(board, moves)):
                san = board.san(move)
                assert san in (body, body + '+', body + '#'), (board.fen(), san, body)
            board.push(rng.choice(moves))
    # a move that needs its piece's file and rank: three queens, a1 on its file and c4 on its rank
    # can also reach a2 (random games seldom have three)
    board = chess.Board('7k/8/8/8/Q1Q5/8/8/Q6K w - - 0 1')
    moves = list(board.legal_moves)
    bodies = D.san_bodies(board, moves)
    assert 'Qa4a2' in bodies and [board.san(m).rstrip('+#') for m in moves] == bodies


def test_the_automatic_game_end_is_python_chess_is_game_over():
    # mate, stalemate, a dead position, the 75-move rule (150 plies without a capture or a pawn
    # move) and fivefold repetition end a game without a claim: python-chess's is_game_over()
    fens = ['7k/8/8/8/8/8/8/R6K w - - 149 100', '7k/8/8/8/8/8/8/R6K w - - 150 100',
            '7k/5Q2/6K1/8/8/8/8/8 b - - 0 1', 'R6k/8/6K1/8/8/8/8/8 b - - 0 1', 'k7/8/8/8/8/8/8/K1N5 w - - 0 1',
            'k7/8/8/8/8/8/8/K1R5 w - - 0 1']
    boards = [chess.Board(f) for f in fens]
    for repeats in (2, 4):  # knights out and back: the start position a third time (a draw to
        board = chess.Board()  # claim, not an end), then a fifth
        for _ in range(repeats):
            for san in ('Nf3', 'Nf6', 'Ng1', 'Ng8'):
                board.push_san(san)
        boards.append(board)
    ends = []
    for b in boards:
        ends.append(D._game_over(b, list(b.legal_moves)))
        assert ends[-1] == b.is_game_over(), b.fen()
    assert ends == [False, True, True, True, True, False, False, True]


def test_chess_next_char_counts_match_naive_definition():
    # random games cut at 256 characters, and whole games to their end (mate, stalemate, the
    # automatic draws): the counts, normalised, are the naive definition's distributions
    games = [D.random_game(s, 256) for s in range(3)] + [D.random_game(s, 4000) for s in (100, 104)]
    assert any(len(t) < 4000 and t.endswith('#') for t in games[3:])  # one ends in mate (seed 104)
    for t in games:
        counts = D.chess_next_char_counts(t)
        assert counts.dtype == np.uint8
        torch.testing.assert_close(D.chess_next_char_distributions(t), naive_next_char_distributions(t))


def test_chess_soft_targets_kept_with_the_data(tmp_path):
    # made once from train.pt, in chunks of games over processes, loaded again when
    # train.pt is unchanged, remade when it changes; refused for games that are not random
    cfg = D.DataConfig(game='chess', n_games=12, n_val=4, max_chars=64, n_label_games=2, workers=1,
                       data_dir=str(tmp_path))
    D.prepare(cfg, log=lambda s: None)
    lines = []
    counts = D.load_chess_soft_targets(str(tmp_path), workers=2, log=lines.append)
    tokens = D.load_data('chess', 'train', str(tmp_path))['tokens']
    assert counts.shape == (12, 64, len(D.CHESS_ITOS)) and counts.dtype == torch.uint8
    for g in range(12):
        text = D.decode_chess(tokens[g])
        assert torch.equal(counts[g, :len(text)], torch.from_numpy(D.chess_next_char_counts(text)))
        assert not counts[g, len(text):].any()
    # in chunks over 2 processes (3 chunks: the pool runs) the same counts as in one chunk here
    assert torch.equal(D.chess_soft_target_counts(tokens, workers=2, progress=lambda _: None, chunk=5), counts)
    assert torch.equal(D.load_chess_soft_targets(str(tmp_path), log=lines.append), counts)
    assert 'made from this' in lines[-1]
    D.prepare(dataclasses.replace(cfg, seed=7), log=lambda s: None)
    remade = D.load_chess_soft_targets(str(tmp_path), log=lines.append)
    assert any('stale' in line for line in lines[-3:]) and not torch.equal(remade, counts)
    train_path = D.data_paths('chess', str(tmp_path))['train']
    obj = torch.load(train_path, weights_only=True)
    for source in ('stockfish', '/games/lichess.pgn'):  # a PGN file's games are not random either
        obj['config']['source'] = source
        torch.save(obj, train_path)
        with pytest.raises(D.UserError, match=f"needs random games: .* holds games from '{source}'"):
            D.load_chess_soft_targets(str(tmp_path), log=lambda s: None)


def test_chess_next_char_distributions_match_brute_force_enumeration():
    games = brute_force_next_chars(3)  # 8902 games of three plies: no game ends that soon
    stoi = {c: k for k, c in enumerate(D.CHESS_ITOS)}
    for text, _ in [games[0], games[4000], games[-1], max(games, key=lambda g: len(g[0]))]:
        rows = D.chess_next_char_distributions(text[:-1])
        for i in range(len(text) - 1):  # up to the row after the third move's last character
            prefix = text[:i + 1]
            mass = {}
            for t, p in games:
                if t.startswith(prefix):
                    mass[t[i + 1]] = mass.get(t[i + 1], 0.0) + p
            want = torch.zeros(len(D.CHESS_ITOS), dtype=torch.float64)
            for c, p in mass.items():
                want[stoi[c]] = p
            torch.testing.assert_close(rows[i].double(), want / want.sum(), atol=1e-6, rtol=0,
                                       msg=f'{text!r} row {i}')


def test_chess_next_char_distributions_known_answers_and_invariants():
    stoi = {c: k for k, c in enumerate(D.CHESS_ITOS)}
    # fool's mate: the mate is the only 'Qh4' move, and after the '#' the game is over
    rows = D.chess_next_char_distributions(';1.f3 e5 2.g4 Qh4#')
    assert rows[-2, stoi['#']] == 1 and rows[-1, D.CHESS_PAD_ID] == 1
    # both castlings legal: after 'O-O' the move may be over (a space) or go on as 'O-O-O'
    t = ';1.e4 a6 2.Nf3 a5 3.Be2 a4 4.d4 h6 5.Be3 h5 6.Nc3 b6 7.Qd2 b5 8.O-O-O'
    board = chess.Board()
    for san in D.transcript_to_moves(t, last_is_complete=True)[:-1]:
        board.push_san(san)
    legal = [board.san(m) for m in board.legal_moves]
    assert 'O-O' in legal and 'O-O-O' in legal
    row = D.chess_next_char_distributions(t)[t.index('O-O-O') + 2]  # the row after the typed 'O-O'
    assert row[stoi[' ']] == row[stoi['-']] == 0.5
    # random games cut at 256 characters: rows sum to 1, the played character is possible, and
    # the characters of move numbers and the dot after them are one-hot
    for seed in range(3):
        t = D.random_game(seed, 256)
        rows = D.chess_next_char_distributions(t)
        torch.testing.assert_close(rows.sum(1), torch.ones(len(t)))
        nxt = torch.tensor([stoi[c] for c in t[1:]])
        assert (rows[torch.arange(len(t) - 1), nxt] > 0).all()
        for m in re.finditer(r'(?<=[; ])\d+\.', t):  # a move number and its dot
            for j in range(m.start(), m.end()):
                assert rows[j - 1, stoi[t[j]]] == 1, (t, j)
    with pytest.raises(D.DataError, match='cannot follow'):
        D.chess_next_char_distributions(';1.e5')


def test_encode_decode():
    ts = [';1.e4 e5 2.Nf3', ';1.d4']
    x = encode_chess(ts, 10, CHESS_PAD_ID)
    assert x.dtype == torch.long and x.shape == (2, 10)
    assert x[0, 0].item() == CHESS_CHARS.index(';') and x[1, 5:].eq(CHESS_PAD_ID).all()
    assert decode_chess(x[0]) == ts[0][:10] and decode_chess(x[1]) == ts[1]
    with pytest.raises(DataError):
        encode_chess([';1.e4 !'], 10, CHESS_PAD_ID)

def test_move_boundaries():
    assert move_boundaries(';1.e4 e5 2.Nf3') == [3, 6, 11]
    t = random_game(2, 256)
    for i in move_boundaries(t):
        assert t[i - 1] in '. ' and t[i] not in ' .'

def test_legal_move_text_agrees_with_parse_san():
    # the quick refusal by destination square never changes an answer: against parse_san alone,
    # on every legal SAN and on texts one character away from one, in a few random positions
    rng = random.Random(0)
    for plies in (0, 25, 60):
        board = chess.Board()
        for _ in range(plies):
            board.push(rng.choice(list(board.legal_moves)))
        texts = {board.san(m) for m in board.legal_moves}
        texts |= {t[:i] + c + t[i + 1:] for t in list(texts) for i in range(len(t)) for c in 'a1Nx+'}
        texts |= {'O-O', '0-0', 'O-O-O', '--', 'Z0', '0000', 'e9', 'Qxh8=Q', 'exd8=N#'}

        def plain(text):
            try:
                return bool(board.parse_san(text))
            except ValueError:
                return False
        for text in texts:
            assert D.legal_move_text(board, text) == plain(text), (board.fen(), text)


def test_is_legal_continuation():
    assert is_legal_continuation(';1.', 'e4 e5')
    assert not is_legal_continuation(';1.', 'e5 e4')
    assert not is_legal_continuation(';1.', 'Nf4')
    assert is_legal_continuation(';1.e4 ', 'e5 2.Nf3')
    assert not is_legal_continuation(';1.e4 ', 'Ke7x')
    assert is_legal_continuation(';1.e4 e5 ', '2.Nf3 Nc6')
    assert not is_legal_continuation(';1.e4 e5 ', 'Nf3')      # the move number is missing
    assert not is_legal_continuation(';1.e4 e5 ', '3.Nf3')    # the wrong move number
    assert not is_legal_continuation(';1.e4 e5 2.', '--')     # a null move is not a move
    assert not is_legal_continuation(';1.e4 e5 2.', '')
    assert is_legal_continuation(';1.e4 e5 2.', 'Nf3+')       # lenient about the check sign
    assert not is_legal_continuation(';1.e4 e5 2.', 'Nf3+', strict=True)
    assert is_legal_continuation(';1.e4 e5 2.', 'Nf3', strict=True)
    t = random_game(7, 512)
    bounds = move_boundaries(t)
    for i in bounds[:-1]:  # every real move of a game is a legal continuation
        assert is_legal_continuation(t[:i], t[i:])
    with pytest.raises(DataError):
        is_legal_continuation(';1.e5 ', 'e5')


# ------------------------------------------------------------------------------------------------
# The model

def tiny_model(vocab=61, T=16, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=T, n_layer=3, n_head=2, n_embd=32, pad_id=vocab - 1))


def test_model_is_causal():
    model = tiny_model().eval()
    x = torch.randint(0, 60, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 60
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert model.lm_head.weight is model.wte.weight  # the head is the embedding, tied (as nanoGPT)


def test_gpt_init_parameter_count_and_flops_per_token():
    # GPT-2's init: every matrix N(0, 0.02), but the two that write into the residual stream (the
    # attention's and the MLP's proj) N(0, 0.02 / sqrt(2 n_layer)); biases zero
    torch.manual_seed(0)
    L, d, V, T = 4, 128, 61, 59
    model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=d))
    proj = [name for name, _ in model.named_parameters() if name.endswith('proj.weight')]
    assert len(proj) == 2 * L
    for name, p in model.named_parameters():
        if name.endswith('.bias'):
            assert not p.any(), name
        elif p.dim() == 2:
            want = 0.02 / math.sqrt(2 * L) if name in proj else 0.02
            assert p.std().item() == pytest.approx(want, rel=0.05), name
    # parameters counted by hand (the head is the token embedding; the position embedding, a
    # lookup, is left out): 2 LayerNorms, qkv, attention proj, MLP fc and proj per block, ln_f
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    n = V * d + L * per_block + 2 * d
    assert model.n_params() == n
    assert model.flops_per_token() == 6 * n + 12 * L * d * T


def test_dropout_is_off_in_eval_mode_and_the_context_is_checked():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    x = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])  # training: dropout draws anew
        model.eval()
        assert torch.equal(model(x)[0], model(x)[0])
    with pytest.raises(AssertionError, match='sequence of 17 tokens exceeds the context 16'):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_residual_replacement_with_itself_is_exact_and_zero_changes_it():
    model = tiny_model().eval()
    x = torch.randint(0, 60, (3, 16))
    with torch.no_grad():
        clean = model(x)[0]
        for layer in range(3):
            r = model.residual(x, layer)
            assert r.shape == (3, 16, 32)
            assert torch.allclose(model.forward_from(r, layer)[0], clean, atol=1e-5)
        assert not torch.allclose(model.forward_from(torch.zeros_like(r), 1)[0], clean)
        assert model.mlp_hidden(x, 1).shape == (3, 16, 128)
        hidden, r = model.mlp_hidden(x, 1, with_residual=True)  # one pass, both: the same tensors
        assert torch.equal(hidden, model.mlp_hidden(x, 1)) and torch.equal(r, model.residual(x, 1))
        # -1 (a saved config's "default depth") or a layer past the last is an error, not the
        # embeddings or the last block's stream
        for layer in (-1, 3):
            for read in (lambda: model.residual(x, layer), lambda: model.forward_from(r, layer),
                         lambda: model.mlp_hidden(x, layer)):
                with pytest.raises(ValueError, match=f'layer {layer} is not a block of this 3-block model'):
                    read()


def test_features_at_equals_the_whole_forward_pass_indexed():
    import evaluate
    model = tiny_model().eval()
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 60, (9, 17), generator=gen)  # (games, T + 1)
    games = torch.randint(0, 9, (40,), generator=gen)
    positions = torch.randint(0, 12, (40,), generator=gen)  # every game cut before position 16
    with torch.no_grad():
        whole = model.residual(tokens[:, :-1], 1)  # (9, 16, d)
    for batch_size in (1, 2, 64):  # batches cut at different lengths; games repeated and unsorted
        got = evaluate.features_at(lambda x: model.residual(x, 1), tokens, games, positions, batch_size, 'cpu')
        assert torch.allclose(got, whole[games, positions], atol=1e-5)


def test_loss_ignores_pad_targets():
    model = tiny_model().eval()
    x = torch.randint(0, 60, (2, 16))
    y = torch.randint(0, 60, (2, 16))
    y2 = y.clone()
    y2[:, 8:] = 60  # pad
    logits, _ = model(x)
    manual = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 61), y[:, :8].reshape(-1))
    assert torch.allclose(model(x, y2)[1], manual, atol=1e-6)


def test_soft_target_loss_matches_hard_and_its_expectation():
    model = tiny_model().eval()
    x = torch.randint(0, 60, (2, 16))
    y = torch.randint(0, 60, (2, 16))
    one_hot = torch.nn.functional.one_hot(y, 61).float()
    assert torch.allclose(model(x, one_hot)[1], model(x, y)[1], atol=1e-6)  # a point mass is the hard loss
    with torch.autocast('cpu', dtype=torch.bfloat16):  # bf16 logits: both losses take them in fp32
        assert torch.allclose(model(x, one_hot)[1], model(x, y)[1], atol=1e-6)
    # a distribution gives the expected hard loss over its tokens; all-zero rows are ignored
    soft = torch.zeros(2, 16, 61)
    soft[:, :, 3], soft[:, :, 7] = 0.25, 0.75
    soft[1, 5:] = 0
    logp = torch.log_softmax(model(x)[0], -1)
    keep = torch.ones(2, 16, dtype=torch.bool)
    keep[1, 5:] = False
    expected = -(0.25 * logp[..., 3] + 0.75 * logp[..., 7])[keep].mean()
    assert torch.allclose(model(x, soft)[1], expected, atol=1e-6)


def shapes_from_the_data(counter):
    """The nodes of the graphs a CompileCounterWithBackend traced whose shape depends on the
    values of the data (a boolean-mask index, nonzero): on a GPU the host waits for each, at every
    step. fullgraph=True does not catch them: torch traces them with a symbol for the size."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    return [node.format_node() for gm in counter.graphs for node in gm.graph.nodes
            if isinstance(node.meta.get('example_value'), torch.Tensor) and free_unbacked_symbols(node.meta['example_value'])]


def test_lm_training_step_compiles_as_one_graph():
    # fullgraph=True fails at any graph break, which is where a step would read a value on the
    # host; shapes_from_the_data finds the waits it lets through. Soft targets, as the gpu presets
    # train (hard ones: cross_entropy's ignore_index takes no shape from the data). The loss and
    # the gradients are the eager ones
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    model = tiny_model(seed=3)
    x = torch.randint(0, 60, (2, 16))
    y = torch.randint(0, 60, (2, 16))
    y = torch.nn.functional.one_hot(y, 61).float() * 0.5 + torch.nn.functional.one_hot((y + 1) % 60, 61) * 0.5
    y[1, 9:] = 0  # ignored rows (after the game)
    # eager, the whole model compiled, and train.py --compile's blocks compiled one by one (last:
    # it changes what the model's forward runs)
    blocks = CompileCounterWithBackend('aot_eager')
    keys = list(model.state_dict())
    losses, grads = [], []
    for make in (lambda: model, lambda: torch.compile(model, backend=counter, fullgraph=True),
                 lambda: model.compile_blocks(backend=blocks, fullgraph=True)):
        fwd = make()
        model.zero_grad()
        loss = fwd(x, y)[1]
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.wte.weight.grad.clone())
    assert counter.frame_count == 1 and shapes_from_the_data(counter) == [] and torch.isfinite(losses[0])
    # one trace for all three blocks, and the same weights saved
    assert blocks.frame_count == 1 and len(model.blocks) == 3 and list(model.state_dict()) == keys
    # train.py's evals (no_grad, eval mode) run the plain blocks: no second trace for inference,
    # which the compiled blocks would need, and the same loss
    model.eval()
    with torch.no_grad():
        eval_loss = model(x, y, compiled=False)[1]
        assert blocks.frame_count == 1
        torch.testing.assert_close(eval_loss, losses[0], rtol=1e-5, atol=1e-6)
        model(x, y)  # the compiled blocks, for contrast: they trace again
        assert blocks.frame_count == 2
    model.train()
    for i in (1, 2):
        torch.testing.assert_close(losses[i], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[i], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('sae_batch', [256, 4096])
def test_activation_stream_holds_the_residuals_of_real_positions_only(sae_batch):
    # sae_batch 4096: 256 games a model pass (the gpu presets' rule), 256: 64. Every buffered
    # row is the residual stream at a non-pad position of some game, none at a pad, and a stream
    # restarted from its state gives the same batches
    import train as TR
    model = tiny_model(seed=4).eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 60, (300, 17), generator=g)
    for i, length in enumerate(torch.randint(2, 17, (300,), generator=g).tolist()):
        tokens[i, length:] = 60  # the pad after each game
    with torch.no_grad():
        resid = model.residual(tokens[:, :-1], 1)  # (300, 16, d)
    real = tokens[:, :-1] != 60
    cfg = TR.TrainConfig(sae_batch=sae_batch, sae_buffer=2 * sae_batch, device='cpu', dtype='float32')
    stream = TR.ActivationStream(model, tokens, 1, 60, cfg, seed=0)
    batches = [next(stream) for _ in range(3)]  # the third refills the buffer
    assert all(b.shape == (sae_batch, 32) for b in batches) and len(stream.buffer) >= 2 * sae_batch
    exact = dict(compute_mode='donot_use_mm_for_euclid_dist')  # cdist's matmul form rounds to 1e-4
    for rows in (batches[0], stream.buffer):
        assert torch.cdist(rows, resid[real], **exact).min(1).values.max() < 1e-5
        assert torch.cdist(rows, resid[~real], **exact).min(1).values.min() > 1e-2
    again = TR.ActivationStream(model, tokens, 1, 60, cfg, seed=0, state=stream.state())
    assert torch.equal(next(again), next(stream))
    # shuffled across the games of the buffer: neighbouring rows of a batch come from the same
    # game about as often as any two rows do (a buffer of ~64 games), not ~80% of the time as
    # the rows of game after game would
    game_of_row = torch.arange(300)[:, None].expand(300, 16)[real]  # (n_real,)
    game = game_of_row[torch.cdist(batches[0], resid[real], **exact).argmin(1)]  # (sae_batch,)
    assert (game[1:] == game[:-1]).float().mean() < 0.2
    # and its games drawn from all 300, not the first of the set in turn (a model pass reads
    # max(64, sae_batch / 16) games)
    per_pass = max(64, sae_batch // 16)
    in_buffer = game_of_row[torch.cdist(stream.buffer, resid[real], **exact).argmin(1)]
    assert (in_buffer >= per_pass).any() and (in_buffer < per_pass).any()


def test_the_default_layer_is_the_papers_relative_depth_and_layer_0_stays():
    import train as TR
    for n in (1, 3, 4, 5, 7, 8, 9, 12):  # (depths with no tie between two blocks)
        block = min(range(1, n + 1), key=lambda b: abs(b / n - 6 / 8))  # 1-based, nearest to 6 of 8
        assert TR.default_layer(n) == block - 1, n
    assert TR.build_config(['--preset=tiny']).layer == TR.default_layer(2)  # -1 resolved
    cfg = TR.build_config(['--preset=tiny', '--layer=0'])
    assert cfg.layer == 0 and TR.resolved_layer(cfg, 4) == 0  # block 0 is a block, not the default


def test_lm_step_clips_the_gradient_to_its_norm():
    # with plain SGD at lr 1 the step moves the weights by the clipped gradient: norm grad_clip
    import train as TR
    model = tiny_model(seed=2)
    x, y = torch.randint(0, 60, (4, 16)), torch.randint(0, 60, (4, 16))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    TR.lm_step(model, optimizer, scaler, contextlib.nullcontext, x, y, grad_clip=1e-3)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm()
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)


def test_holds_model_only_for_the_same_config_and_weights(tmp_path):
    import train as TR
    path = str(tmp_path / 'model_random.pt')
    model = tiny_model(seed=3)
    assert not TR.holds_model(path, model)  # no file
    save_checkpoint(path, model, 'othello', {'iter': 0})
    assert TR.holds_model(path, model) and TR.holds_model(path, tiny_model(seed=3))
    assert not TR.holds_model(path, tiny_model(seed=4))  # another seed: other weights
    torch.manual_seed(3)
    wider = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=3, n_head=2, n_embd=64, pad_id=60))
    assert not TR.holds_model(path, wider)


def test_tiny_lm_overfits_one_batch():
    model = tiny_model(seed=1)
    x = torch.randint(0, 60, (4, 16))
    y = torch.randint(0, 60, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        loss = model(x, y)[1]
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.1


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model(seed=2).eval()
    path = str(tmp_path / 'model.pt')
    save_checkpoint(path, model, 'othello', {'iter': 5})
    loaded, ckpt = load_checkpoint(path, 'othello')
    assert loaded.config == model.config and ckpt['iter'] == 5
    x = torch.randint(0, 60, (2, 16))
    assert torch.equal(loaded(x)[0], model(x)[0])
    with pytest.raises(D.UserError, match='is a model of othello, not chess'):
        load_checkpoint(path, 'chess')
    (tmp_path / 'bad.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(D.UserError, match='corrupt'):
        load_checkpoint(str(tmp_path / 'bad.pt'), 'othello')
    with pytest.raises(D.UserError, match='not found'):
        load_checkpoint(str(tmp_path / 'missing.pt'), 'othello')
    (tmp_path / 'model_random.pt').write_bytes(b'not a checkpoint')  # the control's model: the SAE stage writes it
    with pytest.raises(D.UserError, match='model_random.pt is corrupt .*`python train.py --game othello --stage sae`'):
        load_checkpoint(str(tmp_path / 'model_random.pt'), 'othello')
    # the right format tag over contents this code's GPT does not take (another version's, or
    # edited by hand): one line each, naming the file
    good = torch.load(path, weights_only=True)
    for edit, message in ((lambda c: c.pop('model'), 'lacks model'), (lambda c: c.pop('iter'), 'lacks iter'),
                          (lambda c: c['model_config'].update(bias=False), "unexpected keyword argument 'bias'"),
                          (lambda c: c['model'].pop('wte.weight'), 'Missing key')):
        bad = copy.deepcopy(good)
        edit(bad)
        D.atomic_save(bad, str(tmp_path / 'edited.pt'))
        with pytest.raises(D.UserError, match=f'edited.pt .*{message}.*: run `python train.py --game othello'):
            load_checkpoint(str(tmp_path / 'edited.pt'), 'othello')


# ------------------------------------------------------------------------------------------------
# train.py and data.py end to end, and their errors

def test_train_tiny_othello_then_resume(tmp_path, capsys):
    # in this process (test_tiny_pipeline_end_to_end runs train.py's command line): a new python
    # costs several seconds of imports each time on a 2-core machine
    import train as TR
    common = ['train.py', '--game=othello', '--preset=tiny', '--stage', 'lm',
              f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    path = f'{tmp_path}/out/othello/model.pt'
    TR.main(common[1:] + ['--max_iters=40', '--soft_targets=True'])
    out = capsys.readouterr().out
    assert 'legal-move rate' in out and 'soft targets: legal moves of' in out
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['iter'] == 40 and 0 <= ckpt['legal_move_rate'] <= 1
    assert ckpt['train_config']['max_iters'] == 40
    # one more iteration from the checkpoint moves each weight by at most about the lr (Adam), far
    # less than a fresh model differs from it; and AdamW counts on from its loaded 40 steps
    # (an --lm_minutes that never binds: a finished run goes on with a higher --max_iters)
    TR.train_lm(TR.build_config(common[1:] + ['--max_iters=41', '--resume', '--dtype=float32', '--lm_minutes=60']),
                log=lambda s: None)
    one_more = torch.load(path, weights_only=True)
    assert one_more['iter'] == 41 and one_more['model'].keys() == ckpt['model'].keys()
    moved = max((one_more['model'][k] - v).abs().max().item() for k, v in ckpt['model'].items())
    fresh = TR.GPT(TR.GPTConfig(**ckpt['model_config'])).state_dict()
    fresh_gap = max((fresh[k] - v).abs().max().item() for k, v in ckpt['model'].items())
    assert moved < 2 * ckpt['train_config']['lr'] < fresh_gap / 10
    assert {float(s['step']) for s in one_more['optimizer']['state'].values()} == {41.0}
    TR.main(common[1:] + ['--max_iters=60', '--resume', '--lm_minutes=60'])
    out = capsys.readouterr().out
    assert 'resuming' in out and 'from iter 41' in out
    assert 'iter 60/60' in out and 'iter 20/60' not in out  # continued from 41, not restarted
    final = torch.load(path, weights_only=True)
    assert final['iter'] == 60
    # AdamW counts its steps on from the loaded state: 41 + 19, not 19
    assert {float(s['step']) for s in final['optimizer']['state'].values()} == {60.0}
    # the final val loss: the mean over eval_iters batches of val games drawn from their own seed
    # (seed + 1), in eval mode and fp32; the legal-move rate: the first legal_games val games, in
    # the training's precision
    cfg = TR.TrainConfig(**final['train_config'])
    model = load_checkpoint(path, 'othello')[0].eval()
    tokens = {split: D.load_data('othello', split, f'{tmp_path}/data')['tokens'][:, :cfg.block_size + 1]
              for split in ('train', 'val')}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        want = [model(*TR.lm_batch(tokens['val'], None, cfg, gen))[1].item() for _ in range(cfg.eval_iters)]
    assert cfg.eval_iters > 1 and final['val_loss'] == pytest.approx(sum(want) / len(want), abs=1e-6)
    with TR.autocast_for(cfg)():
        rates = {split: metrics.legal_move_rate(model, 'othello', t[:cfg.legal_games]) for split, t in tokens.items()}
    assert final['legal_move_rate'] == rates['val'] != rates['train']


def test_a_run_resumes_only_on_the_data_it_began_on(tmp_path, monkeypatch, capsys):
    # the LM's checkpoint and the sweep's keep the digest of the training games (and the options
    # they were made with, to say what differs): data made again with other games, --resume
    # refuses; with the same games (other labels, other options that make the same games), it goes on
    common = ['--game=othello', '--preset=tiny', '--workers=1', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    TR.main(common + ['--stage=lm', '--max_iters=20', '--eval_interval=10'])
    remake = lambda **kw: D.prepare(D.DataConfig(**{**dict(game='othello', n_games=2000, n_val=200, n_label_games=100,
                                                          workers=1, data_dir=str(tmp_path / 'data')), **kw}),
                                    log=lambda _: None)
    remake(n_games=1000)
    before = files_under(tmp_path / 'out')
    code, err = run_main(TR.main, common + ['--stage=lm', '--max_iters=30', '--resume'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'model.pt began on other training games than', '(--n_games=2000 there, 1000 here)',
                    'or run without --resume')
    assert files_under(tmp_path / 'out') == before
    remake(n_label_games=50, workers=2)  # the 2000 games again (data.py's --max_chars too), fewer labelled
    TR.main(common + ['--stage=lm', '--max_iters=30', '--resume'])
    assert torch.load(tmp_path / 'out' / 'othello' / 'model.pt', weights_only=True)['iter'] == 30
    # the sweep: its checkpoint on these games, then the same options with other games (as a
    # changed .pgn gives), then other options
    out = tmp_path / 'out' / 'othello'
    train = D.load_data('othello', 'train', str(tmp_path / 'data'))
    saved = {'format': TR.SWEEP_FORMAT, 'version': TR.SWEEP_VERSION, 'part': 'saes', 'done': None, 'state': {},
             'model_sha256': D.file_digest(str(out / 'model.pt')), 'options': TR.sweep_options(TR.build_config(common)),
             'data_config': train['config'], 'data_sha256': 'another'}
    D.atomic_save(saved, str(out / 'sae_sweep.pt'))
    code, err = run_main(TR.main, common + ['--stage=sae', '--resume'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'sae_sweep.pt began on other training games', 'made with the same options: a changed .pgn?')
    D.atomic_save({**saved, 'data_sha256': D.tokens_digest(train['tokens'])}, str(out / 'sae_sweep.pt'))
    remake(seed=7)
    code, err = run_main(TR.main, common + ['--stage=sae', '--resume'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'sae_sweep.pt began on other training games', '(--seed=1337 there, 7 here)')


def test_muon_resumes_only_with_muon(tmp_path):
    import train as TR
    common = ['--game=othello', '--preset=tiny', '--stage=lm', f'--data_dir={tmp_path}/data',
              f'--out_dir={tmp_path}/out', '--dtype=float32', '--optimizer=muon']
    TR.train_lm(TR.build_config(common + ['--max_iters=10']), log=lambda s: None)
    with pytest.raises(D.UserError, match='trained with --optimizer=muon: resume with it'):
        TR.train_lm(TR.build_config(common[:-1] + ['--max_iters=12', '--resume']), log=lambda s: None)
    TR.train_lm(TR.build_config(common + ['--max_iters=12', '--resume']), log=lambda s: None)
    ckpt = torch.load(f'{tmp_path}/out/othello/model.pt', weights_only=True)
    assert ckpt['iter'] == 12 and ckpt['train_config']['optimizer'] == 'muon'
    # every parameter's state, Muon's momentum and AdamW's moments alike, counts on from 10 to 12
    assert {float(s['step']) for s in ckpt['optimizer']['state'].values()} == {12.0}
    assert sum('momentum_buffer' in s for s in ckpt['optimizer']['state'].values()) == 4 * 2  # 4 matrices a block


@pytest.mark.parametrize('shape', [(16, 48), (48, 16), (24, 40)])
def test_orthogonalize_keeps_the_singular_vectors_and_evens_the_values(shape):
    from model import orthogonalize
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G[:, 0] *= 30  # a lopsided gradient: one direction far stronger than the rest
    O = orthogonalize(G)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    inner = U.T @ O @ Vh.T  # diagonal when O has G's singular vectors
    assert (inner - torch.diag(torch.diag(inner))).abs().max() < 1e-6
    # every singular value, 30x apart in G, lands in about [0.7, 1.2]
    assert 0.6 < torch.diag(inner).min() and torch.diag(inner).max() < 1.25
    # a stack of matrices (Muon's same-shaped ones): each as on its own
    stack = torch.stack([G, torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)])
    torch.testing.assert_close(orthogonalize(stack), torch.stack([orthogonalize(g) for g in stack]), rtol=1e-12, atol=1e-12)


def test_muon_steps_follow_its_nesterov_formula():
    # two steps on one matrix with chosen gradients, against the docstring's formula:
    # buf = mu buf + g; u = g + mu buf; W <- W - lr wd W - lr 0.2 sqrt(max(m, n)) orthogonalize(u)
    from model import Muon, orthogonalize
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(8, 4, generator=g))
    grads = [torch.randn(8, 4, generator=g) for _ in range(2)]
    lr, wd, mu = 0.01, 0.1, 0.95
    optimizer = Muon([{'params': [W], 'muon': True, 'weight_decay': wd}], lr=lr, momentum=mu)
    want, buf = W.detach().clone(), torch.zeros(8, 4)
    for grad in grads:
        W.grad = grad.clone()
        optimizer.step()
        buf = mu * buf + grad
        want = want * (1 - lr * wd) - lr * 0.2 * math.sqrt(8) * orthogonalize((grad + mu * buf)[None])[0]
    torch.testing.assert_close(W.detach(), want, rtol=1e-5, atol=1e-6)


def test_muon_is_adamw_off_the_blocks_and_takes_adamw_sized_steps_on_them():
    from model import GPT, GPTConfig, orthogonalize
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, block_size=10, n_layer=2, n_head=2, n_embd=32, pad_id=11))
    twin = GPT(GPTConfig(vocab_size=12, block_size=10, n_layer=2, n_head=2, n_embd=32, pad_id=11))
    twin.load_state_dict(model.state_dict())
    lr = 1e-2
    muon = model.configure_optimizer(lr, 0.1, kind='muon')
    adamw = twin.configure_optimizer(lr, 0.1)
    x = torch.randint(0, 11, (4, 10), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for m, opt in ((model, muon), (twin, adamw)):
        m(x, x)[1].backward()
        opt.step()
    twin_params = dict(twin.named_parameters())
    grads = {name: p.grad for name, p in twin.named_parameters()}  # the same gradients Muon took
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith('blocks.'):  # one step of Muon: about AdamW's typical RMS, 0.2 lr
            rms = (p - before[name] * (1 - lr * 0.1)).pow(2).mean().sqrt().item()
            assert 0.12 * lr < rms < 0.25 * lr, (name, rms / lr)
            # the docstring's step for this matrix on its own (the first: the momentum buffer is the
            # gradient), though Muon orthogonalises the blocks' same-shaped matrices as one stack
            want = before[name] * (1 - lr * 0.1) - lr * 0.2 * max(p.shape) ** 0.5 * orthogonalize(grads[name] * 1.95)
            torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-6)
        else:  # everything else (embeddings, LayerNorms, biases): exactly as torch.optim.AdamW
            torch.testing.assert_close(p, twin_params[name], rtol=1e-6, atol=1e-7)


def fake_matmul_timer(bf16_speedup):
    """A stand-in for model.matmul_seconds: bf16 runs `bf16_speedup` times as fast as fp32.
    Records the calls, so a test can see which shapes were timed."""
    calls = []

    def timer(dtype, rows, width, reps):
        calls.append((dtype, rows))
        return 1e-3 * rows / (bf16_speedup if dtype == torch.bfloat16 else 1.0)
    return timer, calls


@pytest.mark.parametrize('speedup, want', [(0.03, 'float32'), (0.9, 'float32'), (1.05, 'float32'),
                                           (1.5, 'bfloat16'), (3.0, 'bfloat16')])
def test_auto_precision_takes_bf16_only_where_measured_faster(speedup, want):
    from model import BF16_MARGIN
    assert BF16_MARGIN > 1.05  # the (1.05, float32) case is a near tie: fp32 wins it
    timer, calls = fake_matmul_timer(speedup)
    dtype, reason = choose_precision('auto', 'cpu', 128, rows=4096, timer=timer)
    assert dtype == want and f'{speedup:.2f}x' in reason
    if speedup < 0.5:  # clearly slower on the small probe: the real shape is never timed in bf16
        assert max(rows for d, rows in calls if d == torch.bfloat16) <= 256
    else:  # a close call is timed again at the model's shape (at most 1024 rows)
        assert (torch.bfloat16, 1024) in calls
    # an explicit bf16 is kept, with a warning where it is slower; explicit fp32 times nothing
    dtype, reason = choose_precision('bfloat16', 'cpu', 128, timer=timer)
    assert dtype == 'bfloat16' and (('warning' in reason) == (speedup < 1))
    timer, calls = fake_matmul_timer(speedup)
    assert choose_precision('float32', 'cpu', 128, timer=timer)[0] == 'float32' and not calls
    with pytest.raises(D.UserError, match='--dtype=float16 is for CUDA'):
        choose_precision('float16', 'cpu', 128, timer=timer)


def test_auto_precision_is_not_flipped_by_one_stalled_timing():
    # a small matmul's timing can be stalled several times over (a context switch): best of 3 both
    # ways, so one stall in the probe's bf16 timings still finds bf16 twice as fast
    stalls = [10.0]  # the first bf16 matmul timed takes 10x its time, the rest none

    def timer(dtype, rows, width, reps):  # best of `reps` timings, as model.matmul_seconds
        if dtype == torch.float32:
            return 1e-3 * rows
        return min(0.5e-3 * rows * (stalls.pop(0) if stalls else 1.0) for _ in range(reps))
    dtype, reason = choose_precision('auto', 'cpu', 32, timer=timer)
    assert dtype == 'bfloat16' and '2.00x' in reason and not stalls


@pytest.mark.parametrize('bf16_units, auto, forced_bf16_warns', [(True, 'bfloat16', False), (False, 'float16', True)])
def test_choose_precision_on_cuda_reads_the_bf16_units(bf16_units, auto, forced_bf16_warns, monkeypatch):
    # a GPU without bf16 units (T4, V100) gets fp16 with a gradient scaler, never emulated bf16:
    # the emulation that torch.cuda.is_bf16_supported() counts by default is not asked for
    asked = []
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: asked.append(
        including_emulation) or bf16_units)
    # choose_precision turns TF32 on; restored by hand, as monkeypatch (pytest 9.2) cannot undo
    # a setting that torch's cuBLAS module keeps outside its __dict__
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        assert choose_precision('auto', 'cuda', 128)[0] == auto and asked == [False]
        dtype, reason = choose_precision('bfloat16', 'cuda', 128)
        assert dtype == 'bfloat16' and ('warning' in reason) == forced_bf16_warns
        assert choose_precision('float16', 'cuda', 128)[0] == 'float16'
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_wait_for_waits_for_the_gpu_it_names(monkeypatch):
    # a clock read after wait_for counts a GPU's queued work: CUDA's of that device, MPS's; a CPU
    # has no queue
    import model as M
    waited = []
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: waited.append(('cuda', device)))
    monkeypatch.setattr(torch.mps, 'synchronize', lambda: waited.append(('mps', None)))
    for device in ('cpu', 'cuda:1', 'mps'):
        M.wait_for(device)
    assert waited == [('cuda', 'cuda:1'), ('mps', None)]


@pytest.mark.parametrize('speedup, want', [(0.05, 'float32'), (2.0, 'bfloat16')])
def test_train_saves_the_measured_precision_in_the_checkpoint(speedup, want, tmp_path, monkeypatch):
    import model as M
    import train as TR
    monkeypatch.setattr(M, 'matmul_seconds', fake_matmul_timer(speedup)[0])
    TR.main(['--game=othello', '--preset=tiny', '--stage=lm', '--max_iters=3', '--eval_iters=1',
             '--legal_games=2', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'])
    ckpt = torch.load(f'{tmp_path}/out/othello/model.pt', weights_only=True)
    assert ckpt['precision']['dtype'] == ckpt['train_config']['dtype'] == want
    assert f'{speedup:.2f}x as fast in bf16' in ckpt['precision']['reason']


def test_the_lm_trains_in_train_mode_after_each_eval(tmp_path, monkeypatch, capsys):
    # the val loss is measured in eval mode (no dropout); training goes on in train mode
    modes, lm_step = [], TR.lm_step

    def recording(fwd, *args, **kw):
        modes.append(fwd.training)
        return lm_step(fwd, *args, **kw)

    monkeypatch.setattr(TR, 'lm_step', recording)
    TR.main(['--preset=tiny', '--stage=lm', '--n_layer=1', '--n_embd=16', '--batch_size=4', '--dropout=0.1',
             '--max_iters=6', '--eval_interval=2', '--eval_iters=1', '--n_games=100', '--n_val=20',
             '--n_label_games=5', '--workers=1', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'])
    assert 'val loss' in capsys.readouterr().out and modes == [True] * 6


def test_sae_names_write_numbers_short():
    assert TR.sae_name('jumprelu', {'coef': 2.0}) == 'jumprelu_coef2'
    assert TR.sae_name('standard', {'coef': 0.292}) == 'standard_coef0.292'
    assert TR.sae_name('topk', {'k': 160}) == 'topk_k160'


def test_lr_schedule_follows_the_clock_when_it_is_ahead():
    import train as TR
    cfg = TR.TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    assert TR.lr_at(4, cfg, clock=0.9) == pytest.approx(5e-4)  # warm-up counts iterations only
    assert TR.lr_at(10, cfg) == pytest.approx(1e-3)
    assert TR.lr_at(60, cfg) == pytest.approx(5.5e-4)  # half way through the cosine
    assert TR.lr_at(20, cfg, clock=0.5) == pytest.approx(5.5e-4)  # the clock is ahead: it decides
    assert TR.lr_at(60, cfg, clock=0.1) == pytest.approx(5.5e-4)  # the iterations are ahead
    assert TR.lr_at(20, cfg, clock=1.0) == pytest.approx(1e-4)


def test_sweep_coefficients_scale_with_the_width_by_the_penalty_s_rule():
    import train as TR
    assert all(TR.sweep_settings(a, TR.SWEEP_WIDTH) == TR.SWEEP[a] for a in TR.SWEEP)
    # at width 512 (the gpu presets) an L1 coefficient doubles (sqrt 4), JumpReLU's quadruples;
    # at 192, sqrt(1.5) and 1.5 times, to 3 significant digits; TopK's k stays
    factors = {'standard': 2, 'gated': 2, 'p_anneal': 2, 'gated_anneal': 2, 'jumprelu': 4, 'topk': None,
               'batch_topk': None}  # None: no coefficient
    for arch, settings in TR.SWEEP.items():
        assert arch in factors, f"{arch}: say here how its coefficient scales with the width"
        factor = factors[arch]
        if factor is None:
            assert TR.sweep_settings(arch, 512) == TR.sweep_settings(arch, 192) == TR.sweep_settings(arch, 512, 0.5) == settings, arch
            continue
        assert [s['coef'] for s in TR.sweep_settings(arch, 512)] == [pytest.approx(factor * s['coef']) for s in settings]
        # --sae_coef_scale multiplies on top of the width's factor
        assert [s['coef'] for s in TR.sweep_settings(arch, 512, 2 / 3)] == [pytest.approx(factor * s['coef'] * 2 / 3, rel=5e-3) for s in settings]
        at_192 = [s['coef'] for s in TR.sweep_settings(arch, 192)]
        assert at_192 == [pytest.approx(s['coef'] * 1.5 ** (0.5 if factor == 2 else 1), rel=5e-3) for s in settings]
        assert all(len(f'{c:.6e}'.split('e')[0].rstrip('0').replace('.', '')) <= 3 for c in at_192), at_192
    # the gpu grids are chosen at width 512: there their own settings, TopK's and BatchTopK's (which
    # they do not name) SWEEP's, and at width 128 each coefficient divided by the width's factor
    for grid, table in (('gpu', TR.SWEEP_GPU), ('gpu_chess', TR.SWEEP_GPU_CHESS)):
        for arch in TR.SWEEP:
            gpu = TR.sweep_settings(arch, 512, grid=grid)
            assert gpu == table.get(arch, TR.SWEEP[arch]), (grid, arch)
            factor = {'topk': 1, 'batch_topk': 1, 'jumprelu': 4}.get(arch, 2)
            assert [s.get('coef') for s in TR.sweep_settings(arch, 128, grid=grid)] == \
                [None if 'coef' not in s else pytest.approx(s['coef'] / factor, rel=5e-3) for s in gpu], (grid, arch)
    # the rule itself: features of size sqrt(d_in / L0) make an L1 penalty grow as sqrt(d_in) at a
    # fixed L0, while the squared error grows as d_in; an L0 penalty does not grow at all
    assert S.ARCHS['standard'].COEF_POWER == 0.5 and S.ARCHS['jumprelu'].COEF_POWER == 1.0


def test_the_gpu_preset_on_a_cpu_configures_its_sweep_without_cuda_graphs():
    import train as TR
    # the preset turns graphs on for CUDA; on a CPU it drops them where one asked for by name is
    # refused (test_bad_values_are_refused_before_any_work); its grid and compiling stay
    # each game's its own grid, chosen on that game's gpu model
    for game, grid, standard in (('othello', 'gpu', (1.1, 2.1, 3.7)), ('chess', 'gpu_chess', (0.44, 0.88, 2.0))):
        cfg = TR.build_config([f'--game={game}', '--preset=gpu', '--device=cpu'])
        assert (cfg.sae_cuda_graphs, cfg.sae_compile, cfg.sae_grid, cfg.sae_coef_scale) == (False, True, grid, 1.0)
        assert TR.sweep_grid(cfg, 512)[0]['standard'] == [{'coef': c} for c in standard]
        assert TR.build_config([f'--game={game}', '--preset=paper', '--device=cpu']).sae_grid == grid
    assert TR.build_config(['--preset=cpu']).sae_grid == 'cpu'


def test_data_of_another_size_are_used_and_said(tmp_path):
    # the data are made once and kept: a later run that asks for another number of games (the tiny
    # preset's 2000 after the gpu preset's 2M, or the other way) trains on what is there, and says so
    import train as TR
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    for n_games, want in ((30, []), (30, []), (50, [f"data: {tmp_path}/data/othello/train.pt holds 30 games, not the "
                                                     f"50 of --n_games: training on them (for 50: delete "
                                                     f"{tmp_path}/data/othello/ first)"])):
        logged = []
        cfg = TR.build_config(['--preset=tiny', f'--n_games={n_games}', '--n_val=10', '--n_label_games=5', '--workers=1', *dirs])
        train, _ = TR.ensure_data(cfg, logged.append)
        assert len(train['tokens']) == 30 and [line for line in logged if 'holds' in line] == want


class Killed(Exception):
    """A run killed in a test, in its own process (by fake_lm_clock, or a patched function)."""


def fake_lm_clock(monkeypatch, kill_during=None):
    """train.py's clock made fake, whatever the machine: t[0] seconds (from 1000; a test may add to
    it), one more with every optimiser step of the LM (AdamW: the SAEs' Adam leaves it) taken
    inside `with ticking():`; with kill_during=N, Killed is raised after the step that takes the
    clock to 1000 + N, as a kill during iter N (after that step, before its log line and any
    checkpoint of it). Returns (t, ticking)."""
    import train as TR
    from torch.optim.optimizer import register_optimizer_step_post_hook
    t = [1000.0]
    monkeypatch.setattr(TR, 'now', lambda: t[0])

    def tick(opt, *_):
        if type(opt) is torch.optim.AdamW:
            t[0] += 1.0
            if kill_during is not None and t[0] == 1000.0 + kill_during:
                raise Killed

    @contextlib.contextmanager
    def ticking():
        handle = register_optimizer_step_post_hook(tick)
        try:
            yield
        finally:
            handle.remove()
    return t, ticking


def test_a_budgeted_sweep_with_early_p_annealing_keeps_its_schedule_after_the_fit(tiny_out, monkeypatch, capsys):
    # --anneal_start=0.1 of 400 steps starts at step 40; a budget far too short fits the steps to
    # the floor, which here is 195, the fewest whose schedule starts at step 20 (round(19.5); at
    # 100 it would start at step 10, before the fit at step 20): p anneals from step 20 on, and
    # --stage=lm is not refused for it
    args = ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--sae_archs=p_anneal', '--control=none',
            '--sae_steps=400', '--sae_minutes=0.0001', '--anneal_start=0.1', '--dtype=float32',
            f'--data_dir={tiny_out}/data', f'--out_dir={tiny_out}/out']
    assert TR.least_fitted_steps(TR.build_config(args)) == 195
    TR.build_config([a for a in args if a != '--stage=sae'] + ['--stage=lm', '--anneal_start=0.01'])
    # the floor by brute force: the fewest steps from 100 whose schedule (as the SAE rounds its
    # start) begins at step 20 or later; a sweep is refused only where its own steps are fewer
    for start in (0.003, 0.05, 0.1, 0.13, 0.195, 0.2, 0.5):
        cfg = TR.build_config(args[:1] + [f'--anneal_start={start}', '--sae_minutes=0'])
        want = next(n for n in range(100, 10_000) if S.make_sae('p_anneal', 4, 8, total_steps=n,
                                                                anneal_start=start).anneal_start_step() >= 20)
        assert TR.least_fitted_steps(cfg) == want, start
    try:
        TR.main(args)
        assert 'fewer than a budgeted sweep\'s least, 195' in capsys.readouterr().out
        paths = glob.glob(str(tiny_out / 'out' / 'othello' / 'saes' / 'p_anneal_*.pt'))
        assert len(paths) == 3
        for path in paths:
            sae = S.load(path)
            assert sae.meta['steps'] == 195 and sae._schedule[0][0] == 20 and sae.p == pytest.approx(0.2)
    finally:
        for f in glob.glob(str(tiny_out / 'out' / 'othello' / 'saes' / 'p_anneal_*.pt')):
            os.remove(f)


def test_time_budgets_stop_the_lm_and_fit_the_sae_steps(tmp_path, monkeypatch, capsys):
    import train as TR
    # a fake clock: one second passes with every optimiser step of the LM and every SAE's loss
    # (the sweep's SAEs share one optimiser step), none otherwise, whatever the machine; and the
    # SAEs' losses "compile" for 20 s an SAE at their first call, and "record CUDA graphs" for
    # 10 s at their second
    t, ticking = fake_lm_clock(monkeypatch)

    def slow_to_compile(saes, **options):
        losses, calls = S.compile_losses(saes, backend='eager'), [0]

        def first_call_compiles(x):
            t[0] += (20.0 * (calls[0] == 0) + 1.0) * len(saes) + 10.0 * (calls[0] == 1)
            calls[0] += 1
            return losses(x)
        return first_call_compiles
    monkeypatch.setattr(TR, 'compile_losses', slow_to_compile)
    # the steps at which the sweep checkpoints (every fake minute here)
    saved_steps, atomic_save = [], D.atomic_save

    def spy(obj, path):
        if obj.get('format') == TR.SWEEP_FORMAT and obj['state'] is not None:
            saved_steps.append((obj['part'], obj['state']['step']))
        atomic_save(obj, path)
    monkeypatch.setattr(D, 'atomic_save', spy)
    args = ['--game=othello', '--preset=tiny', '--max_iters=5000', '--lm_minutes=0.5', '--sae_steps=400',
            '--sae_minutes=8', '--sae_archs=p_anneal', '--sae_compile', '--workers=1', '--sae_ckpt_minutes=1',
            f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    with ticking():
        TR.main(args)
    out = capsys.readouterr().out
    # the LM: 30 s of budget at a second an iteration stops it after iteration 30
    ckpt = torch.load(f'{tmp_path}/out/othello/model.pt', weights_only=True)
    assert ckpt['iter'] == 30 and 'stopping at iter 30 of 5000' in out
    # the lr follows the clock, ahead of the iterations: iteration 19 starts with 19/30 of the budget used
    lr = TR.lr_at(19, TR.build_config(args), clock=19 / 30)
    assert lr < 0.7 * TR.build_config(args).lr and f'iter 20/5000 | ' in out
    assert re.search(r'iter 20/5000 \| loss [0-9.]+ \| lr ' + re.escape(f'{lr:.2e}'), out)
    # model FLOP/s over the steps after the first: a second a step of 32 games x 59 tokens at
    # 6 x (parameters, the tied head once, positions not counted) + 12 x 2 layers x 32 wide x 59
    weights = {w.data_ptr(): w.numel() for name, w in ckpt['model'].items() if name != 'wpe.weight'}
    flop_per_step = 32 * 59 * (6 * sum(weights.values()) + 12 * 2 * 32 * 59)
    # and tokens a second over the same steps: every position of the batch, so that tok/s x FLOP a
    # token is the TFLOP/s
    assert re.search(r'iter 20/5000 \|.* \| ' + re.escape(f'{32 * 59 / 1e3:.1f}k tok/s | {flop_per_step / 1e12:.3g} TFLOP/s |'), out)
    # the sweep's: 19 steps of 256 activations in 67 s, through 3 SAEs of 10 x 32 x 256 FLOP an activation
    assert f'sae step 20/126 | {19 * 256 / 67 / 1e3:.1f}k act/s through all 3 SAEs' in out
    assert f'SAE-act/s = {19 * 256 / 67 * 3 * 10 * 32 * 256 / 1e12:.3g} TFLOP/s) |' in out
    # the sweep: 3 SAEs, 3 s a step; the first step, compiling, takes 63 s, the second 13. The 18
    # steps after those are timed (54 s, 10% added to spare: 3.3 s a step), and the budget counts
    # from the sweep's start, compiling and recording included: 130 s gone, so 20 + int((480 - 130)
    # / 3.3) = 126 steps fit; the control on the random model trains as many
    # with where that time went by torch.compile's own totals (real seconds: here dynamo traced the
    # losses, and its plain eager backend compiled nothing and read no cache)
    took = re.search(r"sae: the first step, which compiles the SAEs' losses, took 63.0s, ([0-9.]+)s of it in "
                     r"torch.compile \(([0-9.]+)s tracing Python; from its disk cache 0 of 0 autograd graphs, 0 of 0 inductor graphs\)", out)
    assert took and float(took[1]) > 0 and float(took[1]) >= float(took[2]), out
    assert '3.300s a step: 126 steps fit in --sae_minutes=8' in out
    for sub in ('saes', 'saes_random'):
        sae = S.load(f"{tmp_path}/out/othello/{sub}/{tiny_middle_sae('p_anneal')}.pt")
        assert sae.meta['steps'] == 126 and sae.cfg['total_steps'] == 126
        assert sae.meta['history'][-1]['step'] == 126
        assert sae.meta['history'][-1]['p'] == pytest.approx(0.2)  # the whole p schedule ran in 126 steps
    # the sweep's checkpoints wait for its steps' fit to the budget (a resumed sweep would time 20
    # more steps before fitting, by when the p schedule planned on --sae_steps may have begun); the control's
    # steps are known from its start: it checkpoints each fake minute from its first step on (its one
    # SAE: 21 s compiling, 11 recording, then a second a step: steps 30 and 90)
    assert [step for part, step in saved_steps if part == 'saes'] == [20, 40, 60, 80, 100, 120]
    assert [step for part, step in saved_steps if part == 'saes_random'] == [30, 90]


def test_a_resumed_lm_keeps_its_clock_and_one_that_ran_it_out_is_done(tmp_path, monkeypatch, capsys):
    import train as TR
    # a fake clock: a second passes with every optimiser step of the LM. --lm_minutes=0.25 is 15 s.
    # The run is killed during iter 13, after its checkpoint at iter 10 (10 s trained); resumed, it
    # counts those 10 s, its lr follows the clock from where it was, and it stops at iter 15 as the
    # unstopped run would (not at 25, a new 15 s)
    _, ticking = fake_lm_clock(monkeypatch, kill_during=13)
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    args = ['--game=othello', '--preset=tiny', '--stage=lm', '--max_iters=5000', '--lm_minutes=0.25',
            '--eval_interval=10', '--legal_games=5', '--workers=1', *dirs]
    with ticking():
        with pytest.raises(Killed):
            TR.main(args)
        path = f'{tmp_path}/out/othello/model.pt'
        assert torch.load(path, weights_only=True)['iter'] == 10
        capsys.readouterr()
        TR.main(args + ['--resume'])
    out = capsys.readouterr().out
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['iter'] == 15 and 'legal_move_rate' in ckpt and 'stopping at iter 15 of 5000' in out  # the final one
    cfg = TR.build_config(args)
    assert re.search(r'iter 15/5000 \| loss [0-9.]+ \| lr ' + re.escape(f'{TR.lr_at(14, cfg, clock=14 / 15):.2e}'), out)
    # resumed again: the LM is done. --stage=lm has nothing to train unless --lm_minutes is raised;
    # --stage=all goes on to the SAEs, model.pt untouched
    before = D.file_digest(path)
    code, err = run_main(TR.main, args + ['--resume'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'model.pt stopped at iter 15 after its --lm_minutes=0.25', 'raise --lm_minutes')
    called = []
    monkeypatch.setattr(TR, 'train_saes', lambda cfg, log=print: called.append(cfg.stage))
    TR.main([a for a in args if a != '--stage=lm'] + ['--resume'])
    assert called == ['all'] and 'is at iter 15 stopped by --lm_minutes=0.25: the LM is done' in capsys.readouterr().out
    assert D.file_digest(path) == before


def test_a_resumed_lm_keeps_its_loss_scale(tmp_path, monkeypatch):
    import train as TR
    # under fp16 (CUDA) a gradient scaler doubles the loss scale after each run of growth_interval
    # steps without an overflow. Here a CPU scaler from 2**8, doubling every 3 steps (the
    # gradients are fp32: none overflows), over a run killed during iter 13 after its iter-10
    # checkpoint and resumed to iter 15: 15 steps double it 5 times, as in the unstopped run (a
    # new scaler at the resume would stand at 2**9, 2 steps into its next 3)
    _, ticking = fake_lm_clock(monkeypatch, kill_during=13)
    monkeypatch.setattr(TR, 'scaler_for', lambda cfg: torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, growth_interval=3))
    args = ['--game=othello', '--preset=tiny', '--stage=lm', '--max_iters=15', '--eval_interval=10',
            '--legal_games=5', '--workers=1', '--dtype=float32', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    path = f'{tmp_path}/out/othello/model.pt'
    with ticking():
        with pytest.raises(Killed):
            TR.main(args)
        assert torch.load(path, weights_only=True)['scaler'] == {
            'scale': 2.0 ** 11, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 3, '_growth_tracker': 1}
        TR.main(args + ['--resume'])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['iter'] == 15 and ckpt['scaler']['scale'] == 2.0 ** 13 and ckpt['scaler']['_growth_tracker'] == 0


def test_an_option_takes_its_fields_type_whatever_a_preset_set():
    # the chess cpu preset sets 12 and 5 minutes: a float option still takes 0.5 and 2.5
    cfg = TR.build_config(['--game=chess', '--preset=cpu', '--lm_minutes=0.5', '--sae_minutes=2.5'])
    assert (cfg.lm_minutes, cfg.sae_minutes) == (0.5, 2.5)
    assert TR.build_config(['--game=chess', '--preset=cpu']).lm_minutes == 12


@pytest.mark.parametrize('args, message', [
    (['train.py', '--bogus=1'], 'unknown option --bogus'),
    (['train.py', '--game=go'], 'unknown game'),
    (['train.py', '--max_iters=many'], 'not a valid int'),
    (['data.py', '--game=checkers'], 'unknown game'),
    (['train.py', '--game=chess', '--soft_targets=True', '--source=stockfish'], 'needs random games'),
    (['train.py', '--game=othello', '--block_size=60'], 'at most 59'),
    (['train.py', '--preset=huge'], 'unknown preset'),
    (['train.py', '--optimizer=sgd'], 'unknown --optimizer'),
    (['train.py', '--seed=1e30'], '--seed=1000000000000000019884624838656 is not allowed'),
    (['data.py', '--seed=-1'], '--seed=-1 is not allowed: use an integer in [0, 2^31)'),
    (['train.py', '--out_dir='], '--out_dir= is not allowed: use a directory (. for the current one)'),
    (['data.py', '--data_dir= '], '--data_dir=  is not allowed: use a directory'),
    # the tiny preset's width 32 x 4 = 128 features, fewer than TopK's and BatchTopK's k 160
    # (the architectures named, so that one a student adds with a k of 160 does not join the list)
    (['train.py', '--preset=tiny', '--sae_expansion=4', '--sae_archs=standard,topk,batch_topk'], 'k of 160: use --sae_expansion of at least 5, or --sae_archs without batch_topk,topk'),
    # p-annealing from step 10 of 1000: begun before the steps are fitted to the budget at step 20
    (['train.py', '--sae_minutes=5', '--anneal_start=0.01', '--sae_archs=topk,gated_anneal'],
     'starts p-annealing at step 10 of --sae_steps=1000, before step 20'),
])
def test_bad_options_give_one_clear_line(args, message, tmp_path, monkeypatch, capsys):
    # in this process, through the scripts' own run_cli (test_bad_value_on_the_command_line runs
    # the real command line once): a second each less than a new python per case
    main, dirs = {'train.py': (TR.main, [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']),
                  'data.py': (D.main, [f'--data_dir={tmp_path}/data'])}[args[0]]
    monkeypatch.chdir(tmp_path)  # an empty --out_dir or --data_dir would write here
    code, err = run_main(main, [*dirs, *args[1:]], monkeypatch, capsys)  # the case's own options win
    assert code == 2
    assert_one_line(err, message)
    assert not os.listdir(tmp_path)  # nothing half-written


def test_missing_and_corrupt_data_files(tmp_path):
    # the hint names --data_dir when it is not the default, so that following it makes the file read here
    with pytest.raises(D.UserError, match=re.escape(f'`python data.py --game othello --data_dir={tmp_path}`')):
        D.load_data('othello', 'train', str(tmp_path))
    os.makedirs(tmp_path / 'othello')
    (tmp_path / 'othello' / 'train.pt').write_bytes(b'\x00garbage')
    with pytest.raises(D.UserError, match='corrupt'):
        D.load_data('othello', 'train', str(tmp_path))
    # the right format tag without what the file holds: one line naming it
    labels = {'format': 'boardgame-saes/labels', 'version': D.FORMAT_VERSION, 'game': 'othello', 'sets': {},
              'names': {}, 'game_idx': torch.zeros(0), 'pos': torch.zeros(0), 'config': {}}
    for missing in ('sets', 'config'):
        D.atomic_save({k: v for k, v in labels.items() if k != missing}, str(tmp_path / 'othello' / 'labels.pt'))
        with pytest.raises(D.UserError, match=f'labels.pt lacks {missing}, which a boardgame-saes/labels file holds: '
                                              'run `python data.py'):
            D.load_data('othello', 'labels', str(tmp_path))
    # another of the project's files in its place (the labels as train.pt): named as what it is not
    D.atomic_save(labels, str(tmp_path / 'othello' / 'train.pt'))
    with pytest.raises(D.UserError, match=r'train.pt is not a boardgame-saes/data file: run `python data.py'):
        D.load_data('othello', 'train', str(tmp_path))


def test_resume_without_checkpoint_fails_cleanly(tmp_path, monkeypatch, capsys):
    code, err = run_main(TR.main, ['--game=othello', '--preset=tiny', '--resume', '--stage=lm',
                                   f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'model.pt not found')


# ------------------------------------------------------------------------------------------------
# sae.py

ARCHS = list(S.ARCHS)
D_IN, D_SAE = 16, 64


@contextlib.contextmanager
def torch_threads(n):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matmuls: a second thread only adds contention on a shared 2-core machine
    with torch_threads(1):
        yield


def small_sae(arch, **kw):
    kw.setdefault('total_steps', 20)
    if arch in ('topk', 'batch_topk'):
        kw.setdefault('k', 4)
    return S.make_sae(arch, D_IN, D_SAE, **kw)


def raw_batch(B=32, seed=0, scale=7.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D_IN, generator=g) * scale + 1.0


def train_a_little(sae, steps=5, lr=1e-2):
    return S.train_sae(sae, (raw_batch(seed=s) for s in range(steps)), lr=lr, warmup_steps=1, total_steps=steps)


@pytest.mark.parametrize("arch", list(S.ARCHS))
def test_bf16_matmuls_close_to_fp32_with_fp32_state(arch):
    x = raw_batch(B=64, seed=1)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        sae = small_sae(arch)
        sae.set_act_scale(x)
        sae.matmul_dtype = dtype
        loss, stats = sae.loss(x, 0)
        loss.backward()
        grads[dtype] = (loss.item(), sae.W_enc.grad.flatten(), sae.W_dec.grad.flatten())
        assert loss.dtype == torch.float32 and stats['mse'].dtype == torch.float32
        assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in sae.parameters())
    (l32, we32, wd32), (l16, we16, wd16) = grads[torch.float32], grads[torch.bfloat16]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=3e-2)  # bf16 products ran, and stayed close
    for a, b in ((we32, we16), (wd32, wd16)):
        assert F.cosine_similarity(a, b, dim=0) > 0.95


# ---------------------------------------------------------------------------------------------
# interface, identical for every architecture

@pytest.mark.parametrize('arch', ARCHS)
def test_shapes_forward_and_stats(arch):
    torch.manual_seed(0)
    sae = small_sae(arch)
    x = raw_batch()
    sae.set_act_scale(x)
    f = sae.encode(x)
    x_hat = sae.decode(f)
    assert f.shape == (32, D_SAE) and x_hat.shape == (32, D_IN)
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)
    assert sae.b_enc.shape == (D_SAE,) and sae.b_dec.shape == (D_IN,)
    x_hat2, f2 = sae(x)
    assert torch.equal(f, f2) and torch.equal(x_hat, x_hat2)
    loss, stats = sae.loss(x, step=0)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(stats) == set(S.STATS_KEYS)
    # p and coef are floats; the rest stay on the device as 0-dim tensors (no host sync a step)
    assert all(type(stats[k]) is float for k in ('p', 'coef'))
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for k, v in stats.items() if k not in ('p', 'coef'))
    assert sae.cfg['arch'] == arch and sae.cfg['d_in'] == D_IN and sae.cfg['d_sae'] == D_SAE


def dense_reference_loss(sae, x_raw):
    """The training loss written plainly from sae.py's docstrings, on dense (B, d_sae) features
    and the unfolded encoder (x - b_dec) W_enc + b_enc: what the fast paths (b_dec folded into
    the bias, in-place ReLU, TopK decoding from the active latents only) must equal."""
    x = x_raw * sae.act_scale
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    aux = 0.0
    if sae.arch == 'standard':
        f = torch.relu(pre)
        penalty = sae.coef * f.sum(-1).mean()
    elif sae.arch == 'gated':
        f = (pre > 0).float() * torch.relu((x - sae.b_dec) @ sae.W_enc * torch.exp(sae.r_mag) + sae.b_mag)
        penalty = sae.coef * torch.relu(pre).sum(-1).mean()
        aux = (x - (torch.relu(pre) @ sae.W_dec.detach() + sae.b_dec.detach())).pow(2).sum(-1).mean()
    elif sae.arch == 'jumprelu':  # the value; the thresholds' straight-through gradient is not plain autograd
        fires = (pre > torch.exp(sae.log_threshold)).float()
        f, penalty = pre * fires, sae.coef * fires.sum(-1).mean()
    elif sae.arch == 'topk':
        acts = torch.relu(pre)
        keep = torch.zeros_like(acts).scatter(-1, acts.topk(sae.cfg['k'], dim=-1).indices, 1.0)
        f, penalty = acts * keep, 0.0
    elif sae.arch == 'batch_topk':  # the k*B largest over the batch
        acts = torch.relu(pre)
        flat_keep = torch.zeros(acts.numel()).scatter(0, acts.flatten().topk(sae.cfg['k'] * len(x)).indices, 1.0)
        f, penalty = acts * flat_keep.view_as(acts), 0.0
    else:  # not another architecture's formula, silently
        raise ValueError(f"no reference loss for {sae.arch!r}: write its formula here")
    x_hat = f @ sae.W_dec + sae.b_dec
    return (x - x_hat).pow(2).sum(-1).mean() + penalty + aux, x, x_hat, f


@pytest.mark.parametrize('arch', ['standard', 'gated', 'topk', 'batch_topk', 'jumprelu'])
def test_fast_training_path_equals_the_dense_reference(arch):
    torch.manual_seed(0)
    sae = small_sae(arch, coef=0.3)
    x = raw_batch(B=64)
    sae.set_act_scale(x)
    sae.init_b_dec(x)  # a non-zero b_dec, so folding it into the encoder bias is exercised
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        if arch == 'gated':
            sae.r_mag.normal_(0, 0.3), sae.b_mag.normal_(0, 0.3)
    grads = []
    for loss_fn in (lambda: sae.loss(x, 0)[0], lambda: dense_reference_loss(sae, x)[0]):
        sae.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (fast_loss, fast), (ref_loss, ref) = grads
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-5)
    # the logged training stats are the evaluation's formulas on the same batch (metrics.py);
    # raw_batch's mean is not 0, so an uncentred variance would read higher
    _, x_norm, x_hat, f = (t.detach() for t in dense_reference_loss(sae, x))
    _, stats = sae.loss(x, 0)
    assert stats['mse'].item() == pytest.approx((x_norm - x_hat).pow(2).sum(-1).mean().item(), rel=1e-5)
    assert stats['l0'].item() == pytest.approx(metrics.l0(f), rel=1e-6)
    assert stats['explained_variance'].item() == pytest.approx(metrics.explained_variance(x_norm, x_hat), abs=1e-5)
    # W_dec's gradient comes out of the backward without its component along each row (sae.py)
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)  # (d_sae, d_in)
    ref['W_dec'] = ref['W_dec'] - (ref['W_dec'] * rows).sum(1, keepdim=True) * rows
    for name in ref:
        if name != 'log_threshold':  # JumpReLU's pseudo-derivative has tests of its own
            torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('arch', ['topk', 'batch_topk'])
def test_the_gpu_dense_decode_equals_the_cpu_gather(arch, monkeypatch):
    # the GPU's way (DENSE_DECODE: the picks scattered into f, one matmul), run here on the CPU,
    # gives the loss and gradients of the CPU's embedding_bag, the aux loss's decode included
    # (every latent that does not fire in the batch is dead; BatchTopK's rows keep from 0 to many
    # latents each)
    results = []
    for dense in (False, True):
        monkeypatch.setattr(S.SAE, 'DENSE_DECODE', dense)
        torch.manual_seed(0)
        sae = small_sae(arch, dead_tokens=100, aux_k=6)
        x = raw_batch(B=12)
        sae.set_act_scale(x)
        sae.init_b_dec(x)
        sae.tokens_since_fired.fill_(1000)
        loss, stats = sae.loss(x, 0)
        loss.backward()
        results.append((stats, {n: p.grad.clone() for n, p in sae.named_parameters()}))
    (gather, gather_grads), (dense, dense_grads) = results
    assert gather['aux_loss'] > 0
    for key in ('loss', 'mse', 'aux_loss', 'l0'):
        torch.testing.assert_close(dense[key], gather[key], rtol=1e-5, atol=1e-5, msg=key)
    for name, grad in gather_grads.items():
        torch.testing.assert_close(dense_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # flat picks with their rows, out of order, rows 0 and 2 empty: row 1 takes latents 3 and 5,
    # row 3 latent 3
    values, indices, rows = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([3, 3, 5]), torch.tensor([3, 1, 1])
    decoded = []
    for dense in (False, True):
        monkeypatch.setattr(S.SAE, 'DENSE_DECODE', dense)
        decoded.append(sae._decode_sparse_n(values, indices, rows, n_rows=4))
    want = torch.stack([torch.zeros(D_IN), 2 * sae.W_dec[3] - sae.W_dec[5], torch.zeros(D_IN), 0.5 * sae.W_dec[3]])
    for got in decoded:
        torch.testing.assert_close(got, want + sae.b_dec, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('arch', ['topk', 'batch_topk'])
def test_the_cpu_decodes_by_the_matmul_where_a_tenth_of_the_latents_are_kept(arch, monkeypatch):
    # by default a CPU gathers the kept latents' decoder rows while they are few (k 4 of 64) and
    # decodes the dense f by the matmul from DENSE_FROM of them a row (k 7 and 8 of 64, about
    # a tenth and an eighth), the faster there (sae.py)
    assert S.SAE.DENSE_DECODE is None
    decode_n, dense_calls = S.SAE._decode_n, []
    monkeypatch.setattr(S.SAE, '_decode_n', lambda self, f: dense_calls.append(f.shape) or decode_n(self, f))
    for k, dense in ((4, False), (6, False), (7, True), (8, True)):
        dense_calls.clear()
        sae = small_sae(arch, k=k)
        x = raw_batch(B=12)
        sae.set_act_scale(x)
        sae.loss(x, 0)[0].backward()
        assert dense_calls == ([(12, D_SAE)] if dense else []), k


@pytest.mark.parametrize('arch', ['topk', 'batch_topk'])
def test_topk_picks_among_bf16_products_exactly_as_among_their_fp32_copies(arch, monkeypatch):
    # with bf16 matmuls TopK's training picks among the encoder's bf16 outputs (sae.py): the picks
    # are fp32, each the fp32 copy's value at its index, and as a set the fp32 copy's top k (top
    # k * B over the batch); and the GPU's dense decode, which builds f in bf16, gives the output
    # and gradients of an fp32 f cast to bf16 at the matmul, to the bit
    torch.manual_seed(0)
    sae = small_sae(arch)
    sae.matmul_dtype = torch.bfloat16
    B, k = 16, sae.cfg['k']
    x = raw_batch(B=B)
    sae.set_act_scale(x)
    pre = sae._pre_acts(x * sae.act_scale, fp32_out=False)  # (B, d_sae)
    assert pre.dtype == torch.bfloat16
    values, indices, rows = sae._select_train(pre)
    assert values.dtype == torch.float32
    pre32 = pre.float()
    if rows is None:  # (B, k) picks
        assert torch.equal(pre32.gather(1, indices), values)
        assert torch.equal(values.sort(-1).values, pre32.topk(k, dim=-1).values.sort(-1).values)
    else:  # k * B picks over the batch, each with its row
        assert torch.equal(pre32[rows, indices], values)
        assert torch.equal(values.sort().values, pre32.flatten().topk(k * B).values.sort().values)
    monkeypatch.setattr(S.SAE, 'DENSE_DECODE', True)
    results = []
    for build_in_bf16 in (True, False):
        sae.zero_grad()
        v = values.relu().detach().requires_grad_()
        if build_in_bf16:  # as training decodes
            out = sae._decode_sparse_n(v, indices, rows, n_rows=B)
        else:  # an fp32 f, cast by _decode_n's matmul
            f = torch.zeros(B, D_SAE)
            f = f.scatter(1, indices, v) if rows is None else f.index_put((rows, indices), v)
            out = sae._decode_n(f)
        out.pow(2).sum().backward()
        results.append((out.detach(), v.grad, sae.W_dec.grad.clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize('arch', ARCHS)
def test_decoder_rows_unit_norm_and_gradient_projection(arch):
    torch.manual_seed(0)
    sae = small_sae(arch)
    sae.set_act_scale(raw_batch())
    W_dec_before = sae.W_dec.detach().clone()
    # the backward leaves out the gradient's component along each decoder row
    loss, _ = sae.loss(raw_batch(), 0)
    loss.backward()
    along_rows = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert along_rows.abs().max() < 1e-4 * sae.W_dec.grad.abs().max().clamp_min(1e-12) * D_IN
    sae.zero_grad()
    train_a_little(sae, steps=5, lr=1e-2)
    norms = sae.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(D_SAE), atol=1e-5)
    assert not torch.allclose(sae.W_dec.detach(), W_dec_before)  # it did train


def test_the_decoder_gradient_projection_uses_unit_rows_whatever_their_norm():
    # _W_dec() is W_dec in value, and passes back g - (g . r) r with r each row over its norm
    sae = small_sae('standard')
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, D_SAE)[:, None])  # rows of norms 0.5 to 3
    g = torch.randn_like(sae.W_dec)
    W = sae._W_dec()
    assert torch.equal(W, sae.W_dec)
    (W * g).sum().backward()
    r = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(sae.W_dec.grad, g - (g * r).sum(1, keepdim=True) * r)


@pytest.mark.parametrize('arch, dense', [(a, False) for a in ARCHS] + [('topk', True), ('batch_topk', True)])
def test_compiled_loss_is_one_trace_with_no_host_reads_and_trains_as_eager(arch, dense, monkeypatch):
    # compile_loss with fullgraph=True fails on any graph break, and a graph break is where the
    # traced loss would read a value on the host (a GPU sync); shapes_from_the_data finds the
    # shapes taken from the data, which fullgraph lets through (a wait too). The
    # run crosses every p-annealing update (coef rescales from the L_p history kept in the 2
    # steps before each, and only there) and, for TopK, dead latents (k = 1 of 64 over 32 rows;
    # dead after 64 rows): still one trace, and the same training as eager up to float rounding
    # (aot_eager: the traced graph run op by op). dense: TopK decoding as on a GPU
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(S.SAE, 'DENSE_DECODE', dense)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    kw = dict(total_steps=30, k=1, dead_tokens=64) if 'topk' in arch else dict(total_steps=30)
    if 'anneal' in arch:
        kw['history_len'] = 2
    torch.manual_seed(0)
    eager = S.make_sae(arch, D_IN, D_SAE, **kw)
    eager.set_act_scale(raw_batch())
    compiled = S.from_dict(S.to_dict(eager)).train().compile_loss(backend=counter, fullgraph=True)
    runs, batches = {}, [raw_batch(seed=s) for s in range(30)]

    def from_the_host(*args, **kwargs):
        raise AssertionError('torch.tensor in a compiled step: on a GPU, a copy that waits for it')
    for sae in (eager, compiled):
        opt = S.make_optimizer(sae, 1e-2)
        runs[sae] = [S.train_step(sae, opt, batches[0], 0, 1e-2)]
        with monkeypatch.context() as m:
            if sae is compiled:  # after the first step nothing makes a tensor from host values
                m.setattr(torch, 'tensor', from_the_host)
            runs[sae] += [S.train_step(sae, opt, batches[s], s, 1e-2) for s in range(1, 30)]
    assert counter.frame_count == 1
    # a new SAE of the same architecture, as the random-init control makes (its steps are not on
    # the sweep's clock), runs on the same trace, and so does another coefficient (a 0-dim tensor)
    again = S.make_sae(arch, D_IN, D_SAE, **kw, **({} if 'topk' in arch else {'coef': 2.5}))
    again.set_act_scale(raw_batch())
    again.train().compile_loss(backend=counter, fullgraph=True)
    S.train_step(again, S.make_optimizer(again, 1e-2), batches[0], 0, 1e-2)
    assert counter.frame_count == 1
    if 'topk' in arch:  # a second k is traced with k as a symbol, which every later k reuses
        for k, traces in ((2, 2), (5, 2), (3, 2)):
            twins = []
            for compile_it in (False, True):
                torch.manual_seed(k)
                sae = S.make_sae(arch, D_IN, D_SAE, **dict(kw, k=k)).train()
                sae.set_act_scale(raw_batch())
                sae = sae.compile_loss(backend=counter, fullgraph=True) if compile_it else sae
                opt = S.make_optimizer(sae, 1e-2)
                steps = [S.train_step(sae, opt, b, s, 1e-2) for s, b in enumerate(batches[:3])]
                twins.append([float(st[key]) for st in steps for key in ('loss', 'l0')])
            assert counter.frame_count == traces, k
            # the same training as eager, at this k (L0 at most k: ReLU can zero a kept value)
            assert twins[1] == pytest.approx(twins[0], rel=1e-4) and k / 2 <= twins[0][1] <= k
    assert shapes_from_the_data(counter) == []
    assert compiled.n_anneal_done == eager.n_anneal_done and compiled.p == eager.p
    assert compiled.coef == pytest.approx(eager.coef, rel=1e-4)
    if arch in ('p_anneal', 'gated_anneal'):
        assert eager.n_anneal_done == 10 and eager.coef != eager.cfg['coef']  # the rescales happened
    if 'topk' in arch:
        assert runs[eager][-1]['aux_loss'] > 0  # dead latents trained through the aux loss
    for name, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[name], value, rtol=1e-3, atol=1e-3, msg=name)
    for a, b in zip(runs[eager], runs[compiled]):
        assert float(b['loss']) == pytest.approx(float(a['loss']), rel=1e-3)


def test_the_sweeps_losses_compiled_as_one_function_train_each_sae_as_alone(monkeypatch):
    # compile_losses: two SAEs of every architecture in one compiled function, fullgraph (no
    # host reads), one trace for a run that crosses every p-annealing update and TopK's dead
    # latents; the sum of their losses, differentiated once, trains each SAE exactly as it trains
    # alone with its own compiled loss (compile_loss). Dynamo's plain eager backend: the traced
    # graph run op by op (aot_eager's trace of each architecture: the test above); TopK decoding
    # as on a GPU, where the sweep compiles
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(S.SAE, 'DENSE_DECODE', True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('eager')
    batches = [raw_batch(seed=s) for s in range(12)]

    def make():
        saes = []
        for i, arch in enumerate(ARCHS):
            for j, setting in enumerate(({'k': 1}, {'k': 3}) if 'topk' in arch else ({'coef': 0.5}, {'coef': 2.0})):
                kw = dict(setting, total_steps=12, **({'dead_tokens': 64} if 'topk' in arch else {}),
                          **({'history_len': 2} if 'anneal' in arch else {}))
                torch.manual_seed(10 * i + j)
                sae = S.make_sae(arch, D_IN, D_SAE, **kw)
                sae.set_act_scale(batches[0])
                saes.append(sae.train())
        return saes
    alone, together = make(), make()
    for sae in alone:
        sae.compile_loss(backend='eager')
    losses = S.compile_losses(together, backend=counter, fullgraph=True)
    optimizers = S.make_optimizer(alone, 1e-2), S.make_optimizer(together, 1e-2)
    for step, x in enumerate(batches):
        want = S.train_step(alone, optimizers[0], x, step, 1e-2)
        got = S.train_step(together, optimizers[1], x, step, 1e-2, losses)
        assert [{k: float(v) for k, v in st.items()} for st in got] == [{k: float(v) for k, v in st.items()} for st in want]
    assert counter.frame_count == 1 and shapes_from_the_data(counter) == []
    for a, b in zip(alone, together):
        assert (b.p, b.coef, getattr(b, 'n_anneal_done', 0)) == (a.p, a.coef, getattr(a, 'n_anneal_done', 0))
        for name, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], value), (a.arch, name)
    anneal = [sae for sae in together if 'anneal' in sae.arch]
    assert all(sae.n_anneal_done == 10 and sae.coef != sae.cfg['coef'] for sae in anneal)  # the rescales happened
    assert any(sae.tokens_since_fired.max() >= 64 for sae in together if 'topk' in sae.arch)  # dead latents


def test_the_compiled_backward_keeps_at_most_two_bytes_per_dictionary_entry(monkeypatch):
    # what a compiled loss (bf16 matmuls, TopK decoding as on a GPU) keeps from its forward for
    # its backward, as torch.compile's partitioner splits the graph for inductor: of the
    # (B, d_sae) tensors, at most 2 bytes an entry (bf16 pre-activations, or bool masks), and no
    # fp32 one, which the backward would read back at twice the bytes. Each architecture is traced
    # and partitioned, not compiled: the recording partitioner stops there. With L0 and the
    # penalty after the decode, gated kept 3 bytes an entry, p-annealing 7 (f^p's derivative in
    # fp32, a mask) and gated p-annealing 9 (sae.StandardSAE._train_forward)
    import torch._inductor.compile_fx as CF

    class Partitioned(Exception):
        pass
    partition, kept = CF.min_cut_rematerialization_partition, []

    def recording(*args, **kwargs):
        _, backward = partition(*args, **kwargs)
        kept.extend(n.meta['val'] for n in backward.graph.find_nodes(op='placeholder')
                    if isinstance(n.meta.get('val'), torch.Tensor))
        raise Partitioned
    monkeypatch.setattr(CF, 'min_cut_rematerialization_partition', recording)
    monkeypatch.setattr(torch._inductor.config, 'fx_graph_cache', False)  # a cached graph skips the partitioner
    monkeypatch.setattr(torch._functorch.config, 'enable_autograd_cache', False)
    monkeypatch.setattr(S.SAE, 'DENSE_DECODE', True)
    B = 2 * D_SAE  # no other tensor of the loss has this shape
    x = raw_batch(B=B)
    for arch in ARCHS:
        torch._dynamo.reset()
        kept.clear()
        torch.manual_seed(0)
        sae = S.make_sae(arch, D_IN, D_SAE, total_steps=10, **({'k': 4} if 'topk' in arch else {})).train()
        sae.set_act_scale(x)
        sae.matmul_dtype = torch.bfloat16
        sae.compile_loss()
        with pytest.raises(Exception) as failed:
            S.train_step(sae, S.make_optimizer(sae, 1e-3), x, 0, 1e-3)
        causes, e = [], failed.value
        while e is not None:
            causes.append(type(e))
            e = e.__cause__ or e.__context__
        assert Partitioned in causes, (arch, causes)
        big = [t.dtype for t in kept if t.shape == (B, D_SAE)]
        assert kept and torch.float32 not in big, (arch, big)
        assert sum(dtype.itemsize for dtype in big) <= 2, (arch, big)


@pytest.mark.parametrize('arch', ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    torch.manual_seed(0)
    sae = small_sae(arch)
    sae.set_act_scale(raw_batch())
    train_a_little(sae, steps=20)  # sets batch_topk's threshold, anneals p
    path = tmp_path / f'{arch}.pt'
    extra = {'model_checkpoint': 'ckpt-abc123', 'final_stats': {'mse': 1.5}, 'layer': 5}
    S.save(sae, str(path), extra)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    loaded = S.load(str(path))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg and loaded.meta == extra
    assert (loaded.p, loaded.coef, loaded.n_anneal_done) == (sae.p, sae.coef, sae.n_anneal_done)
    sae.eval()
    x = raw_batch(seed=99)
    x_hat, f = sae(x)
    x_hat2, f2 = loaded(x)
    assert torch.equal(f, f2) and torch.equal(x_hat, x_hat2)
    assert torch.equal(loaded.encode(x[:1]), sae.encode(x[:1]))
    # saving again over the same path replaces it
    S.save(loaded, str(path), {'again': True})
    assert S.load(str(path)).meta == {'again': True}


@pytest.mark.parametrize('arch', ARCHS)
def test_activation_scale_applied_consistently(arch):
    torch.manual_seed(0)
    sae = small_sae(arch)
    x = raw_batch()
    sae.set_act_scale(x)
    s = sae.act_scale.item()
    assert s != pytest.approx(1.0, rel=0.1)
    assert (x * s).pow(2).sum(-1).mean().item() == pytest.approx(D_IN, rel=1e-4)
    assert S.act_scale_for(x) == pytest.approx(s, rel=1e-6)
    with torch.no_grad():
        sae.b_dec.normal_()  # a non-trivial bias, so raw vs normalised space matters
        sae.b_enc.normal_(std=0.1)
    sae.eval()
    f = sae.encode(x)
    # same weights with act_scale 1: encoding x * s gives the same features
    unit = small_sae(arch)
    unit.load_state_dict(sae.state_dict())
    unit.act_scale.fill_(1.0)
    unit.eval()
    torch.testing.assert_close(unit.encode(x * s), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unit.decode(f), sae.decode(f) * s, rtol=1e-5, atol=1e-5)
    # inputs scaled by c with act_scale scaled by 1/c: same features, c-scaled reconstruction
    c = 3.0
    scaled = small_sae(arch)
    scaled.load_state_dict(sae.state_dict())
    scaled.act_scale.fill_(s / c)
    scaled.eval()
    x_hat_c, f_c = scaled(c * x)
    torch.testing.assert_close(f_c, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat_c, c * sae(x)[0], rtol=1e-5, atol=1e-4)
    # the loss is computed in normalised space, so it is the same too
    torch.testing.assert_close(scaled.loss(c * x, 0)[1]['mse'], sae.loss(x, 0)[1]['mse'], rtol=1e-4, atol=1e-4)


def test_init_b_dec_in_normalised_space():
    torch.manual_seed(0)
    sae = small_sae('standard')
    x = raw_batch(B=256)
    sae.set_act_scale(x)
    sae.init_b_dec(x, method='mean')
    torch.testing.assert_close(sae.b_dec.detach(), x.mean(0) * sae.act_scale, rtol=1e-5, atol=1e-5)
    # geometric median: robust to a few huge outliers, unlike the mean
    outliers = x.clone()
    outliers[:5] += 1000.0
    sae.init_b_dec(outliers, method='geometric_median')
    median_raw = sae.b_dec.detach() / sae.act_scale
    assert (median_raw - x.mean(0)).norm() < 0.2 * (outliers.mean(0) - x.mean(0)).norm()
    # the geometric median is the point of least total distance: no step from it lowers that
    # (the sum is convex), and from a point off it one does
    c = (sae.b_dec.detach() / sae.act_scale).double()
    total = lambda p: (outliers.double() - p).norm(dim=1).sum().item()
    steps = [1e-3 * e for e in torch.eye(D_IN, dtype=torch.float64)]
    assert all(total(c + d) >= total(c) - 1e-9 and total(c - d) >= total(c) - 1e-9 for d in steps)
    assert min(total(x.mean(0).double() + d * sign) for d in steps for sign in (1, -1)) < total(x.mean(0).double())
    with pytest.raises(ValueError, match='median'):
        sae.init_b_dec(x, method='median')
    for bad in (torch.zeros(4, 3), torch.full((4, 3), float('nan')), torch.full((4, 3), float('inf'))):
        with pytest.raises(ValueError, match='all zeros \\(or not finite\\)'):
            S.act_scale_for(bad)


# ---------------------------------------------------------------------------------------------
# architecture specifics

def test_topk_keeps_exactly_k_per_row():
    torch.manual_seed(0)
    sae = small_sae('topk', k=4)
    x = raw_batch(B=64)
    sae.set_act_scale(x)
    f = sae.encode(x)
    assert ((f != 0).sum(1) == 4).all()
    _, stats = sae.loss(x, 0)
    assert stats['l0'] == 4.0 and stats['coef'] == 0.0 and stats['sparsity_loss'] == 0.0


def hand_sae(arch, d, **kw):
    """An SAE with W_enc = W_dec = identity (d x d), zero biases and act_scale 1: its
    pre-activations are x itself, so hand cases have closed-form answers."""
    sae = S.make_sae(arch, d, d, total_steps=10, **kw)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
    assert sae.act_scale.item() == 1.0 and not sae.b_enc.any() and not sae.b_dec.any()
    return sae


def test_topk_rows_with_fewer_than_k_positive_pre_activations():
    # k = 2, but row 0 has one positive pre-activation: it keeps that one; the rest stay zero (no
    # negative kept), the loss rebuilds x from those, and a zero kept for the count is no firing
    x = torch.tensor([[3.0, -1.0, -2.0, -0.5], [0.2, 4.0, -1.0, -3.0]])
    sae = hand_sae('topk', 4, k=2).eval()
    assert sae.encode(x).tolist() == [[3.0, 0.0, 0.0, 0.0], [pytest.approx(0.2), 4.0, 0.0, 0.0]]
    sae = hand_sae('topk', 4, k=2, aux_coef=0.0).train()
    sae.tokens_since_fired.fill_(50)
    _, stats = sae.loss(x, 0)
    # x - x_hat: (0, -1, -2, -0.5) and (0, 0, -1, -3): squared, 5.25 and 10
    assert float(stats['mse']) == pytest.approx(7.625) and float(stats['l0']) == 1.5
    assert sae.tokens_since_fired.tolist() == [0, 0, 52, 52]
    sae.eval()
    sae.loss(x, 0)  # a loss in eval mode (a score): no training rows, so no counts move
    assert sae.tokens_since_fired.tolist() == [0, 0, 52, 52]


def test_topk_auxk_exact_on_a_hand_case():
    # k = 1: row 0 keeps latent 0 (3.0), row 1 keeps latent 1 (4.0)
    x = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.2, 4.0, 1.0, 0.0]])
    # x - x_hat, the residual the dead latents are asked to explain; its mean is (0.1, 0.5, 1.5, 0.25)
    # and each row lies 0.5725 from it (squared): the residual's variance
    residual_var = 0.1 ** 2 + 0.5 ** 2 + 0.5 ** 2 + 0.25 ** 2

    def aux_loss(aux_k, since_fired, scale=1.0):
        sae = hand_sae('topk', 4, k=1, aux_k=aux_k, aux_coef=0.5, dead_tokens=4)
        sae.tokens_since_fired.copy_(torch.tensor(since_fired))
        _, stats = sae.loss(scale * x, 0)
        return sae, stats['aux_loss']

    # 2 rows later the counts are (0, 0, 7, 4): latents 0 and 1 fired, 2 and 3 reach dead_tokens = 4
    sae, loss = aux_loss(1, [0, 3, 5, 2])
    assert sae.tokens_since_fired.tolist() == [0, 0, 7, 4]
    # aux_k = 1: the largest dead pre-activation per row, latent 2 (2.0 and 1.0), rebuilds the
    # residual's third coordinate: squared errors 1 + 0.25 and 0.04
    assert loss == pytest.approx(0.5 * (1.25 + 0.04) / 2 / residual_var, rel=1e-6)
    # aux_k = 2 (and any larger: there are only 2 dead latents) adds latent 3 (0.5, 0.0)
    for k in (2, 3):
        assert aux_loss(k, [0, 3, 5, 2])[1] == pytest.approx(0.5 * (1.0 + 0.04) / 2 / residual_var, rel=1e-6)
    # one row short of dead_tokens: nothing is dead, no aux loss
    assert aux_loss(2, [0, 3, 1, 1])[1] == 0.0
    # divided by the residual's variance: scaling the inputs changes nothing
    assert aux_loss(1, [0, 3, 5, 2], scale=10.0)[1] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize('n_dead', [1, 3, 6, 9])
def test_topk_auxk_against_each_rows_top_aux_k_of_the_dead(n_dead):
    # the reference AuxK, written from its definition (Gao et al. 2024, as dictionary_learning
    # trains it): each row's top min(aux_k, number dead) of the dead latents' ReLU'd
    # pre-activations rebuild the residual. While at most aux_k = 6 are dead the SAE's aux loss
    # is that; with more it is that over the 6 longest-dead latents
    torch.manual_seed(0)
    sae = small_sae('topk', k=2, aux_k=6, dead_tokens=1000)
    x = raw_batch(B=16)
    sae.set_act_scale(x)
    sae.init_b_dec(x)
    with torch.no_grad():  # the latents this batch does not fire: the dead are picked among them
        quiet = ((sae.encode(x) == 0).all(0)).nonzero().flatten()
    assert len(quiet) >= 9
    counts = torch.zeros(D_SAE, dtype=torch.long)
    counts[quiet[:n_dead]] = 2000 + 100 * torch.arange(n_dead)  # distinct: no ties among the dead
    sae.tokens_since_fired.copy_(counts)
    _, stats = sae.loss(x, 0)
    dead = sae.tokens_since_fired >= 1000
    assert dead.sum() == n_dead
    with torch.no_grad():
        xn = x * sae.act_scale
        pre = (xn - sae.b_dec) @ sae.W_enc + sae.b_enc
        vals, idx = torch.relu(pre).topk(2, dim=-1)
        x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ sae.W_dec + sae.b_dec
        residual = xn - x_hat
        if n_dead > 6:  # the 6 longest-dead latents only
            dead = torch.zeros_like(dead).index_fill_(0, sae.tokens_since_fired.topk(6).indices, True)
        aux_vals, aux_idx = torch.where(dead, torch.relu(pre), -torch.inf).topk(min(6, n_dead), dim=-1)
        residual_hat = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals) @ sae.W_dec
        mse = (residual - residual_hat).pow(2).sum(-1).mean()
        var = (residual - residual.mean(0)).pow(2).sum(-1).mean()
    assert (aux_vals > 0).any()  # the dead latents have something to rebuild
    assert float(stats['aux_loss']) == pytest.approx(float(sae.cfg['aux_coef'] * mse / var), rel=1e-5)


def test_topk_reads_its_dead_counts_again_after_load_state_dict():
    # the host's count of rows before a latent can die comes from the counts once; new counts
    # (load_state_dict) must be read again, else the aux loss would stay skipped
    x = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.2, 4.0, 1.0, 0.0]])
    sae = hand_sae('topk', 4, k=1, aux_k=1, aux_coef=0.5, dead_tokens=8)
    assert sae.loss(x, 0)[1]['aux_loss'] == 0.0 and sae.rows_to_dead == 6  # 8 - 0 - 2 rows
    state = sae.state_dict()
    state['tokens_since_fired'] = torch.tensor([0, 3, 9, 7])
    sae.load_state_dict(state)
    assert sae.loss(x, 1)[1]['aux_loss'] > 0  # latents 2 and 3 are dead after this batch (11, 9)


def test_topk_auxk_trains_dead_latents_only_through_the_aux_loss():
    x = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.2, 4.0, 1.0, 0.0]])
    grads = {}
    for aux_coef in (0.5, 0.0):
        sae = hand_sae('topk', 4, k=1, aux_k=1, aux_coef=aux_coef, dead_tokens=4)
        with torch.no_grad():  # latent 2's decoder off its axis, so its aux reconstruction is not exact
            sae.W_dec[2] = torch.tensor([0.0, 0.0, 0.6, 0.8])
        sae.tokens_since_fired.copy_(torch.tensor([0, 3, 5, 2]))
        sae.loss(x, 0)[0].backward()
        grads[aux_coef] = sae.W_enc.grad.abs().sum(0)  # (d_sae,) encoder gradient per latent
    # latent 2 (dead, picked by AuxK) learns; latent 3 (dead, not picked) does not; without the
    # aux loss no dead latent learns; and the live latents' gradient is the same either way (the
    # residual AuxK reconstructs is detached)
    assert grads[0.5][2] > 0 and grads[0.5][3] == 0 and grads[0.0][2:].sum() == 0
    assert torch.equal(grads[0.5][:2], grads[0.0][:2])


def test_batch_topk_keeps_exactly_kB_per_batch_and_threshold_inference():
    torch.manual_seed(0)
    sae = small_sae('batch_topk', k=4)
    x = raw_batch(B=64)
    sae.set_act_scale(x)
    f = sae.encode_batch(x)
    assert (f != 0).sum().item() == 4 * 64
    # by its definition: the batch's k*B largest ReLU((x * act_scale - b_dec) W_enc + b_enc)
    assert sae.act_scale.item() < 0.5  # raw x of scale 7: the normalisation matters
    with torch.no_grad():
        sae.b_dec.normal_()
        relu_pre = ((x * sae.act_scale - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()  # (64, d_sae)
    top = relu_pre.flatten().topk(4 * 64)
    want = torch.zeros(relu_pre.numel()).index_put_((top.indices,), top.values).view_as(relu_pre)
    torch.testing.assert_close(sae.encode_batch(x), want)
    assert (f != 0).sum(1).float().std() > 0  # rows share the budget, not k each
    sae.train()
    _, stats = sae.loss(x, 0)
    assert stats['l0'] == 4.0
    assert sae.threshold.item() > 0
    # inference: a fixed threshold, so a row encodes the same alone or within a batch
    sae.eval()
    torch.testing.assert_close(sae.encode(x[3:4]), sae.encode(x)[3:4])
    kept = sae.encode(x)
    assert (kept[kept != 0] > sae.threshold).all()


def test_batch_topk_candidates_give_the_whole_batch_top_kB():
    sae = small_sae('batch_topk', k=2)  # candidates: each row's top 8 of 64
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(50, D_SAE, generator=g)
    one_row_wins = spread.clone()
    one_row_wins[7] += 100.0  # row 7 holds the batch's 64 largest: more than its 8 candidates
    for acts in (spread, one_row_wins, -spread.abs()):
        values, flat = sae._topk_over_batch(acts)
        want_values, want_flat = acts.flatten().topk(2 * 50)
        torch.testing.assert_close(values.sort(descending=True).values, want_values)
        assert set(flat.tolist()) == set(want_flat.tolist())
        assert torch.equal(acts.flatten()[flat], values)


def test_gated_aux_loss_uses_detached_decoder():
    torch.manual_seed(0)
    sae = small_sae('gated')
    x = raw_batch() * sae.act_scale
    _, _, _, aux_loss = sae._train_forward(x)
    aux_loss.backward()
    assert sae.W_dec.grad is None or sae.W_dec.grad.abs().sum() == 0
    assert sae.W_enc.grad.abs().sum() > 0  # the aux loss trains the gate path
    assert sae.r_mag.grad is None or sae.r_mag.grad.abs().sum() == 0


def test_jumprelu_threshold_learns_through_ste():
    for theta in (0.1, 0.5):  # the thresholds start at init_threshold (kept as their log)
        torch.testing.assert_close(small_sae('jumprelu', init_threshold=theta).log_threshold.exp(),
                                   torch.full((D_SAE,), theta))
    torch.manual_seed(0)
    sae = small_sae('jumprelu', bandwidth=0.5, init_threshold=0.5)
    x = raw_batch(B=256)
    sae.set_act_scale(x)
    loss, stats = sae.loss(x, 0)
    loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0
    f = sae.encode(x)
    assert (f[f != 0] > torch.exp(sae.log_threshold).expand_as(f)[f != 0]).all()
    assert stats['sparsity_loss'] == pytest.approx(float(stats['coef'] * stats['l0']), rel=1e-5)


def test_jumprelu_thresholds_get_their_own_learning_rate():
    sae = small_sae('jumprelu', threshold_lr_scale=10.0)
    opt = S.make_optimizer(sae, 1e-3)
    lrs = {id(p): g['lr'] for g in opt.param_groups for p in g['params']}
    assert lrs[id(sae.log_threshold)] == pytest.approx(1e-2) and lrs[id(sae.W_enc)] == pytest.approx(1e-3)
    assert sum(len(g['params']) for g in opt.param_groups) == len(list(sae.parameters()))
    std = S.make_optimizer(small_sae('standard'), 1e-3)
    assert [g['lr_scale'] for g in std.param_groups] == [1.0]


def test_saes_sharing_one_optimizer_train_as_with_one_each():
    # train.py's sweep steps all its SAEs with one Adam (one call a step, not one per SAE): Adam
    # updates each parameter on its own, so each SAE must end bit for bit where it ends alone, with
    # JumpReLU's second lr group, p-annealing's updates and rescales, and TopK's dead latents
    archs = ('standard', 'jumprelu', 'p_anneal', 'topk', 'gated')

    def made():
        torch.manual_seed(0)
        saes = [small_sae(arch, total_steps=12, anneal_start=2, n_anneal_steps=4) if arch == 'p_anneal'
                else small_sae(arch, **({'dead_tokens': 32} if arch == 'topk' else {})) for arch in archs]
        for sae in saes:
            sae.set_act_scale(raw_batch())
        return saes
    alone, shared = made(), made()
    optimizers = [S.make_optimizer(sae, 1e-2) for sae in alone]
    optimizer = S.make_optimizer(shared, 1e-2)
    assert [g['lr_scale'] for g in optimizer.param_groups] == [1.0, 10.0]  # JumpReLU's thresholds apart
    for step in range(12):
        x, lr = raw_batch(seed=step), 1e-2 * min(1.0, (step + 1) / 3)
        want = [S.train_step(sae, opt, x, step, lr) for sae, opt in zip(alone, optimizers)]
        got = S.train_step(shared, optimizer, x, step, lr)
        assert [float(w['loss']) for w in want] == [float(g['loss']) for g in got]
    for a, b in zip(alone, shared):
        assert a.p == b.p and a.coef == b.coef
        for k, v in a.state_dict().items():
            assert torch.equal(b.state_dict()[k], v), (a.arch, k)
    assert shared[2].n_anneal_done == 4 and shared[2].p < 1  # the schedule ran
    assert int(shared[3].tokens_since_fired.max()) >= 32  # some TopK latent went dead: its aux loss trained


def test_batch_topk_threshold_is_the_ema_of_the_smallest_kept_value():
    sae = hand_sae('batch_topk', 4, k=1, threshold_decay=0.9)
    sae.act_scale.fill_(2.0)  # features live in normalised units: twice the raw values here
    # before any training step: top-k per row
    assert sae.encode(torch.tensor([[1.0, 3.0, 2.0, 0.0]])).tolist() == [[0.0, 6.0, 0.0, 0.0]]
    sae.train()
    # k * B = 2 kept over the batch: 6 and 4 (normalised); the first batch sets the threshold
    sae.loss(torch.tensor([[3.0, 0.5, 0.0, 0.0], [0.25, 2.0, 0.0, 0.0]]), 0)
    assert sae.threshold.item() == 4.0
    # kept 8 and 2: 0.9 * 4 + 0.1 * 2
    sae.loss(torch.tensor([[4.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.125, 0.0]]), 1)
    assert sae.threshold.item() == pytest.approx(3.8, rel=1e-6)
    # the second kept value is 0 (one positive activation in the batch): no update
    sae.loss(torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]]), 2)
    assert sae.threshold.item() == pytest.approx(3.8, rel=1e-6)
    sae.eval()
    sae.loss(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), 3)  # evaluation does not move it
    assert sae.threshold.item() == pytest.approx(3.8, rel=1e-6)
    # inference keeps what lies strictly above the threshold, row by row (normalised 3.6, 3.9, 10)
    assert sae.encode(torch.tensor([[1.8, 1.95, 5.0, -3.0]]))[0].tolist() == pytest.approx([0.0, 3.9, 10.0, 0.0])


def test_jumprelu_straight_through_gradients_exact():
    eps = 0.1  # bandwidth: the kernel is 1 where |z - theta| < eps / 2 = 0.05
    theta = torch.tensor([0.5, 0.5, 0.68], requires_grad=True)
    # z - theta: [[-0.2, 0.02, 0.02], [-0.06, 0.04, -0.58]]: inside the kernel at (0, 1), (1, 1), (0, 2)
    z = torch.tensor([[0.3, 0.52, 0.7], [0.44, 0.54, 0.1]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # the gradient arriving from above
    f, l0 = S.jumprelu_straight_through(z, theta, eps)
    assert f.flatten().tolist() == pytest.approx([0.0, 0.52, 0.7, 0.0, 0.54, 0.0])
    assert torch.equal(f, z.detach() * (z.detach() > theta.detach()))  # z * H(z - theta), to the bit
    assert l0.item() == 1.5  # rows fire 2 and 1 times
    f.backward(g)
    assert z.grad.tolist() == [[0.0, 2.0, 3.0], [0.0, 5.0, 0.0]]  # g where z > theta
    # -(theta / eps) * sum of g inside the kernel: -(0.5 / 0.1) * (2 + 5) and -(0.68 / 0.1) * 3
    assert theta.grad.tolist() == pytest.approx([0.0, -35.0, -20.4], rel=1e-6)
    z.grad = theta.grad = None
    f, l0 = S.jumprelu_straight_through(z, theta, eps)
    l0.backward()
    assert z.grad is None or z.grad.abs().sum() == 0  # the count passes no gradient to z
    # -(1 / eps) * the kernel's count per feature (0, 2, 1) over the batch's 2 rows
    assert theta.grad.tolist() == pytest.approx([0.0, -10.0, -5.0], rel=1e-6)


def test_jumprelu_sae_gradients_are_the_closed_form():
    torch.manual_seed(0)
    sae = small_sae('jumprelu', bandwidth=2.0, init_threshold=1.0, coef=0.3)
    x = raw_batch(B=64)
    sae.set_act_scale(x)
    loss, _ = sae.loss(x, 0)
    loss.backward()
    with torch.no_grad():
        xn = x * sae.act_scale
        z = (xn - sae.b_dec) @ sae.W_enc + sae.b_enc  # (B, d_sae)
        theta = torch.exp(sae.log_threshold)
        f = z * (z > theta)
        dmse_df = -2 * (xn - f @ sae.W_dec - sae.b_dec) @ sae.W_dec.T / len(x)  # d mean ||x - x_hat||^2 / df
        kernel = ((z - theta).abs() < 1.0).float()  # bandwidth 2
        assert 0 < kernel.mean() < 1
        dtheta = (dmse_df * -(theta / 2.0) * kernel).sum(0) + 0.3 * (-(1 / 2.0) * kernel).sum(0) / len(x)
        torch.testing.assert_close(sae.log_threshold.grad, dtheta * theta, rtol=1e-4, atol=1e-6)  # d/dlog = theta d/dtheta
        torch.testing.assert_close(sae.b_enc.grad, (dmse_df * (z > theta)).sum(0), rtol=1e-4, atol=1e-6)


def test_gated_losses_exact_on_a_hand_case():
    sae = hand_sae('gated', 2, coef=0.4)
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([-1.0, 0.5]))  # the gate's bias
        sae.r_mag.fill_(math.log(2.0))  # the magnitude path scales W_enc by 2
        sae.b_mag.copy_(torch.tensor([0.1, -3.0]))
    x = torch.tensor([[2.0, 1.0], [0.5, -1.0]])
    # pi_gate = x + b_gate = [[1, 1.5], [-0.5, -0.5]]; pi_mag = 2x + b_mag = [[4.1, -1], [1.1, -5]]
    # f = 1[pi_gate > 0] * ReLU(pi_mag) = [[4.1, 0], [0, 0]] = x_hat
    assert sae.encode(x).flatten().tolist() == pytest.approx([4.1, 0.0, 0.0, 0.0])
    _, stats = sae.loss(x, 0)
    assert stats['mse'] == pytest.approx(((2.1 ** 2 + 1) + (0.25 + 1)) / 2, rel=1e-6)
    # L1 of ReLU(pi_gate) = [[1, 1.5], [0, 0]], per row, averaged: 1.25
    assert stats['sparsity_loss'] == pytest.approx(0.4 * 1.25, rel=1e-6)
    # the gate path rebuilds x as ReLU(pi_gate) W_dec + b_dec = [[1, 1.5], [0, 0]]:
    # squared errors 1 + 0.25 and 0.25 + 1
    assert stats['aux_loss'] == pytest.approx(1.25, rel=1e-6)
    # its gradient reaches the gate's bias (only where the gate is open) and not the decoder:
    # d/db_gate = mean over rows of -2 (x - x_hat_gate) W_dec^T 1[pi_gate > 0] = [-2, 1] / 2
    aux = sae._train_forward(x)[3]
    grad_b, grad_dec = torch.autograd.grad(aux, [sae.b_enc, sae.W_dec], allow_unused=True)
    assert grad_b.tolist() == pytest.approx([-1.0, 0.5]) and (grad_dec is None or not grad_dec.any())


def test_lp_penalty_gradient_finite_at_zero():
    acts = torch.relu(torch.randn(8, 32)).requires_grad_()
    S.lp_sum(acts, 0.3).sum().backward()
    assert torch.isfinite(acts.grad).all()
    assert (acts.grad[acts.detach() == 0] == 0).all()
    # zeros add nothing to the value either (1e-12 ** 0.2 would add 0.004 each)
    assert S.lp_sum(torch.tensor([[0.0, 0.0, 1.0, 4.0]]), 0.2).item() == pytest.approx(1 + 4 ** 0.2, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# p-annealing

@pytest.mark.parametrize('arch', ['p_anneal', 'gated_anneal'])
def test_p_schedule(arch):
    torch.manual_seed(0)
    total = 60
    sae = small_sae(arch, total_steps=total, anneal_start=0.25)
    schedule = sae.p_schedule()
    # written out by hand: 10 updates from step 0.25 * 60 = 15 to the final step 59, 44/9 apart
    # (rounded: 15, 19.9, 24.8, 29.7, 34.6, 39.4, 44.3, 49.2, 54.1, 59), p from 1 down to 0.2 by 0.8/9
    steps = [15, 20, 25, 30, 35, 39, 44, 49, 54, 59]
    ps = [1 - k * 0.8 / 9 for k in range(10)]
    assert [s for s, _ in schedule] == steps
    assert [p for _, p in schedule] == pytest.approx(ps)
    assert small_sae(arch, total_steps=total, anneal_start=15).p_schedule() == schedule  # step == fraction
    history = S.train_sae(sae, (raw_batch(seed=s) for s in range(total)), lr=1e-3, warmup_steps=1)
    used = [h['p'] for h in history]
    # the loss at step s uses the p of the last update made after an earlier step (updates run
    # after the optimiser step); the first update keeps p = 1, as in the paper's code
    expected = [1.0] * total
    for update_step, p in zip(steps, ps):
        for s in range(update_step + 1, total):
            expected[s] = p
    assert used == pytest.approx(expected)
    assert [sae.p_at(s) for s in range(total)] == pytest.approx(expected)
    assert used[:21] == [1.0] * 21 and used[21] == pytest.approx(1 - 0.8 / 9)  # p first drops after step 20
    assert used[-1] == pytest.approx(1 - 8 * 0.8 / 9)  # ends near p = 0.29
    assert sae.p == pytest.approx(0.2) and sae.n_anneal_done == 10
    coefs = [h['coef'] for h in history]
    assert len(set(coefs)) == 9  # initial + a rescale at each of the 8 updates that change p in training
    # an anneal_start past the final step (0.99 of 10 steps rounds to step 10): every update falls
    # on the final step 9, so training still ends with every update made, at p_end
    late = small_sae(arch, total_steps=10, anneal_start=0.99)
    assert [s for s, _ in late.p_schedule()] == [9] * 10
    S.train_sae(late, (raw_batch(seed=s) for s in range(10)), lr=1e-3, warmup_steps=1)
    assert late.p == pytest.approx(0.2) and late.n_anneal_done == 10


def test_a_p_annealing_sae_rebuilt_inside_its_history_window_rescales_as_the_original():
    # the update at step 19 rescales coef by the L_p of the batches of steps 15-18: an SAE rebuilt
    # from to_dict after step 17 (a sweep checkpoint) keeps those it has seen
    torch.manual_seed(0)
    a = S.make_sae('p_anneal', 4, 8, total_steps=20, anneal_start=10, n_anneal_steps=2, history_len=5)
    coef, opt, g = a.coef, S.make_optimizer(a, 1e-2), torch.Generator().manual_seed(0)
    for step in range(18):
        S.train_step(a, opt, torch.randn(64, 4, generator=g) * 3, step, 1e-2)
    assert len(a.lp_history) == 3
    b = S.from_dict(S.to_dict(a))
    for sae in (a, b):
        sae.after_optimizer_step(19)
    assert a.p == b.p == pytest.approx(0.2) and a.coef != coef and b.coef == pytest.approx(a.coef, rel=1e-12)


def test_set_total_steps_moves_the_p_schedule_until_it_starts():
    sae = small_sae('p_anneal', total_steps=1000, anneal_start=0.2)
    sae.set_total_steps(60)
    assert sae.cfg['total_steps'] == 60
    assert sae._schedule == small_sae('p_anneal', total_steps=60, anneal_start=0.2).p_schedule()
    for step in range(13):  # the first update falls on step 12
        sae.after_optimizer_step(step)
    assert sae.n_anneal_done == 1
    with pytest.raises(RuntimeError, match='has started'):
        sae.set_total_steps(100)


@pytest.mark.parametrize('arch', ['p_anneal', 'gated_anneal'])
def test_penalty_value_continuous_at_each_rescale(arch):
    torch.manual_seed(0)
    total = 100
    sae = small_sae(arch, total_steps=total, anneal_start=0.3)
    x = raw_batch(B=64)
    sae.set_act_scale(x)
    train_a_little(sae, steps=5, lr=1e-2)
    sae.train()
    for update_step, new_p in sae.p_schedule():
        # fill the history with the same batch, then apply the update at its step
        for _ in range(sae.cfg['history_len']):
            _, before = sae.loss(x, update_step)
        sae.after_optimizer_step(update_step)
        _, after = sae.loss(x, update_step + 1)
        assert after['p'] == pytest.approx(new_p)
        assert after['sparsity_loss'] == pytest.approx(float(before['sparsity_loss']), rel=1e-4)
        if new_p != before['p']:
            assert after['coef'] != before['coef']
    assert sae.p == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------
# recovery of a known sparse dictionary

def synthetic_data(seed=1234, d_in=32, n_true=64, avg_active=3):
    """x = sum of ~avg_active of n_true random unit directions with magnitudes in [0.5, 1.5],
    times 7, plus an offset."""
    g = torch.Generator().manual_seed(seed)
    true_dirs = torch.randn(n_true, d_in, generator=g)
    true_dirs /= true_dirs.norm(dim=1, keepdim=True)

    def batch(B):
        active = torch.rand(B, n_true, generator=g) < avg_active / n_true
        magnitudes = 0.5 + torch.rand(B, n_true, generator=g)
        return (active * magnitudes) @ true_dirs * 7.0 + 0.3
    return true_dirs, batch


def fraction_recovered(sae, true_dirs, min_cos=0.9):
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    best_cos = (true_dirs @ rows.T).max(1).values  # (n_true,)
    return (best_cos > min_cos).float().mean().item()


# max_l0: the bound on L0 at inference on fresh data (3 true directions are active on average);
# None for TopK, whose L0 is k by construction
@pytest.mark.parametrize('arch,kwargs,min_recovered,max_l0', [
    ('standard', dict(coef=2.0), 0.9, 10),
    ('gated', dict(coef=4.0), 0.85, 6),
    ('p_anneal', dict(coef=2.0), 0.9, 10),
    ('gated_anneal', dict(coef=4.0), 0.8, 6),
    ('topk', dict(k=4, dead_tokens=256 * 50), 0.9, None),
    ('batch_topk', dict(k=4, dead_tokens=256 * 50), 0.85, 5),  # inference: the learned threshold
    ('jumprelu', dict(coef=1.0, bandwidth=0.5), 0.85, 5),
])
def test_recovers_known_sparse_dictionary(arch, kwargs, min_recovered, max_l0):
    torch.manual_seed(0)
    steps = 600
    true_dirs, batch = synthetic_data()
    sae = S.make_sae(arch, 32, 128, total_steps=steps, **kwargs)
    sample = batch(4096)
    sae.set_act_scale(sample)
    sae.init_b_dec(sample)
    assert fraction_recovered(sae, true_dirs) < 0.2  # random directions do not pass
    history = S.train_sae(sae, (batch(256) for _ in range(steps)), lr=1e-2, warmup_steps=50)
    assert fraction_recovered(sae, true_dirs) >= min_recovered
    assert history[-1]['explained_variance'] > 0.8
    if max_l0 is not None:
        assert metrics.l0(sae.eval().encode(batch(2048))) < max_l0


# ---------------------------------------------------------------------------------------------
# file errors

def _assert_clear_error(path, game=None):
    with pytest.raises(S.SAEFileError) as info:
        S.load(str(path), game=game) if game else S.load(str(path))
    message = str(info.value)
    assert str(path) in message
    assert f'python train.py --game {game or "<game>"} --stage sae' in message
    return message


def test_choose_device_refuses_a_device_this_machine_lacks(monkeypatch):
    import model as M
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert M.choose_device('cuda') == 'cuda' and M.choose_device('cuda:0') == 'cuda:0'
    with pytest.raises(D.UserError, match='has 1 CUDA device'):
        M.choose_device('cuda:1')  # devices 0..count-1
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for name in ('cuda', 'cuda:0'):
        with pytest.raises(D.UserError, match='not available here'):
            M.choose_device(name)


def test_chess_game_seeds_differ_across_seed_and_game():
    # the seed of game i of --seed s: sha256 of 'chess:s:i' (so seed 1's game 23 is not seed 12's game 3)
    assert D.chess_game_seed(1337, 0) == int.from_bytes(hashlib.sha256(b'chess:1337:0').digest()[:8], 'little')
    assert D.chess_game_seed(1, 23) != D.chess_game_seed(12, 3)


def test_data_of_another_game_is_refused(tmp_path):
    # an Othello set copied into data/chess/ is not chess data
    D.prepare(D.DataConfig(game='othello', n_games=20, n_val=10, n_label_games=5, workers=1,
                           data_dir=str(tmp_path / 'data')), log=lambda _: None)
    shutil.copytree(tmp_path / 'data' / 'othello', tmp_path / 'data' / 'chess')
    with pytest.raises(D.DataError, match='holds othello data, not chess'):
        D.load_data('chess', 'train', str(tmp_path / 'data'))


def test_digests_read_every_byte(tmp_path):
    # the digests a resume and evaluate.py compare: a difference in the last token of the last
    # game, or in the last byte of a file past a few MiB (a model.pt is hundreds), is another digest
    tokens = torch.zeros(100, 60, dtype=torch.uint8)
    other = tokens.clone()
    other[-1, -1] = 1
    assert D.tokens_digest(tokens) != D.tokens_digest(other) and D.tokens_digest(tokens) == D.tokens_digest(tokens.clone())
    data = bytearray(3 * 2 ** 20)
    (tmp_path / 'a').write_bytes(bytes(data))
    data[-1] = 1
    (tmp_path / 'b').write_bytes(bytes(data))
    assert D.file_digest(tmp_path / 'a') != D.file_digest(tmp_path / 'b')


def test_load_errors_are_clear(tmp_path):
    _assert_clear_error(tmp_path / 'missing.pt')
    _assert_clear_error(tmp_path / 'missing.pt', game='chess')

    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'not a torch file at all')
    assert 'if it is the file meant, delete it' in _assert_clear_error(corrupt)
    # a directory (out/othello/saes, one level short) is not called corrupt, nor to be deleted
    assert 'is a directory, not a boardgame-saes/sae file' in _assert_clear_error(tmp_path)

    not_sae = tmp_path / 'model.pt'
    torch.save({'model': {'w': torch.zeros(2)}, 'iter_num': 3}, not_sae)
    assert 'not a boardgame-saes/sae file' in _assert_clear_error(not_sae)

    not_a_dict = tmp_path / 'tensor.pt'
    torch.save(torch.zeros(3), not_a_dict)
    _assert_clear_error(not_a_dict)

    sae = small_sae('standard')
    wrong_version = tmp_path / 'old.pt'
    S.save(sae, str(wrong_version), {})
    checkpoint = torch.load(wrong_version, weights_only=True)
    checkpoint['version'] = 0
    torch.save(checkpoint, wrong_version)
    assert 'version' in _assert_clear_error(wrong_version)
    del checkpoint['version']  # none at all is not this code's version either
    torch.save(checkpoint, wrong_version)
    assert 'has format version None' in _assert_clear_error(wrong_version)

    truncated = tmp_path / 'truncated.pt'
    S.save(sae, str(truncated), {})
    truncated.write_bytes(truncated.read_bytes()[:200])
    _assert_clear_error(truncated)

    othello = tmp_path / 'othello_sae.pt'  # an SAE of another game's model
    S.save(sae, str(othello), {'game': 'othello'})
    assert S.load(str(othello), game='othello').meta['game'] == 'othello'
    assert 'is an SAE of a model of othello, not chess' in _assert_clear_error(othello, game='chess')
    no_game = tmp_path / 'no_game.pt'  # one whose meta records no game: not taken for any game's
    S.save(sae, str(no_game), {})
    assert 'is an SAE of a model of None, not othello' in _assert_clear_error(no_game, game='othello')
    # another of the project's files (a model checkpoint) given as an SAE: named as what it is not
    model_file = tmp_path / 'gpt.pt'
    save_checkpoint(str(model_file), GPT(GPTConfig(vocab_size=61, block_size=8, n_layer=1, n_head=1, n_embd=8)),
                    'othello', {'iter': 1})
    assert 'gpt.pt is not a boardgame-saes/sae file' in _assert_clear_error(model_file, game='othello')

    assert issubclass(S.SAEFileError, ValueError)


def test_a_new_architecture_is_one_class(tmp_path):
    class DoubledL1(S.StandardSAE):  # a variant: setting `arch` is its whole registration
        arch = 'doubled_l1_test'

        def _penalty(self, acts):
            return 2 * super()._penalty(acts)
    try:
        sae = S.make_sae('doubled_l1_test', D_IN, D_SAE, coef=0.5)
        S.save(sae, str(tmp_path / 'v.pt'))
        loaded = S.load(str(tmp_path / 'v.pt'))
        assert type(loaded) is DoubledL1 and 'doubled_l1_test' in S.ARCHS
        x = raw_batch()
        base = S.StandardSAE(D_IN, D_SAE, coef=0.5)
        base.load_state_dict(sae.state_dict())
        assert sae.loss(x, 0)[1]['sparsity_loss'] == pytest.approx(2 * base.loss(x, 0)[1]['sparsity_loss'])
        class Helper(S.StandardSAE):  # a subclass without an arch of its own registers nothing
            pass
        assert S.ARCHS['standard'] is S.StandardSAE and Helper not in S.ARCHS.values()
    finally:
        S.ARCHS.pop('doubled_l1_test', None)


def test_to_dict_is_a_copy_and_train_sae_runs_total_steps():
    sae = small_sae('standard', total_steps=3)
    d = S.to_dict(sae)
    before = d['state_dict']['W_enc'].clone()
    with torch.no_grad():
        sae.W_enc += 1  # training goes on: the saved dict keeps what it was given
    assert torch.equal(d['state_dict']['W_enc'], before)
    batches = [raw_batch(seed=s) for s in range(5)]
    assert len(S.train_sae(sae, iter(batches), lr=1e-3, warmup_steps=1)) == 3  # the SAE's total_steps
    assert len(S.train_sae(sae, iter(batches), lr=1e-3, warmup_steps=1, total_steps=2)) == 2
    assert len(S.train_sae(small_sae('topk', total_steps=None), iter(batches), lr=1e-3, warmup_steps=1)) == 5


def test_make_sae_unknown_arch():
    with pytest.raises(ValueError, match='unknown SAE arch'):
        S.make_sae('nope', 4, 8)
    with pytest.raises(ValueError, match='total_steps'):
        S.make_sae('p_anneal', 4, 8)


# ------------------------------------------------------------------------------------------------
# metrics.py: brute-force oracles written straight from the definitions in metrics.coverage's and
# metrics.board_reconstruction's docstrings, as plain loops

THRESHOLDS = [i / 10 for i in range(10)]


# ---------------------------------------------------------------------------------------------
# Brute-force references (pure Python lists and loops)
# ---------------------------------------------------------------------------------------------

def bf_max(acts):
    n, nf = len(acts), len(acts[0])
    return [max(acts[i][f] for i in range(n)) for f in range(nf)]


def bf_fires(acts, maxf, t, i, f):
    return maxf[f] > 0 and acts[i][f] > t * maxf[f]


def bf_f1(tp, fp, fn):
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else 0.0


def bf_counts(acts, labels, maxf, t, f, g):
    tp = fp = fn = 0
    for i in range(len(acts)):
        fire, true = bf_fires(acts, maxf, t, i, f), labels[i][g]
        tp += fire and true
        fp += fire and not true
        fn += true and not fire
    return tp, fp, fn


def bf_coverage(acts_t, labels_t, thresholds=THRESHOLDS):
    acts, labels = acts_t.tolist(), labels_t.tolist()
    maxf = bf_max(acts)
    n_feat, n_el = len(acts[0]), len(labels[0])
    best = None
    for t in thresholds:
        scores = []
        for g in range(n_el):
            if not any(labels[i][g] for i in range(len(acts))):
                continue  # element never occurs: excluded from the mean
            best_f1 = 0.0
            for f in range(n_feat):
                if maxf[f] <= 0:
                    continue  # dead feature
                best_f1 = max(best_f1, bf_f1(*bf_counts(acts, labels, maxf, t, f, g)))
            scores.append(best_f1)
        score = sum(scores) / len(scores) if scores else 0.0
        best = score if best is None else max(best, score)
    return best


def bf_reconstruction(acts_tr_t, lab_tr_t, acts_te_t, lab_te_t, thresholds=THRESHOLDS):
    """Returns (test F1 at chosen t, chosen t, train F1s, test F1s, labels at each t)."""
    acts_tr, lab_tr = acts_tr_t.tolist(), lab_tr_t.tolist()
    acts_te, lab_te = acts_te_t.tolist(), lab_te_t.tolist()
    maxf = bf_max(acts_tr)
    n_feat, n_el = len(acts_tr[0]), len(lab_tr[0])

    def board_f1(acts, labels, t, feat_labels):
        tp = fp = fn = 0
        for i in range(len(acts)):
            for g in range(n_el):
                pred = any(feat_labels[f][g] and bf_fires(acts, maxf, t, i, f)
                           for f in range(n_feat))
                tp += pred and labels[i][g]
                fp += pred and not labels[i][g]
                fn += labels[i][g] and not pred
        return bf_f1(tp, fp, fn)

    train_f1, test_f1, all_labels = [], [], []
    for t in thresholds:
        feat_labels = [[False] * n_el for _ in range(n_feat)]
        for f in range(n_feat):
            n_fire = sum(bf_fires(acts_tr, maxf, t, i, f) for i in range(len(acts_tr)))
            for g in range(n_el):
                tp = bf_counts(acts_tr, lab_tr, maxf, t, f, g)[0]
                feat_labels[f][g] = n_fire > 0 and tp / n_fire >= 0.95 and tp >= 10
        train_f1.append(board_f1(acts_tr, lab_tr, t, feat_labels))
        test_f1.append(board_f1(acts_te, lab_te, t, feat_labels))
        all_labels.append(feat_labels)
    best = max(train_f1)
    k = train_f1.index(best)  # lowest t among ties
    return test_f1[k], thresholds[k], train_f1, test_f1, all_labels


# ---------------------------------------------------------------------------------------------
# Random cases with planted structure (so labelling and reconstruction are non-trivial)
# ---------------------------------------------------------------------------------------------

def random_case(seed, n=60, n_feat=7, n_el=5):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, n_el, generator=gen) < 0.35
    acts = torch.zeros(n, n_feat)
    for f in range(min(n_el, n_feat - 2)):  # feature f tracks element f, plus weak noise
        strong = labels[:, f].float() * (0.3 + torch.rand(n, generator=gen))
        noise = (torch.rand(n, generator=gen) < 0.15).float() * 0.3 * torch.rand(n, generator=gen)
        acts[:, f] = torch.maximum(strong, noise)
    acts[:, -2] = torch.randn(n, generator=gen)  # signed, neuron-like feature
    acts[:, -1] = 0.0  # dead feature
    return acts, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_matches_brute_force(seed):
    acts, labels = random_case(seed)
    labels[:, 3] = False  # an element that never occurs
    assert metrics.coverage(acts, labels) == pytest.approx(bf_coverage(acts, labels), abs=1e-9)
    pure_random = torch.rand(50, 6) * (torch.rand(50, 6) < 0.4)
    assert metrics.coverage(pure_random, labels[:50]) == pytest.approx(
        bf_coverage(pure_random, labels[:50]), abs=1e-9)
    # an activation at a threshold's edge: float32's 0.1 is 0.1000000015, above 0.1 x the max 1.0,
    # so it fires at t = 0.1 (compared in float64): at t = 0.1 the feature is exact
    acts, labels = torch.tensor([[1.0], [0.1], [0.05]]), torch.tensor([[True], [True], [False]])
    assert metrics.coverage(acts, labels, thresholds=(0.0, 0.1)) == bf_coverage(acts, labels, (0.0, 0.1)) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_matches_brute_force(seed):
    acts_tr, lab_tr = random_case(seed, n=90)
    acts_te, lab_te = random_case(seed + 100, n=50)
    got = metrics.reconstruction_details(acts_tr, lab_tr, acts_te, lab_te)
    f1, t, train_f1, test_f1, all_labels = bf_reconstruction(acts_tr, lab_tr, acts_te, lab_te)
    assert got["threshold"] == t
    assert got["f1"] == pytest.approx(f1, abs=1e-9)
    assert got["train_f1"] == pytest.approx(train_f1, abs=1e-9)
    assert got["test_f1"] == pytest.approx(test_f1, abs=1e-9)
    assert got["feature_labels"].tolist() == all_labels[THRESHOLDS.index(t)]
    assert got["feature_labels"].any() and 0 < f1 < 1  # non-trivial: some features labelled
    assert metrics.board_reconstruction(acts_tr, lab_tr, acts_te, lab_te) == pytest.approx(f1, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_by_group_scores_equal_each_set_alone_by_brute_force(seed):
    acts_tr, lab_tr = random_case(seed, n=120, n_feat=12, n_el=9)
    acts_te, lab_te = random_case(seed + 100, n=70, n_feat=12, n_el=9)
    lab_tr[:, 4] = False  # a one-element set that never occurs on train
    lab_tr[:, 6] = False  # and an element of the last set: its mean is over the other three
    sizes = [4, 1, 4]
    cov = metrics.coverage_by_group(acts_tr, lab_tr, sizes)
    rec = metrics.reconstruction_by_group(acts_tr, lab_tr, acts_te, lab_te, sizes)
    assert len(cov) == len(rec) == 3 and cov[1] == 0.0
    assert metrics.scores_by_group(acts_tr, lab_tr, acts_te, lab_te, sizes) == (cov, rec)  # one pass, same numbers
    for i, s in enumerate([slice(0, 4), slice(4, 5), slice(5, 9)]):
        assert cov[i] == pytest.approx(bf_coverage(acts_tr, lab_tr[:, s]), abs=1e-9)
        assert rec[i] == pytest.approx(bf_reconstruction(acts_tr, lab_tr[:, s], acts_te, lab_te[:, s])[0], abs=1e-9)
    assert max(rec) > 0  # non-trivial: some features are labelled
    with pytest.raises(AssertionError):
        metrics.coverage_by_group(acts_tr, lab_tr, [4, 4])  # sizes must cover every column


@pytest.mark.parametrize("dense", [False, True])
def test_firing_counts_exact(dense, monkeypatch):
    acts, labels = random_case(3, n=80)
    if dense:  # all > 0, like probabilities: every threshold's new entries fill over 1/16 -> dense matmuls
        acts = torch.rand(acts.shape, generator=torch.Generator().manual_seed(3)) + 1e-3
    sparse_products = []
    ones_csr = metrics._ones_csr
    monkeypatch.setattr(metrics, '_ones_csr', lambda *a: sparse_products.append(1) or ones_csr(*a))
    thresholds = metrics._check_thresholds(None)
    max_f = acts.amax(0)
    entries = metrics._by_feature(metrics._firing_entries(acts, max_f, thresholds))
    maxf, A, L = bf_max(acts.tolist()), acts.tolist(), labels.tolist()
    seen = []
    for k, tp, n_fire in metrics._counts_per_threshold(entries, labels.float(), 7, 10):
        t = thresholds[k]
        seen.append(k)
        for f in range(acts.shape[1]):
            assert n_fire[f].item() == sum(bf_fires(A, maxf, t, i, f) for i in range(len(A)))
            for g in range(labels.shape[1]):
                assert tp[f, g].item() == bf_counts(A, L, maxf, t, f, g)[0]
    assert seen == list(range(9, -1, -1))
    assert len(sparse_products) == (0 if dense else 10)  # each path taken where it should be


def test_unsorted_thresholds():
    acts_tr, lab_tr = random_case(4, n=90)
    shuffled = [0.5, 0.0, 0.9, 0.2]
    assert metrics.coverage(acts_tr, lab_tr, shuffled) == pytest.approx(
        bf_coverage(acts_tr, lab_tr, sorted(shuffled)), abs=1e-9)
    acts_te, lab_te = random_case(104, n=90)
    d = metrics.reconstruction_details(acts_tr, lab_tr, acts_te, lab_te, shuffled)
    assert d["thresholds"] == (0.0, 0.2, 0.5, 0.9)
    # each threshold's F1s, the chosen t and its score: those of the sorted thresholds, brute force
    f1, t, train_f1, test_f1, _ = bf_reconstruction(acts_tr, lab_tr, acts_te, lab_te, sorted(shuffled))
    assert max(train_f1) > 0 and len(set(train_f1)) > 1  # not a trivial case
    assert d["train_f1"] == pytest.approx(train_f1, abs=1e-9) and d["test_f1"] == pytest.approx(test_f1, abs=1e-9)
    assert (d["threshold"], d["f1"]) == (t, pytest.approx(f1, abs=1e-9))


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------

def test_identical_feature_gives_full_coverage():
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(200, 3, generator=gen) < 0.3
    acts = torch.rand(200, 4, generator=gen) * (torch.rand(200, 4, generator=gen) < 0.3)
    acts[:, 2] = labels[:, 1].float() * 2.0  # feature 2 == element 1
    d = metrics.coverage_details(acts, labels)
    assert d["element_f1"][1].item() == 1.0 and d["element_feature"][1].item() == 2
    assert metrics.coverage(acts, labels[:, 1:2]) == 1.0  # the only element


def test_absent_elements_excluded_from_coverage():
    labels = torch.zeros(20, 2, dtype=torch.bool)
    labels[::3, 0] = True  # element 1 never occurs
    acts = labels[:, :1].float()
    assert metrics.coverage(acts, labels) == 1.0
    assert torch.isnan(metrics.coverage_details(acts, labels)["element_f1"][1])


def test_threshold_is_strict_and_relative_to_max():
    acts = torch.tensor([[1.0], [0.5], [0.5], [0.0]])
    labels = torch.tensor([[True], [False], [False], [False]])
    assert metrics.coverage(acts, labels, thresholds=[0.5]) == 1.0  # 0.5 > 0.5*1 is False
    assert metrics.coverage(acts, labels, thresholds=[0.4]) == pytest.approx(0.5)  # 2/(3+1)
    assert metrics.coverage(acts, labels) == 1.0  # best t wins
    assert metrics.coverage_details(acts, labels)['threshold'] == 0.5  # the lowest of the tied t (0.5 .. 0.9)


def test_dead_feature_changes_nothing():
    acts_tr, lab_tr = random_case(5, n=90)
    acts_te, lab_te = random_case(6, n=50)
    cov = metrics.coverage(acts_tr, lab_tr)
    rec = metrics.reconstruction_details(acts_tr, lab_tr, acts_te, lab_te)
    for extra in (0.0, -1.0):  # never fires: all zero or all negative on train
        add_tr = torch.cat([acts_tr, torch.full((90, 1), extra)], 1)
        add_te = torch.cat([acts_te, torch.rand(50, 1)], 1)  # positive on test: still dead
        assert metrics.coverage(add_tr, lab_tr) == cov
        rec2 = metrics.reconstruction_details(add_tr, lab_tr, add_te, lab_te)
        assert rec2["f1"] == rec["f1"] and rec2["train_f1"] == rec["train_f1"]
        assert not rec2["feature_labels"][-1].any()


def labelled(n_fire, n_tp):
    """One feature firing at n_fire positions of which n_tp carry the element; 0/1 acts."""
    n = n_fire + 5
    acts = torch.zeros(n, 1)
    acts[:n_fire] = 1.0
    labels = torch.zeros(n, 1, dtype=torch.bool)
    labels[:n_tp] = True
    d = metrics.reconstruction_details(acts, labels, acts, labels, thresholds=[0.0])
    # the score alone agrees (README exercise 3 writes board_reconstruction on its own)
    assert metrics.board_reconstruction(acts, labels, acts, labels, thresholds=[0.0]) == d["f1"]
    return bool(d["feature_labels"][0, 0]), d["f1"]


def test_precision_and_true_positive_boundaries():
    assert labelled(20, 19)[0]  # precision exactly 0.95: accepted
    assert labelled(100, 95)[0]  # exactly 0.95 again
    assert not labelled(19, 18)[0]  # 0.947: rejected
    assert not labelled(99, 94)[0]  # 0.9495: rejected
    assert labelled(10, 10)[0]  # exactly 10 true positives: accepted
    assert not labelled(9, 9)[0]  # 9: rejected
    assert labelled(10, 10)[1] == 1.0  # perfect feature rebuilds the board
    assert labelled(9, 9)[1] == 0.0  # nothing labelled -> nothing predicted


def test_reconstruction_picks_threshold_on_train():
    # Train: at t=0 only feature 1 is labelled (element 1); at t=0.5 only feature 0 (element 0),
    # which rebuilds more of the train board.  Test is built so that t=0 would win there.
    acts_tr = torch.zeros(85, 2)
    lab_tr = torch.zeros(85, 2, dtype=torch.bool)
    acts_tr[0:30, 0], lab_tr[0:30, 0] = 1.0, True  # feature 0 on element 0 ...
    acts_tr[30:60, 0] = 0.3  # ... and weakly elsewhere: precision 0.5 at t=0
    acts_tr[60:79, 1], acts_tr[79, 1], lab_tr[60:80, 1] = 0.3, 1.0, True  # mostly weak
    acts_te = torch.zeros(52, 2)
    lab_te = torch.zeros(52, 2, dtype=torch.bool)
    acts_te[0:2, 0], lab_te[0:2, 0] = 1.0, True
    acts_te[2:52, 1], lab_te[2:52, 1] = 0.3, True
    d = metrics.reconstruction_details(acts_tr, lab_tr, acts_te, lab_te, thresholds=[0.0, 0.5])
    assert d["train_f1"] == pytest.approx([40 / 70, 60 / 80])
    assert d["test_f1"] == pytest.approx([100 / 102, 4 / 54])
    assert d["threshold"] == 0.5 and d["f1"] == pytest.approx(4 / 54)
    assert d["feature_labels"].tolist() == [[True, False], [False, False]]
    assert bf_reconstruction(acts_tr, lab_tr, acts_te, lab_te, [0.0, 0.5])[0] == d["f1"]
    assert metrics.board_reconstruction(acts_tr, lab_tr, acts_te, lab_te, [0.0, 0.5]) == pytest.approx(4 / 54)
    # the by-group path chooses on train too
    assert metrics.reconstruction_by_group(acts_tr, lab_tr, acts_te, lab_te, [2], [0.0, 0.5]) == [pytest.approx(4 / 54)]
    # a tie on train goes to the lowest t: 0/1 train activations score alike at both, and the
    # test's 0.3 fires only at t = 0
    tied = metrics.reconstruction_details(acts_tr.ceil(), lab_tr, 0.3 * acts_tr.ceil(), lab_tr, [0.0, 0.5])
    assert tied['train_f1'] == pytest.approx([40 / 70, 40 / 70]) and tied['test_f1'][1] == 0
    assert (tied['threshold'], tied['f1']) == (0.0, pytest.approx(40 / 70))


def test_f1_helpers():
    pred = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    true = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    assert metrics.micro_f1(pred, true) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert metrics.per_element_f1(pred, true).tolist() == pytest.approx([0.5, 1.0])
    none = torch.zeros(3, 2, dtype=torch.bool)
    assert metrics.micro_f1(none, none) == 0.0


# ---------------------------------------------------------------------------------------------
# Unsupervised metrics
# ---------------------------------------------------------------------------------------------

def test_l0_and_dead_fraction():
    f = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert metrics.l0(f) == 1.5
    assert metrics.l0(f.view(1, 2, 4)) == 1.5
    assert metrics.l0(torch.tensor([[-1.0, 0.0, 2.0]])) == 2.0  # non-zero, of either sign
    assert metrics.dead_fraction(f) == 0.5
    assert metrics.dead_fraction(-f) == 1.0


def test_explained_variance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 8, generator=gen) * 3 + 1000.0  # large mean: float64 matters
    assert metrics.explained_variance(x, x) == 1.0
    mean = x.double().reshape(-1, 8).mean(0)
    assert metrics.explained_variance(x, mean.expand(4, 50, 8)) == pytest.approx(0.0, abs=1e-9)
    x_hat = x + 0.5 * torch.randn(x.shape, generator=gen)
    # the definition, in numpy float64: 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
    xd, hd = x.numpy().astype(np.float64).reshape(-1, 8), x_hat.numpy().astype(np.float64).reshape(-1, 8)
    direct = 1 - ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    assert 0.9 < direct < 1.0
    assert metrics.explained_variance(x, x_hat) == pytest.approx(direct, abs=1e-12)
    ve = metrics.VarianceExplained()
    flat_x, flat_h = x.reshape(-1, 8), x_hat.reshape(-1, 8)
    for lo, hi in [(0, 1), (1, 37), (37, 37), (37, 150), (150, 200)]:  # uneven batches
        ve.update(flat_x[lo:hi], flat_h[lo:hi])
    assert ve.compute() == pytest.approx(direct, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Loss recovered, with a stand-in model exposing model.py's interface
# ---------------------------------------------------------------------------------------------

class FakeModel(nn.Module):
    """A stand-in with model.py's interface (config, forward, residual, forward_from): embedding
    + residual tanh "blocks" + head. Given `pick` (x (B, T) -> token ids (B, T)), its logits put
    all the mass on pick(x) instead: an LM whose answers are known."""

    def __init__(self, vocab=11, d=16, n_layer=3, pad_id=0, block_size=None, pick=None):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(pad_id=pad_id, vocab_size=vocab, n_layer=n_layer, block_size=block_size)
        self.pick = pick
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n_layer))
        self.head = nn.Linear(d, vocab)

    def _loss(self, logits, targets):
        if targets is None:
            return None
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=self.config.pad_id)

    def residual(self, idx, layer):
        h = self.wte(idx)
        for block in self.blocks[:layer + 1]:
            h = h + torch.tanh(block(h))
        return h

    def forward_from(self, resid, layer, targets=None):
        h = resid
        for block in self.blocks[layer + 1:]:
            h = h + torch.tanh(block(h))
        logits = self.head(h)
        return logits, self._loss(logits, targets)

    def forward(self, idx, targets=None, compiled=True):  # compiled: as model.GPT's; none here
        if self.pick is not None:
            logits = F.one_hot(self.pick(idx), self.config.vocab_size).float()
            return logits, self._loss(logits, targets)
        h = self.wte(idx)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        logits = self.head(h)
        return logits, self._loss(logits, targets)



class NaiveDecoding(nn.Module):
    """`model` with model.GPT's decoding interface but no key/value cache: the "cache" holds
    each continuation's whole sequence (B, R, T), and each step reruns the model on all of them:
    the plain definition of greedy decoding."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def prefill(self, idx):
        return self.model(idx)[0], [{'prefix': idx}]

    def decode_step(self, token, pos, cache):
        B, R = token.shape
        if 'seqs' not in cache[0]:
            cache[0]['seqs'] = cache[0]['prefix'][:, None, :].repeat(1, R, 1)
        seqs = cache[0]['seqs']  # (B, R, T)
        seqs.scatter_(2, pos[..., None], token[..., None])
        logits = self.model(seqs.view(B * R, -1))[0].view(B, R, -1, self.config.vocab_size)
        return logits.gather(2, pos[..., None, None].expand(B, R, 1, logits.shape[-1]))[:, :, 0]


def fake_tokens(n=10, t=12):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 11, (n, t + 1), generator=gen)
    for i in range(n):  # right padding of varying length
        tokens[i, t + 1 - i:] = 0
    return tokens


def test_loss_recovered_identity_and_zero():
    model, tokens = FakeModel(), fake_tokens()
    # fitted a little to its tokens, so that zeroing a layer's stream costs loss (untrained, it
    # may cost none, and then there is no score: below)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        optimizer.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()
        optimizer.step()
    for layer in (0, 1):
        ce = metrics.cross_entropies(model, tokens, layer, batch_size=4)
        assert ce['zero'] > ce['clean'] + 0.5
        assert metrics.loss_recovered(model, tokens, layer, lambda r: r, batch_size=4) \
            == pytest.approx(1.0, abs=1e-9)
        assert metrics.loss_recovered(model, tokens, layer, torch.zeros_like, batch_size=4) \
            == pytest.approx(0.0, abs=1e-9)
        half = metrics.loss_recovered(model, tokens, layer, lambda r: 0.5 * r, batch_size=4)
        assert half != pytest.approx(1.0) and half != pytest.approx(0.0)
        # the clean and zero-ablated CEs of an earlier call, reused: the same score
        reference = metrics.cross_entropies(model, tokens, layer, batch_size=4)
        assert set(reference) == {'clean', 'zero'}
        assert metrics.loss_recovered(model, tokens, layer, lambda r: 0.5 * r, 4, reference) == half
        # the residual stream handed in (blocks 0..layer not rerun): the same score
        resid = model.residual(tokens[:, :-1], layer)
        assert metrics.loss_recovered(model, tokens, layer, lambda r: 0.5 * r, 4, reference, resid) == pytest.approx(half, abs=1e-12)
        assert metrics.loss_recovered(model, tokens, layer, lambda r: r, 4, reference,
                                      torch.zeros_like(resid)) == pytest.approx(0.0, abs=1e-9)  # it is the one used
        # the replaced stream handed in as a tensor: the same score as the function
        assert metrics.loss_recovered(model, tokens, layer, 0.5 * resid, 4, reference) == pytest.approx(half, abs=1e-12)
        # zeroing the stream costs nothing (or less than nothing, as on a random-init model): no
        # loss to recover, so no score, even for a perfect reconstruction
        for zero in (reference['clean'], reference['clean'] - 0.1):
            assert math.isnan(metrics.loss_recovered(model, tokens, layer, lambda r: r, 4,
                                                     {'clean': reference['clean'], 'zero': zero}))


def test_cross_entropy_is_token_weighted_over_non_pad():
    model, tokens = FakeModel(), fake_tokens()
    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = model(x)[0]
    keep = y != 0
    direct = F.cross_entropy(logits[keep], y[keep]).item()  # one mean over all real targets
    for bs in (1, 3, 64):  # pads are uneven across batches: a mean of means would differ
        ce = metrics.cross_entropies(model, tokens, 1, lambda r: r, batch_size=bs)
        assert ce["clean"] == pytest.approx(direct, abs=1e-6)
        assert ce["sae"] == pytest.approx(direct, abs=1e-6)
    assert model.training  # training flag restored


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------

def test_linear_probe_separable():
    gen = torch.Generator().manual_seed(0)
    d, n_el = 12, 6
    w, b = torch.randn(d, n_el, generator=gen), torch.randn(n_el, generator=gen)
    x = torch.randn(3000, d, generator=gen) * 2 + 5  # not standardised on purpose
    labels = (x - 5) @ w + b > 0
    out = metrics.linear_probe(x[:2000], labels[:2000], x[2000:], labels[2000:])
    assert set(out) == {"f1_micro", "accuracy", "f1_mean"}
    assert out["f1_micro"] > 0.95 and out["f1_mean"] > 0.95 and out["accuracy"] > 0.95
    shuffled = labels[torch.randperm(3000, generator=gen)]  # no signal: must do worse
    bad = metrics.linear_probe(x[:2000], shuffled[:2000], x[2000:], shuffled[2000:])
    assert bad["f1_micro"] < 0.8
    # the scores, counted by hand from the probe's own predictions (logit > 0)
    pred = (metrics.fit_linear_probe(x[:2000], labels[:2000])(x[2000:]) > 0).tolist()
    true = labels[2000:].tolist()
    count = lambda a, b, e: sum(p[e] == a and t[e] == b for p, t in zip(pred, true))  # pred a, true b
    tp, fp, fn = ([count(a, b, e) for e in range(n_el)] for a, b in ((1, 1), (1, 0), (0, 1)))
    assert out["f1_micro"] == pytest.approx(2 * sum(tp) / (2 * sum(tp) + sum(fp) + sum(fn)), abs=1e-12)
    assert out["accuracy"] == pytest.approx(1 - (sum(fp) + sum(fn)) / (1000 * n_el), abs=1e-12)
    assert out["f1_mean"] == pytest.approx(np.mean([2 * a / (2 * a + b + c) for a, b, c in zip(tp, fp, fn)]), abs=1e-12)
    assert 0 < sum(fp) + sum(fn)  # not a perfect probe: the counts above are not all trivial


def test_linear_probe_does_not_depend_on_the_scale_of_its_inputs():
    # whitening divides by each direction's standard deviation, floored relative to the largest:
    # inputs 1e4 times smaller (every variance under 1e-6) give the same probe
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) @ torch.randn(8, 8, generator=g) + 3  # correlated, off-centre
    labels = x[:, :4] + 0.5 * torch.randn(600, 4, generator=g) > 3
    want = metrics.fit_linear_probe(x[:400], labels[:400])(x[400:])
    small = x * 1e-4
    assert small.var(0).max() < 1e-6
    torch.testing.assert_close(metrics.fit_linear_probe(small[:400], labels[:400])(small[400:]), want,
                               rtol=0, atol=1e-3)


def test_probe_scores_average_f1_over_the_elements_that_occur():
    # element 0: predicted and true once (F1 1); element 1: never true, never predicted (left out)
    logits, labels = torch.tensor([[1.0, -1.0], [-1.0, -1.0]]), torch.tensor([[True, False], [False, False]])
    scores = metrics.probe_scores(logits, labels)
    assert scores == {'f1_micro': 1.0, 'accuracy': 1.0, 'f1_mean': 1.0}


def test_linear_probe_starts_at_the_base_rate():
    # zero weights and the base-rate bias: with no step taken, each element's probability is
    # its frequency on the train set, at every input
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(200, 6, generator=g), torch.rand(200, 4, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.8])
    probe = metrics.fit_linear_probe(x, labels, steps=0)
    want = labels.float().mean(0).expand(50, 4)
    torch.testing.assert_close(torch.sigmoid(probe(torch.randn(50, 6, generator=g))), want, rtol=0, atol=1e-6)


def test_linear_probe_reaches_the_optimum_on_correlated_inputs():
    """Inputs mixed so that their scales span 300x (as a residual stream's directions do), labels
    drawn from a logistic model of the hidden factors: the default fit's train loss equals the
    optimum that L-BFGS finds in float64 (by whitening; plain Adam steps on standardised inputs
    stop about 0.2 nats short here)."""
    gen = torch.Generator().manual_seed(0)
    d, n_el, n = 8, 3, 4000
    mixing = torch.randn(d, d, generator=gen) @ torch.diag(torch.logspace(0, -2.5, d))
    hidden = torch.randn(n, d, generator=gen)
    x = hidden @ mixing.T * 3 + 1
    labels = torch.rand(n, n_el, generator=gen) < torch.sigmoid(hidden @ torch.randn(d, n_el, generator=gen))
    X = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.double)], 1)  # raw inputs and an intercept
    W = torch.zeros(d + 1, n_el, dtype=torch.double, requires_grad=True)
    # converged: 500 iterations end within 1e-8 of where 5000 do (13 s here, against 0.6)
    opt = torch.optim.LBFGS([W], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-12, history_size=50,
                            line_search_fn='strong_wolfe')

    def loss():
        opt.zero_grad()
        value = F.binary_cross_entropy_with_logits(X @ W, labels.double())
        value.backward()
        return value
    opt.step(loss)
    probe = metrics.fit_linear_probe(x, labels)
    assert F.binary_cross_entropy_with_logits(probe(x), labels.float()).item() == pytest.approx(loss().item(), abs=1e-3)


def test_single_feature_scores_match_brute_force():
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(80, generator=g)
    labels = torch.rand(80, 4, generator=g) < 0.4
    for acts in (torch.relu(raw), raw):  # a feature's activations, and signed ones (a neuron's)
        s = metrics.single_feature_scores(acts, labels)
        mx = acts.max().item()
        for e in range(4):
            best = (-1, None)
            for t in THRESHOLDS:
                fires = [a > t * mx for a in acts.tolist()]
                tp = sum(f and l for f, l in zip(fires, labels[:, e].tolist()))
                nf, nt = sum(fires), int(labels[:, e].sum())
                f1 = 2 * tp / (nf + nt) if nf + nt else 0.0
                if f1 > best[0]:
                    best = (f1, t, tp / nf if nf else 0.0, tp / nt if nt else 0.0)
            assert abs(s['f1'][e].item() - best[0]) < 1e-9 and s['threshold'][e].item() == best[1]
            assert abs(s['precision'][e].item() - best[2]) < 1e-9 and abs(s['recall'][e].item() - best[3]) < 1e-9
    # by hand: max 1 (not |-2|), so 0.5 stops firing from t = 0.5 on, where F1 reaches 1
    hand = metrics.single_feature_scores(torch.tensor([-2.0, 0.5, 1.0]), torch.tensor([[False], [False], [True]]))
    assert hand['threshold'].item() == 0.5 and hand['f1'].item() == 1.0
    # 0/1 activations fire alike at every t: the tie goes to the lowest, 0
    binary = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    assert (metrics.single_feature_scores(binary, (binary > 0)[:, None])['threshold'] == 0).all()


# ------------------------------------------------------------------------------------------------
# The legal-move rate, with FakeModels whose answers are known

def peek_next(x):
    """An oracle that 'predicts' the true next token by reading it (the last repeats)."""
    return torch.cat([x[:, 1:], x[:, -1:]], 1)


def test_legal_move_rate_othello_known_answers():
    tokens = torch.from_numpy(D.othello_games(30, seed=2)).long()  # (30, 60)
    # an oracle that knows each game (one batch of 30): it predicts the real next move
    oracle = FakeModel(61, block_size=59, pad_id=D.OTHELLO_PAD, pick=lambda x: tokens[:len(x), 1:x.shape[1] + 1])
    assert metrics.legal_move_rate(oracle, 'othello', tokens) == 1.0
    always_pad = FakeModel(61, block_size=59, pad_id=D.OTHELLO_PAD, pick=lambda x: torch.full_like(x, D.OTHELLO_PAD))
    assert metrics.legal_move_rate(always_pad, 'othello', tokens) == 0.0
    # predicting the move just played is never legal (that square is taken)
    repeat = FakeModel(61, block_size=59, pad_id=D.OTHELLO_PAD, pick=lambda x: x)
    assert metrics.legal_move_rate(repeat, 'othello', tokens) == 0.0


def test_legal_move_rate_chess_known_answers():
    games = [random_game(s, 120) for s in range(6)]
    tokens = encode_chess(games, 121)
    oracle = FakeModel(33, block_size=120, pad_id=CHESS_PAD_ID, pick=peek_next)
    assert metrics.legal_move_rate(NaiveDecoding(oracle), 'chess', tokens) == 1.0
    spaces = FakeModel(33, block_size=120, pad_id=CHESS_PAD_ID, pick=torch.zeros_like)  # ' ' is id 0
    assert CHESS_CHARS[0] == ' ' and metrics.legal_move_rate(NaiveDecoding(spaces), 'chess', tokens) == 0.0
    # a move written without its '+' or '#' is legal (as python-chess's parse_san takes it): an
    # oracle that ends each move where the real one writes a check mark still scores 1
    mate = ';1.e4 e5 2.Bc4 Nc6 3.Qh5 Nf6 4.Qxf7#'
    checks = [g for g in (random_game(s, 300) for s in range(40)) if '+' in g[:112]][:3] + [mate]  # T - 8: 112
    assert len(checks) == 4
    tokens = encode_chess(checks, 121)
    marks = torch.tensor([CHESS_CHARS.index('+'), CHESS_CHARS.index('#')])
    no_marks = FakeModel(33, block_size=120, pad_id=CHESS_PAD_ID,
                         pick=lambda x: peek_next(x).masked_fill(torch.isin(peek_next(x), marks), 0))
    assert metrics.legal_move_rate(NaiveDecoding(no_marks), 'chess', tokens) == 1.0


def test_chess_legal_move_rate_scores_every_move_begun_before_the_last_max_move_chars(monkeypatch):
    # the moves of ';1.e4 e5 2.Nf3 Nc6 3.Bb5 a6' begin at characters 3, 6, 11, 15, 21, 25; with a
    # context of 34 and 8 characters to write, those before 26 are scored: all six
    text = ';1.e4 e5 2.Nf3 Nc6 3.Bb5 a6'
    assert [i for i in range(1, len(text)) if text[i - 1] in '. ' and not text[i].isdigit()] == [3, 6, 11, 15, 21, 25]
    checked = []
    legal_move_text = D.legal_move_text

    def counted(board, move_text, **kw):
        checked.append(move_text)
        return legal_move_text(board, move_text, **kw)

    monkeypatch.setattr(D, 'legal_move_text', counted)
    oracle = FakeModel(33, block_size=34, pad_id=CHESS_PAD_ID, pick=peek_next)
    assert metrics.legal_move_rate(NaiveDecoding(oracle), 'chess', encode_chess([text], 35)) == 1.0
    assert checked == ['e4', 'e5', 'Nf3', 'Nc6', 'Bb5', 'a6']


def test_the_legal_move_rate_of_a_compiled_lm_runs_its_plain_blocks():
    # under no_grad in eval mode, compiled blocks (trained with gradients) would trace and compile
    # again: the rate runs the plain ones. Here "compiled" blocks that fail if called
    torch.manual_seed(0)
    cases = [('othello', GPTConfig(vocab_size=61, block_size=59, n_layer=2, n_head=2, n_embd=16, pad_id=60),
              torch.from_numpy(D.othello_games(6, seed=3)).long()),
             ('chess', GPTConfig(vocab_size=33, block_size=60, n_layer=2, n_head=2, n_embd=16, pad_id=CHESS_PAD_ID),
              encode_chess([random_game(s, 60) for s in range(3)], 61))]
    for game, config, tokens in cases:
        model = GPT(config)
        want = metrics.legal_move_rate(model, game, tokens)

        def compiled_block(x):
            raise AssertionError(f'{game}: a compiled block ran')
        model.compiled_blocks = [compiled_block] * config.n_layer
        assert metrics.legal_move_rate(model, game, tokens) == want


def test_decode_step_matches_forward():
    # continuations of a prefilled batch, three per sequence from different starts, written a
    # token at a time: each step's logits are forward's on the sequence cut at the start and
    # followed by what was written (float64: no rounding doubt)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=33, block_size=40, n_layer=2, n_head=2, n_embd=16, pad_id=32)).double().eval()
    seq = torch.randint(0, 33, (4, 40))
    logits, cache = model.prefill(seq)
    torch.testing.assert_close(logits, model(seq)[0])
    start = torch.tensor([[3, 10, 17], [1, 25, 31], [5, 6, 7], [30, 2, 12]])  # (B, R)
    written = [[seq[b, :start[b, r]].tolist() for r in range(3)] for b in range(4)]
    pos = start.clone()
    for _ in range(6):
        token = torch.randint(0, 33, (4, 3))
        got = model.decode_step(token, pos, cache)  # (4, 3, vocab)
        for b in range(4):
            for r in range(3):
                written[b][r].append(token[b, r].item())
                want = model(torch.tensor([written[b][r]]))[0][0, -1]
                torch.testing.assert_close(got[b, r], want)
        pos = pos + 1


def test_chess_legal_move_rate_with_cache_equals_naive_decoding():
    # a tiny GPT trained a little (so that some of its moves are legal and some are not),
    # scored with model.GPT's key/value cache and by rerunning it on every prefix
    tokens = encode_chess([random_game(s, 128) for s in range(40)], 128)
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=33, block_size=127, n_layer=2, n_head=2, n_embd=32, pad_id=CHESS_PAD_ID))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(tokens[:32, :-1], tokens[:32, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double().eval()
    val = tokens[32:]
    rate = metrics.legal_move_rate(model, 'chess', val, batch_size=3)
    assert 0 < rate < 1
    assert rate == metrics.legal_move_rate(NaiveDecoding(model), 'chess', val)


# ------------------------------------------------------------------------------------------------
# The whole pipeline, tiny

def held_out_batch(model, val_tokens, layer, pad_id, cfg):
    """The batch an SAE file's 'final' scores are of: the first 8192 activations at block `layer`
    that an activation stream over the val games draws from seed + 1."""
    import train as TR
    return next(TR.ActivationStream(model, val_tokens, layer, pad_id,
                                    dataclasses.replace(cfg, sae_batch=8192, sae_buffer=8192), cfg.seed + 1))


def recomputed_scores(root, game, sae_path, n_train, n_test):
    """One SAE's coverage and board reconstruction per BSP set, recomputed from the files alone:
    the residual stream of the SAE's model at each label's (game, pos) in the val games, games
    0..n_train-1 for train and the next n_test for test; a nested set is the mean over its
    properties. Then its L0, variance explained and loss recovered (None where zeroing the stream
    does not raise the loss) on the non-pad inputs of the first min(200, n_test) test games
    (evaluate.py's --n_unsup_games), through the same model. Written from evaluate.py's
    docstring, not its code."""
    sae = S.load(sae_path)
    model_file = 'model_random.pt' if sae.meta['model']['random_init'] else 'model.pt'
    model = load_checkpoint(f'{root}/out/{game}/{model_file}', game)[0].eval()
    labels = D.load_data(game, 'labels', f'{root}/data')
    val = D.load_data(game, 'val', f'{root}/data')
    tokens = val['tokens'][:, :model.config.block_size].long()
    g, p = labels['game_idx'], labels['pos']
    feats = {}
    for split, (lo, hi) in (('train', (0, n_train)), ('test', (n_train, n_train + n_test))):
        rows = (g >= lo) & (g < hi)
        with torch.no_grad():
            resid = model.residual(tokens[lo:hi], sae.meta['layer'])  # (games, T, d)
            feats[split] = sae.encode(resid[g[rows] - lo, p[rows]])  # (positions, d_sae)
        feats[split + '_rows'] = rows
    out = {}
    for name, lab in labels['sets'].items():
        props = list(lab.values()) if isinstance(lab, dict) else [lab]
        cov = [metrics.coverage(feats['train'], l[feats['train_rows']]) for l in props]
        rec = [metrics.board_reconstruction(feats['train'], l[feats['train_rows']], feats['test'], l[feats['test_rows']])
               for l in props]
        out[f'coverage_{name}'], out[f'reconstruction_{name}'] = np.mean(cov), np.mean(rec)
    games = val['tokens'][n_train:n_train + min(200, n_test), :model.config.block_size + 1].long()
    real = games[:, :-1] != val['pad_id']  # (n, T) the inputs that are not pads
    with torch.no_grad():
        resid = model.residual(games[:, :-1], sae.meta['layer'])  # (n, T, d)
    unsup, x_hat = metrics.sae_scores(sae, resid[real], reconstruction=True)
    replaced = resid.clone()
    replaced[real] = x_hat
    ce = metrics.loss_recovered(model, games, sae.meta['layer'], replaced)
    out.update(l0=unsup['l0'], explained_variance=unsup['explained_variance'],
               ce_loss_score=None if math.isnan(ce) else ce)
    return out, feats['train']


def test_tiny_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    import json
    import evaluate as EV
    import train as TR
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    rc, out = run_script('train.py', '--game=othello', '--preset=tiny', *dirs)
    assert rc == 0, out
    assert out.rstrip().endswith(f'next: python evaluate.py --game othello {" ".join(dirs)}')  # where this run wrote
    saes = sorted(os.listdir(f'{tmp_path}/out/othello/saes'))
    assert len(saes) == sum(len(v) for v in __import__('train').SWEEP.values())
    assert len(os.listdir(f'{tmp_path}/out/othello/saes_random')) == len(S.ARCHS)
    sae = S.load(f'{tmp_path}/out/othello/saes/{saes[0]}')
    assert sae.meta['model']['sha256'] == D.file_digest(f'{tmp_path}/out/othello/model.pt')
    assert 'explained_variance' in sae.meta['final'] and sae.meta['train_config']['preset'] == 'tiny'
    # the config saved is the resolved one: --layer's default (-1) is the block read
    assert sae.meta['train_config']['layer'] == sae.meta['layer'] == TR.default_layer(2) == 1
    assert "'layer': 1," in out.split('train.py config:')[1].split('\n')[0]  # and so is the one printed
    # 40 of the 50 games after the train split: the test split ends before the labels do
    rc, out = run_script('evaluate.py', '--game=othello', '--n_train=50', '--n_test=40', '--probe_steps=20', *dirs)
    assert rc == 0, out
    # the log says where the SAE rows' time went: three parts, each timed, that fit in the rows' time
    parts = re.search(rf"the {len(saes) + len(S.ARCHS)} SAE rows' time in: model passes ([0-9.]+)s, "
                      r"L0 / variance / loss recovered ([0-9.]+)s, coverage / reconstruction ([0-9.]+)s", out)
    total, baselines = map(float, re.search(r"rows in ([0-9.]+)s \(the baselines' 5 in ([0-9.]+)s\)", out).groups())
    assert parts and float(parts.group(3)) > 0, out  # 28 SAEs scored: never under 0.05 s
    assert sum(map(float, parts.groups())) <= total - baselines + 0.3, out  # each figure is rounded to 0.1 s
    # every row is logged as it is done (a run cut short still reports it), with the scores it has
    assert re.search(r'^\[1/\d+\] trained .* \| CE score -?[0-9.]+ \| cov_mine_theirs [0-9.]+ \| rec_mine_theirs', out, re.M), out
    logged = re.findall(r'^\[baseline\] (\w+) +(\w+) +(.*) \([0-9.]+s\)$', out, re.M)
    assert [(m, n) for m, n, _ in logged] == [('trained', 'mlp_neurons'), ('trained', 'linear_probe'),
                                              ('trained', 'probe_dictionary'), ('random', 'linear_probe_random'),
                                              ('random', 'probe_dictionary_random')], out
    assert logged[1][2].startswith('rec_mine_theirs ') and 'cov_' not in logged[1][2]  # a probe has no coverage
    results = json.load(open(f'{tmp_path}/out/othello/results.json'))
    assert (results['format'], results['version']) == ('boardgame-saes/results', EV.RESULTS_VERSION)
    rows = {r['name'] + '/' + r['model']: r for r in results['rows']}
    assert len(rows) == len(saes) + len(S.ARCHS) + 5  # + MLP neurons, probe and probe dictionary on both models
    assert 0.0 <= rows['probe_dictionary/trained']['coverage_mine_theirs'] <= 1.0
    for r in results['rows']:
        for k in ('reconstruction_mine_theirs', 'reconstruction_legal'):
            assert 0.0 <= r[k] <= 1.0
    assert {'l0', 'explained_variance', 'ce_loss_score', 'dead_fraction'} <= set(rows['topk_k40/trained'])
    assert '| name |' in open(f'{tmp_path}/out/othello/results.md').read()
    assert os.path.getsize(f'{tmp_path}/out/othello/pareto.png') > 0
    # evaluate lines activations up with labels: an off-by-one position or a train/test swap
    # changes these numbers
    assert (results['config']['n_train'], results['config']['n_test'], results['config']['n_unsup_games']) == (50, 40, 40)
    for sub, name, kind in (('saes', 'topk_k10', 'trained'), ('saes_random', 'batch_topk_k40', 'random')):
        # the scores, L0, variance explained and loss recovered (None for the random-init model,
        # whose zeroed stream does not raise its loss) through the model the SAE read
        path = f'{tmp_path}/out/othello/{sub}/{name}.pt'
        want = recomputed_scores(tmp_path, 'othello', path, 50, 40)[0]
        got = rows[f'{name}/{kind}']
        assert {'l0', 'explained_variance', 'ce_loss_score'} < set(want)
        assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-6)
        assert got['d_sae'] == S.load(path).cfg['d_sae'] == 8 * 32  # the tiny preset: expansion 8 of width 32
    # a split asked for beyond the labels falls back to the labelled games after the train split
    ev = EV.Evaluation(EV.EvalConfig(n_train=30, n_test=1000, device='cpu', data_dir=f'{tmp_path}/data',
                                     out_dir=f'{tmp_path}/out'),
                       log=lambda _: None)
    assert (ev.cfg.n_train, ev.cfg.n_test) == (30, 70)  # 100 labelled
    assert ev.where['test'][0].min() == 30 and ev.where['test'][0].max() == 99
    # the rest in this process (the command lines above already ran as a user runs them)
    capsys.readouterr()
    EV.main(['--game=othello', '--feature=topk_k160:3', *dirs])  # k 160 of 256: it fires
    assert 'best-matching board-state elements' in capsys.readouterr().out
    assert os.path.getsize(f'{tmp_path}/out/othello/feature_topk_k160_3.png') > 0
    # the random-init control's SAE of the same name, through random/
    control = tiny_middle_sae('topk')
    EV.main(['--game=othello', f'--feature=random/{control}:3', *dirs])
    assert f'{control}:3 (random model)' in capsys.readouterr().out
    assert os.path.getsize(f'{tmp_path}/out/othello/feature_random_{control}_3.png') > 0
    code, err = run_main(EV.main, ['--game=othello', '--feature=nosuch:3', *dirs], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "no SAE named 'nosuch'", 'have: batch_topk_k10, ')
    names = err.split('have: ')[1].strip().split(', ')
    assert names.count('topk_k40') == 1 and names.count('random/topk_k40') == 1  # saes/, then saes_random/
    # a later sweep of one architecture keeps the other SAEs, and says so; the control's model is
    # the same, so its file is kept as it was: the control's other SAEs still count as trained on it
    random_digest = D.file_digest(f'{tmp_path}/out/othello/model_random.pt')
    TR.main(['--game=othello', '--preset=tiny', '--stage=sae', '--sae_archs=topk', *dirs])
    out = capsys.readouterr().out
    assert 'SAEs this run did not write' in out and tiny_middle_sae('standard') in out, out
    assert sorted(os.listdir(f'{tmp_path}/out/othello/saes')) == saes
    assert D.file_digest(f'{tmp_path}/out/othello/model_random.pt') == random_digest
    topk = S.load(f"{tmp_path}/out/othello/saes/{tiny_middle_sae('topk')}.pt")
    assert topk.meta['train_config']['layer'] == 1  # --stage sae resolves --layer's -1 from model.pt's depth
    # its saved scores ('final') are those of a held-out batch: activations of the val games
    cfg = TR.TrainConfig(**topk.meta['train_config'])
    model = load_checkpoint(f'{tmp_path}/out/othello/model.pt', 'othello')[0].eval()
    val = D.load_data('othello', 'val', f'{tmp_path}/data')
    held_out = held_out_batch(model, val['tokens'][:, :model.config.block_size + 1], 1, val['pad_id'], cfg)
    assert topk.meta['final'] == pytest.approx(metrics.sae_scores(topk, held_out), rel=1e-4, abs=1e-6)
    EV.main(['--game=othello', *dirs])
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if 'skip' in line] == []
    # results.json keeps the split used, which the note gives, not the 1000 + 1000 games asked for
    used = re.search(r'labels (\d+) games; using (\d+) train \+ (\d+) test', out)
    config = json.load(open(f'{tmp_path}/out/othello/results.json'))['config']
    assert used and (config['n_train'], config['n_test']) == (int(used[2]), int(used[3])), out
    assert config['n_unsup_games'] == min(200, int(used[3])) and int(used[2]) + int(used[3]) <= int(used[1])
    table = open(f'{tmp_path}/out/othello/results.md').read()
    controls = [name[:-3] for name in os.listdir(f'{tmp_path}/out/othello/saes_random')]
    assert len(controls) > 3 and all(f'| {name} | random |' in table for name in controls)
    # the control's model: the trained model's shape as initialised after seed + 1, never trained
    control = torch.load(f'{tmp_path}/out/othello/model_random.pt', weights_only=True)
    torch.manual_seed(control['train_config']['seed'] + 1)
    fresh = GPT(model.config).state_dict()  # model: model.pt's, loaded above
    assert fresh.keys() == control['model'].keys()
    assert all(torch.equal(fresh[k], v) for k, v in control['model'].items())
    assert not torch.equal(control['model']['wte.weight'], model.wte.weight)
    # the baselines alone: the control's probe is fitted on the random-init model's activations,
    # and a probe row shows its micro-F1 and accuracy (scores stubbed, so that the row tells which)
    fits, fit = [], metrics.fit_linear_probe
    monkeypatch.setattr(metrics, 'fit_linear_probe', lambda x, *a, **k: fits.append(x) or fit(x, *a, **k))
    monkeypatch.setattr(metrics, 'probe_scores', lambda *_: {'f1_micro': 0.25, 'accuracy': 0.5, 'f1_mean': 0.75})
    rows = EV.evaluate(EV.EvalConfig(saes='none', device='cpu', data_dir=f'{tmp_path}/data', out_dir=f'{tmp_path}/out'),
                       log=lambda _: None)
    assert len(fits) == 2 and fits[0].shape == fits[1].shape and not torch.equal(fits[0], fits[1])
    probes = [r for r in rows if r['arch'] == 'probe']
    assert [r['name'] for r in probes] == ['linear_probe', 'linear_probe_random']
    for r in probes:
        assert {v for k, v in r.items() if k.startswith('reconstruction_')} == {0.25}
        assert {v for k, v in r.items() if k.startswith('probe_accuracy_')} == {0.5}


def compile_with_dynamo_eager(monkeypatch):
    """torch.compile with dynamo's plain 'eager' backend whatever the caller asks (traced as for
    the GPU's compiler, run op by op: no compiler needed). Returns the list of the functions
    compiled, each with the options asked for: [(fn, {option: value})]."""
    compiled, compile_ = [], torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compiled.append((fn, kw)) or compile_(fn, backend='eager'))
    return compiled


def saes_of(losses):
    """The SAEs whose losses a function of sae.compile_losses (the function before torch.compile) computes."""
    return dict(zip(losses.__code__.co_freevars, (c.cell_contents for c in losses.__closure__)))['saes']


@pytest.mark.parametrize('gflops, want', [
    # a machine at about 100 GFLOP/s whose 256^3 timing came while it was busy (10): on to 2048
    ({256: 10, 512: 90, 1024: 100, 2048: 95}, (100, 1024)),
    # bf16 emulated at about 1 GFLOP/s: 1024^3 would take 1.95 s a call, over the 0.5 s allowed
    ({256: 1, 512: 1.1}, (1.1, 512)),
])
def test_the_bench_ceiling_is_the_best_size(gflops, want, monkeypatch):
    import bench
    tried = []

    def fake_timed(fn, seconds, min_reps=2, device='cpu', warm_up=True):
        n = len(fn.__closure__[0].cell_contents)  # the a of `a @ a`
        tried.append(n)
        return 2 * n ** 3 / (gflops[n] * 1e9)
    monkeypatch.setattr(bench, 'timed', fake_timed)
    assert bench.matmul_ceiling(torch.float32, 2.0, 'cpu') == pytest.approx(want)
    assert tried == sorted(gflops)  # each size up to the last the budget allows, none beyond


def test_bench_figures_are_the_rates_of_their_times(monkeypatch, capsys):
    # every step "takes" 2 microseconds (nothing runs), against ceilings of 1000 GFLOP/s (fp32)
    # and 4000 (bf16): each printed figure, recomputed here from its documented FLOP count
    import bench
    import train as TR
    seconds, ceilings = 2e-6, {'float32': 1000.0, 'bfloat16': 4000.0}
    monkeypatch.setattr(bench, 'timed', lambda fn, *a, **kw: seconds)
    monkeypatch.setattr(bench, 'first_call', lambda fn, device: 1.0)
    monkeypatch.setattr(bench, 'bf16_known_slower', lambda *a: '')  # bf16 timed too
    monkeypatch.setitem(bench.SHAPES, 'cpu', {'lm': (2, 2, 16, 8, 4), 'sae': (8, 256, 32)})
    cfg = bench.BenchConfig(seconds=0.01)
    number = lambda text: float(text.replace(',', ''))

    def check(line, rate, flop, ceiling):  # "<rate> <unit>/s = <GFLOP/s> GFLOP/s, <%> of the ..."
        m = re.search(r'([0-9,.]+) (?:tok|act)/s(?: through all \d+ SAEs \([0-9.]+M SAE-act/s\))? = +([0-9.]+) '
                      r'GFLOP/s, +([0-9]+)% of the', line)
        assert m, line
        assert number(m[1]) == pytest.approx(rate, abs=0.5) and number(m[2]) == pytest.approx(rate * flop / 1e9, abs=0.05)
        assert int(m[3]) == round(100 * rate * flop / 1e9 / ceiling), line

    # the LM: tokens a step B x T (the inputs), FLOP a token 6 x parameters (no position
    # embedding; the tied head once) + 12 x layers x width x context
    bench.bench_lm(cfg, ceilings)
    lines = capsys.readouterr().out.splitlines()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=33, block_size=8, n_layer=2, n_head=2, n_embd=16, pad_id=32))
    n_params = sum(p.numel() for name, p in model.named_parameters() if 'wpe' not in name)
    for line, dtype in zip(lines[1:], ('float32', 'bfloat16')):
        check(line, 4 * 8 / seconds, 6 * n_params + 12 * 2 * 16 * 8, ceilings[dtype])
    # an SAE: FLOP an activation 10 x d_in x d_sae, against its matmuls' precision's ceiling
    bench.bench_sae(cfg, ceilings)
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 2 * len(S.ARCHS)
    for line in lines:
        check(line, 32 / seconds, 10 * 8 * 256, ceilings['bfloat16' if 'bfloat16' in line else 'float32'])
    # the GPU's sweep (its branches run here): n SAEs, each doing the FLOP of one a step, against
    # the bf16 ceiling; the host floor's cap and each architecture's 3 SAEs alike
    monkeypatch.setattr(bench, 'on_gpu', lambda cfg: True)
    monkeypatch.setattr(bench, 'choose_precision', lambda *a, **kw: ('bfloat16', ''))
    monkeypatch.setitem(bench.SHAPES, 'cuda', {'lm': (2, 2, 16, 8, 4), 'sae': (8, 256, 32)})
    monkeypatch.setattr(TR, 'SWEEP', {arch: TR.SWEEP[arch] for arch in ('standard', 'topk')})
    bench.bench_sweep(cfg, ceilings)
    out = capsys.readouterr().out
    n, flop = 6, 10 * 8 * 256
    cap = re.search(r'at most ([0-9,]+) act/s = ([0-9.]+) GFLOP/s, ([0-9]+)% of the bf16', out)
    assert number(cap[1]) == pytest.approx(32 / seconds, abs=0.5)
    assert number(cap[2]) == pytest.approx(n * 32 / seconds * flop / 1e9, abs=0.05)
    assert int(cap[3]) == round(100 * n * 32 / seconds * flop / 1e9 / 4000)
    for mode in ('eager', 'compiled', 'graphs'):
        line = re.search(rf'the whole sweep, {mode}: .*', out)[0]
        assert f'through all {n} SAEs ({n * 32 / seconds / 1e6:.2f}M SAE-act/s)' in line, line
        check(line, 32 / seconds, n * flop, 4000)
    for arch in ('standard', 'topk'):
        figures = re.findall(r'\| \w+ +([0-9.]+) GFLOP/s, +([0-9]+)%', re.search(rf'  {arch} +x3 .*', out)[0])
        assert len(figures) == 3
        for gflops, share in figures:
            assert float(gflops) == pytest.approx(3 * 32 / seconds * flop / 1e9, abs=0.05)
            assert int(share) == round(100 * 3 * 32 / seconds * flop / 1e9 / 4000)
    # Othello: 20 naive games a call against 100,000 vectorised ones, each call the same seconds
    bench.bench_othello(cfg, ceilings)
    assert capsys.readouterr().out == (f'othello generation: vectorised {1e5 / seconds:,.0f} games/s, '
                                       f'naive Python {20 / seconds:,.0f} games/s -> 5000x\n')


def test_bench_gpu_set_runs_on_the_cpu_at_small_shapes(monkeypatch, capsys):
    # bench.py --device=cuda's branches (the compiled LM, the whole compiled sweep), run here on
    # the CPU at small shapes with dynamo's plain 'eager' backend standing in for the GPU's
    # compiler: a GPU session gets one run, so its script must not first meet these lines there
    import bench
    import model as M
    import train as TR
    monkeypatch.setattr(bench, 'on_gpu', lambda cfg: True)
    # fp32 throughout, as a GPU without bf16 units would: the real probe of these tiny matmuls on
    # a busy CPU can measure bf16 faster at one call and slower at the next, and then the bench
    # picks bf16 for the LM and skips it as slower (1 of 20 runs beside a busy process)
    monkeypatch.setattr(M, 'matmul_seconds', fake_matmul_timer(0.5)[0])
    monkeypatch.setitem(bench.SHAPES, 'cuda', {'lm': (2, 2, 16, 8, 4), 'sae': (8, 256, 32)})  # TopK's k 160 < 256
    # three architectures of the sweep, to be quick: the host state of p-annealing and BatchTopK's
    monkeypatch.setattr(TR, 'SWEEP', {arch: TR.SWEEP[arch] for arch in ('standard', 'p_anneal', 'batch_topk')})
    compiled = compile_with_dynamo_eager(monkeypatch)
    bench.main(['--seconds=0.01', '--profile'])
    out = capsys.readouterr().out
    # --profile: a compiled step's time by kernel (here CPU time, by op), beside each mode's wall time
    prof = re.search(r'profile of a compiled step of the whole sweep: ([0-9.]+) ms of CPU time a step \(wall ms a step: '
                     r'eager [0-9.]+, compiled [0-9.]+, graphs [0-9.]+\); the most expensive:\n((?:    .*\n){12})', out)
    assert prof and float(prof[1]) > 0, out
    shares = [float(m) for m in re.findall(r'^ +[0-9.]+ ms +([0-9]+)% +[0-9]+x a step  \S', prof[2], re.M)]
    assert len(shares) == 12 and shares == sorted(shares, reverse=True) and sum(shares) <= 100 + 6, prof[2]
    # then every kernel's time by kind, largest first, adding up to the step's total
    kinds = re.search(r'\n  by kind: (.*)\n', out[prof.end() - 1:])[1]
    ms = {k: float(v) for k, v in re.findall(r'([a-z -]+) ([0-9.]+) ms \([0-9]+%\)(?:, |$)', kinds)}
    assert 'matmul' in ms and list(ms.values()) == sorted(ms.values(), reverse=True), kinds
    assert sum(ms.values()) == pytest.approx(float(prof[1]), abs=0.01 * len(ms) + 0.05), kinds
    assert re.search(r'float32 compiled +[0-9,]+ tok/s = .*% of the fp32 matmul ceiling \(first step, compiling', out)
    # train.py's own LM step (soft targets, clipping), then with its batches drawn as well
    for name in ("train.py's step", '+ its batches', '+ Muon'):
        assert re.search(rf'  {re.escape(name)} +[0-9,]+ tok/s = .*% of the fp32 matmul ceiling$', out, re.M), name
    # and the LM's compiled steps, the plain one and train.py's, after their figures
    assert re.search(r'  \+ CUDA graphs +[0-9,]+ tok/s = .*% of the fp32 matmul ceiling \(first step, compiling', out)
    walls = (r"float32 eager [0-9.]+, float32 compiled [0-9.]+, train.py's step [0-9.]+, \+ its batches [0-9.]+, "
             r"\+ Muon [0-9.]+, \+ CUDA graphs [0-9.]+")
    for what in ('a compiled LM step', "a step of train.py's LM, its batch drawn"):
        lm_prof = re.search(rf'profile of {what}: ([0-9.]+) ms of CPU time a step \(wall ms a step: {walls}\); '
                            r'the most expensive:\n((?:    .*\n){12})', out)
        assert lm_prof and float(lm_prof[1]) > 0 and out.index('+ its batches') < lm_prof.start() < out.index('SAE sweep'), out
    for arch, settings in TR.SWEEP.items():
        assert re.search(rf'{arch} +x{len(settings)} \| eager .*% \| compiled .*% \(compiling .*\| graphs .*% \(compiling', out), arch
    n = sum(len(s) for s in TR.SWEEP.values())
    for mode in ('graphs', 'compiled', 'eager'):
        assert re.search(rf'the whole sweep, {mode}: [0-9,]+ act/s through all {n} SAEs', out), mode
    assert re.search(r'CUDA graphs skipped \(torch.s count\): 0', out)
    floor = re.search(r'host floor: ([0-9.]+) ms a step .* batch 32 at most ([0-9,]+) act/s', out)
    # act/s = batch / floor, with floor printed to 0.1 ms: the rate lies between what the printed
    # figure's ends give (a fixed 2% was too tight for a floor under 2.5 ms, whose 0.05 ms of
    # rounding is more than 2% of it)
    assert floor and float(floor[1]) >= 0.1, out
    assert 32e3 / (float(floor[1]) + 0.05) - 1 <= int(floor[2].replace(',', '')) <= 32e3 / (float(floor[1]) - 0.05) + 1, floor[0]
    # the LM's 2 blocks, again as CUDA graphs, and back (for the profile); then the whole sweep's
    # losses as one function, compiled and again with CUDA graphs (the compiled one then
    # profiled), then each architecture's the same two ways
    want = [None] * 2 + ['reduce-overhead'] * 2 + [None] * 2 + [None, 'reduce-overhead'] * (1 + len(TR.SWEEP))
    assert [kw.get('mode') for fn, kw in compiled] == want
    assert out.index('the whole sweep, graphs') < out.index('profile of a compiled step') < out.index('  standard ')
    # CUDA graphs that fail cost the bench their own figures only: the LM's
    def fails(*args):
        raise RuntimeError('no graphs here\nsecond line')
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, mode=None, **kw: compile_(fn, **kw) if mode is None else fails)
    bench.main(['--seconds=0.01', '--only=lm'])
    out = capsys.readouterr().out
    assert re.search(r"^  \+ CUDA graphs +failed \(RuntimeError: no graphs here\)$", out, re.M), out
    assert "train.py's step" in out and out.count(' tok/s = ') == 5, out
    monkeypatch.setattr(torch, 'compile', compile_)
    # and the sweep's
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', fails)
    monkeypatch.setattr(TR, 'SWEEP', {'standard': TR.SWEEP['standard']})
    bench.main(['--seconds=0.01', '--only=sae'])
    out = capsys.readouterr().out
    assert out.count('CUDA graphs failed') == 1 and '  the whole sweep: CUDA graphs failed (RuntimeError: no graphs here); the rest' in out
    assert 'the whole sweep, graphs' not in out and 'the whole sweep, compiled' in out and 'the whole sweep, eager' in out
    for arch in TR.SWEEP:
        assert re.search(rf'{arch} +x\d \| eager .*% \| compiled .*% \(compiling [0-9]+s\)$', out, re.M), arch
    # --per_arch=False: the whole sweep's figures without each architecture's
    bench.main(['--seconds=0.01', '--only=sae', '--per_arch=False'])
    out = capsys.readouterr().out
    assert 'the whole sweep, compiled' in out and not re.search(r'standard +x\d \|', out)
    # --only=machine (.ci/gpu's ceiling beside the gpu preset's run): the ceilings, no benchmark
    bench.main(['--seconds=0.01', '--only=machine'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith('ceilings: fp32 matmul ') and 'bf16 matmul' in lines[-1] and len(lines) == 3


def test_lm_cuda_graphs_compile_the_blocks_for_graphs_and_train(tmp_path, monkeypatch):
    # --lm_cuda_graphs (a GPU only: refused here, so set after the checks) compiles each block
    # with mode='reduce-overhead', and the LM trains on them as on the plain compiled blocks
    import train as TR
    compiled = compile_with_dynamo_eager(monkeypatch)
    cfg = TR.build_config(['--game=othello', '--preset=tiny', '--max_iters=4', '--dtype=float32', '--compile',
                           f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'])
    path = TR.train_lm(dataclasses.replace(cfg, lm_cuda_graphs=True), log=lambda _: None)
    assert [kw for fn, kw in compiled] == [{'mode': 'reduce-overhead'}] * cfg.n_layer
    model, ckpt = load_checkpoint(path, 'othello')
    assert ckpt['iter'] == 4 and ckpt['train_config']['lm_cuda_graphs'] and math.isfinite(ckpt['val_loss'])
    # the same run on the plain compiled blocks: the same weights, bit for bit
    compiled.clear()
    plain = TR.train_lm(dataclasses.replace(cfg, out_dir=f'{tmp_path}/plain'), log=lambda _: None)
    assert [kw for fn, kw in compiled] == [{}] * cfg.n_layer
    want = torch.load(plain, weights_only=True)['model']
    assert want.keys() == ckpt['model'].keys() and all(torch.equal(ckpt['model'][k], v) for k, v in want.items())


def test_the_precompile_process_compiles_the_sweeps_own_saes(tmp_path, monkeypatch, capsys):
    # --sae_precompile: a second process compiles the sweep's losses while the LM trains; it only
    # helps if it compiles the very SAEs the sweep will (classes, settings, shapes, order, options)
    import train as TR
    compiled = compile_with_dynamo_eager(monkeypatch)
    monkeypatch.setenv('TORCH_COMPILE_DISABLE', '1')  # the second process here: eager, so quick
    args = ['--game=othello', '--preset=tiny', '--sae_archs=topk,p_anneal,jumprelu', '--control=one', '--dtype=float32',
            '--max_iters=10', '--sae_steps=5', '--sae_compile', '--sae_precompile', f'--data_dir={tmp_path}/data',
            f'--out_dir={tmp_path}/out']
    TR.main(args)
    out = capsys.readouterr().out
    assert out.index("a second process compiles the sweep's losses") < out.index('LM stage done')
    assert re.search(r"LM stage done in .*\nsae: the second process compiled the sweep's losses in [0-9.]+s", out), out

    def what(compiled):  # each compiled function: its SAEs' classes, settings and precision, and the options
        return [([(type(sae), sae.cfg, sae.matmul_dtype) for sae in saes_of(fn)], kw) for fn, kw in compiled]
    sweep = what(compiled)
    compiled.clear()
    TR.warm_sae_compile(json.dumps(dataclasses.asdict(TR.build_config(args))))
    # the sweep's 9 SAEs in one function, then the control's 3 (its middle settings) in another
    assert what(compiled) == sweep and [len(group) for group, _ in sweep] == [9, 3]
    # a second process that fails, or runs too long, costs the sweep nothing but its compiling
    for code, timeout, want in (('print("boom"); raise SystemExit(3)', 60, 'exit code 3: boom'),
                                ('import time; time.sleep(60)', 0.5, 'stopped after 0.5s more')):
        logged, output = [], tempfile.TemporaryFile()
        TR.join_sae_precompile((subprocess.Popen([sys.executable, '-c', code], stdout=output), output), logged.append,
                               timeout=timeout)
        assert logged == [f"sae: the second process did not finish ({want}); the sweep compiles its losses itself"]


def test_sae_stage_runs_its_matmuls_in_the_chosen_precision(tmp_path, monkeypatch):
    import train as TR
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    TR.main(['--game=othello', '--preset=tiny', '--stage=lm', '--max_iters=3', '--eval_iters=1', '--legal_games=5', *dirs])
    seen = []
    matmul = S.SAE._matmul
    monkeypatch.setattr(S.SAE, '_matmul', lambda self, *a: seen.append((self.matmul_dtype, torch.is_grad_enabled()))
                        or matmul(self, *a))
    for dtype in ('float32', 'bfloat16'):
        seen.clear()
        TR.main(['--game=othello', '--preset=tiny', '--stage=sae', '--sae_archs=standard,topk', '--sae_steps=3',
                 '--control=none', f'--dtype={dtype}', *dirs])
        # the training steps in the chosen precision; the scores saved with each SAE, the last
        # products, in fp32, as a loaded SAE computes
        assert {dt for dt, grad in seen if grad} == {getattr(torch, dtype)}
        assert seen[-1] == (torch.float32, False)
    # the files hold fp32 parameters, and a loaded SAE computes in fp32
    sae = S.load(f"{tmp_path}/out/othello/saes/{tiny_middle_sae('standard')}.pt", 'othello')
    assert sae.matmul_dtype == torch.float32 and all(p.dtype == torch.float32 for p in sae.parameters())
    # --sae_compile compiles the SAEs' losses as one function (here with dynamo's plain 'eager'
    # backend: traced as for the GPU's compiler, run op by op; test_compiled_loss_... checks the
    # traces) and trains on it. With --sae_cuda_graphs (a GPU only: refused here, so set after
    # the checks) it is compiled for CUDA graphs, and each step of the sweep is marked once,
    # before its SAEs' step
    compiled = compile_with_dynamo_eager(monkeypatch)
    events = []
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: events.append('mark'))
    monkeypatch.setattr(TR, 'train_step', lambda saes, *a: events.append(len(saes)) or S.train_step(saes, *a))
    cfg = TR.build_config(['--game=othello', '--preset=tiny', '--sae_archs=topk', '--sae_steps=3', '--control=none',
                           '--dtype=float32', '--sae_compile', *dirs])
    TR.train_saes(dataclasses.replace(cfg, sae_cuda_graphs=True), log=lambda _: None)
    assert [kw for fn, kw in compiled] == [{'mode': 'reduce-overhead'}]
    assert [(sae.arch, sae.cfg['k'], sae.loss_compiled, sae.loss_graphed) for sae in saes_of(compiled[0][0])] == \
        [('topk', k, True, True) for k in (10, 40, 160)]
    assert events == ['mark', 3] * 3  # 3 steps, each of the 3 SAEs together
    sae = S.load(f'{tmp_path}/out/othello/saes/topk_k40.pt', 'othello')
    assert sae.meta['train_config']['sae_compile'] and math.isfinite(sae.meta['final']['explained_variance'])


def test_tiny_chess_pipeline_and_evaluation(tmp_path, capsys):
    import json
    import evaluate as EV
    import train as TR
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    TR.main(['--game=chess', '--preset=tiny', '--max_iters=20', '--legal_games=5', '--sae_archs=topk',
             '--sae_steps=20', '--workers=1', *dirs])
    EV.main(['--game=chess', '--n_train=50', '--n_test=50', '--probe_steps=20', *dirs])
    results = json.load(open(f'{tmp_path}/out/chess/results.json'))
    assert results['sets'] == ['piece', 'strategy']
    rows = {r['name'] + '/' + r['model']: r for r in results['rows']}
    assert len(rows) == 3 + 1 + 5  # topk x 3, its control, MLP neurons, probe and probe dictionary x 2
    for r in results['rows']:
        for k in ('reconstruction_piece', 'reconstruction_strategy'):
            assert 0.0 <= r[k] <= 1.0
    # the piece set and the nested strategy set (the mean over its 14 properties), recomputed
    want, feats = recomputed_scores(tmp_path, 'chess', f'{tmp_path}/out/chess/saes/topk_k40.pt', 50, 50)
    assert {k: rows['topk_k40/trained'][k] for k in want} == pytest.approx(want, abs=1e-6)
    # --feature on chess boards: the feature that fires most often
    index = int((feats > 0).sum(0).argmax())
    capsys.readouterr()
    EV.main(['--game=chess', f'--feature=topk_k40:{index}', *dirs])
    out = capsys.readouterr().out
    assert 'best-matching board-state elements' in out and re.search(r'game \d+, character \d+: ', out), out


def test_sae_scores_in_batches_match_the_definitions():
    torch.manual_seed(0)
    sae = small_sae('standard')
    x = raw_batch(B=50, seed=4)
    with torch.no_grad():
        sae.b_enc[:8] = -1e4  # these features never fire, so the dead fraction is not 0
        x_hat, f = sae(x)
    s = metrics.sae_scores(sae, x, batch_size=7)
    s2, x_hat2 = metrics.sae_scores(sae, x, batch_size=7, reconstruction=True)
    assert s2 == s and torch.allclose(x_hat2, x_hat, atol=1e-6)
    # counted by hand from one pass over all rows
    rows = f.tolist()
    assert s['l0'] == pytest.approx(sum(sum(v != 0 for v in r) for r in rows) / 50, abs=1e-12)
    n_dead = sum(all(r[i] <= 0 for r in rows) for i in range(D_SAE))
    assert 0 < n_dead < D_SAE and s['dead_fraction'] == pytest.approx(n_dead / D_SAE, abs=1e-12)
    xd, hd = x.numpy().astype(np.float64), x_hat.numpy().astype(np.float64)
    fve = 1 - ((xd - hd) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum()
    # fp32 matmuls of another batch shape may round differently: equal to float32 precision
    assert s["explained_variance"] == pytest.approx(fve, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# evaluate.py's pictures

def test_pareto_png_is_written_and_a_failed_plot_keeps_the_results(tmp_path, monkeypatch):
    import json
    import evaluate as E
    sets = ['mine_theirs', 'legal']
    rows = [{'name': f'{arch}_{i}', 'arch': arch, 'model': kind, 'l0': l0,
             **{f'{m}_{s}': 0.1 * i + (kind == 'trained') * 0.3 for s in sets for m in ('coverage', 'reconstruction')}}
            for kind in ('trained', 'random') for arch in ('standard', 'topk') for i, l0 in enumerate((5.0, 20.0, 80.0))]
    rows += [{'name': 'linear_probe', 'arch': 'probe', 'model': 'trained', 'l0': None,
              **{f'{m}_{s}': None if m == 'coverage' else 0.9 for s in sets for m in ('coverage', 'reconstruction')}},
             {'name': 'mlp_neurons', 'arch': 'mlp', 'model': 'trained', 'l0': 50.0,
              **{f'{m}_{s}': 0.5 for s in sets for m in ('coverage', 'reconstruction')}}]
    cfg = E.EvalConfig(out_dir=str(tmp_path))
    out = tmp_path / 'othello'
    out.mkdir()
    log = []
    E.write_outputs(cfg, rows, sets, '# the table', log=log.append)
    assert (out / 'pareto.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and (out / 'pareto.png').stat().st_size > 10_000
    # each panel holds its own model's SAEs: coverage on the trained model, then on the random one
    plt, figures = E.pyplot(), []
    subplots = plt.subplots
    monkeypatch.setattr(plt, 'subplots', lambda *a, **k: figures.append(subplots(*a, **k)) or figures[-1])
    E.plot_pareto(str(tmp_path / 'p.png'), rows, sets)
    axes = figures[0][1]
    for j, shift in ((0, 0.3), (1, 0.0)):
        line = next(line for line in axes[0, j].get_lines() if line.get_label() == 'standard')
        assert list(line.get_xdata()) == [5.0, 20.0, 80.0]
        assert list(line.get_ydata()) == pytest.approx([shift, 0.1 + shift, 0.2 + shift])
    monkeypatch.undo()
    assert json.loads((out / 'results.json').read_text())['rows'] == rows

    # a plot that fails leaves no pareto.png: not the last run's beside the new results
    def broken(*args):
        raise RuntimeError('no room for a picture')
    monkeypatch.setattr(E, 'plot_pareto', broken)
    log = []
    E.write_outputs(cfg, rows, sets, '# the table', log=log.append)
    assert json.loads((out / 'results.json').read_text())['rows'] == rows
    assert (out / 'results.md').read_text() == '# the table' and not (out / 'pareto.png').exists()
    assert any('pareto.png not written (RuntimeError: no room for a picture)' in line for line in log)


def test_feature_heatmap_is_the_mean_activation_where_each_square_is_true():
    import evaluate as E
    acts = torch.tensor([1.0, 3.0, 0.0, 5.0])
    lab = torch.zeros(4, 3, dtype=torch.bool)
    lab[:2, 0] = True  # a1 at positions 0 and 1: mean 2
    lab[3, 1] = True  # h8 at position 3: mean 5; the third column (e4) never occurs
    maps = E.feature_heatmaps(acts, {'mine': (lab, [(0, 0), (1, 63), (2, D.SQUARE_NAMES.index('e4'))])})
    grid = maps['mine']  # rank 8 first
    assert grid[7, 0] == 2.0 and grid[0, 7] == 5.0 and torch.isnan(grid[4, 4])
    assert torch.isnan(grid).sum() == 62  # squares with no column, and e4


# ------------------------------------------------------------------------------------------------
# Hostile input: every case gets one line (no traceback), a non-zero exit, its previous good files
# intact, and no temp or lock file left behind (README, "Hostile input")

import errno
import signal
import time

import bench
import evaluate as EV
import train as TR


def run_main(main, argv, monkeypatch, capsys):
    """A script's main through data.run_cli in this process, as its command line: (exit code, stderr)."""
    monkeypatch.setattr(sys, 'argv', ['script.py', *argv])
    sigterm = signal.getsignal(signal.SIGTERM)  # run_cli installs its own
    code = 0
    try:
        D.run_cli(main)
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return code, capsys.readouterr().err


def files_under(path):
    """Every file under `path`, relative to it (hidden ones included)."""
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


@pytest.mark.parametrize('main, argv, config', [
    (TR.main, ['--game=chess', '--preset=cpu', '--n_layer=3', '-h'], None),  # None: the chess cpu preset's
    (EV.main, ['--help', '--n_test=7'], EV.EvalConfig(n_test=7)),
    (D.main, ['--help'], D.DataConfig()),
    (bench.main, ['--help'], bench.BenchConfig()),
])
def test_help_lists_every_option_with_its_value_and_comment(main, argv, config, tmp_path, monkeypatch, capsys):
    if config is None:  # train.py: the defaults, then the preset for the game, then the command line
        common, per_game = TR.PRESETS['cpu']
        config = TR.TrainConfig(**{**common, **per_game['chess'], 'game': 'chess', 'preset': 'cpu',
                                   'device': 'cpu', 'n_layer': 3})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['script.py', *argv])
    with pytest.raises(SystemExit) as stop:
        D.run_cli(main)
    out = capsys.readouterr().out
    assert stop.value.code == 0 and files_under(tmp_path) == []  # nothing made, nothing written
    assert out.startswith(sys.modules[main.__module__].__doc__.strip().split('\n')[0])  # what the script is
    options = [line.split()[0] for line in out.splitlines() if line.startswith('  --')]
    assert options == [f'--{f.name}={getattr(config, f.name)}' for f in dataclasses.fields(config)]
    source = inspect.getsource(type(config))  # each option's line carries its comment from the source
    for line in out.splitlines():
        if line.startswith('  --') and len(line.split(None, 1)) == 2:
            assert line.split(None, 1)[1] in source, line


def assert_one_line(err, *needles):
    assert err.count('\n') == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize('main, argv, flag', [
    (TR.main, ['--batch_size=0'], '--batch_size=0'),
    (TR.main, ['--max_iters=-1'], '--max_iters=-1'),
    (TR.main, ['--layer=99'], '--layer=99'),  # tiny: 2 layers
    (TR.main, ['--layer=-2'], '--layer=-2'),
    (TR.main, ['--lr=nan'], '--lr=nan'),
    (TR.main, ['--lr=inf'], '--lr=inf'),
    (TR.main, ['--min_lr=-1e-4'], '--min_lr'),
    (TR.main, ['--dropout=1'], '--dropout'),
    (TR.main, ['--n_head=0'], '--n_head=0'),
    (TR.main, ['--n_embd=33'], '--n_embd=33'),  # tiny: 2 heads
    (TR.main, ['--block_size=0'], '--block_size=0'),
    (TR.main, ['--sae_expansion=0'], '--sae_expansion=0'),
    (TR.main, ['--sae_batch=0'], '--sae_batch=0'),
    (TR.main, ['--sae_steps=0'], '--sae_steps=0'),
    (TR.main, ['--sae_buffer=100'], '--sae_buffer=100'),  # fewer than one batch: no batch ever
    (TR.main, ['--sae_warmup=0'], '--sae_warmup=0'),
    (TR.main, ['--grad_clip=0'], '--grad_clip=0'),
    (TR.main, ['--eval_iters=0'], '--eval_iters=0'),
    (TR.main, ['--max_iters=1e999'], '--max_iters'),
    (TR.main, ['--sae_archs=topk,bogus'], 'bogus'),  # would fail only after the LM had trained
    (TR.main, ['--control=maybe'], '--control'),
    (TR.main, ['--device=cuda:99'], '--device=cuda:99'),  # no machine has 100 GPUs
    (TR.main, ['--device=tpu'], '--device=tpu'),
    (TR.main, ['--dtype=float16'], '--dtype=float16'),
    (TR.main, ['--sae_cuda_graphs', '--sae_compile'], '--sae_cuda_graphs needs a CUDA GPU'),  # a CPU here
    (TR.main, ['--preset=gpu', '--sae_cuda_graphs=True'], '--sae_cuda_graphs needs a CUDA GPU'),  # asked for, not the preset's
    (TR.main, ['--sae_grid=paper'], '--sae_grid'),
    (TR.main, ['--lm_cuda_graphs', '--compile'], '--lm_cuda_graphs needs a CUDA GPU'),  # a CPU here
    (bench.main, ['--device=tpu'], '--device=tpu'),
    (D.main, ['--n_games=-5'], '--n_games=-5'),
    (D.main, ['--n_val=-3'], '--n_val=-3'),
    (D.main, ['--workers=0'], '--workers=0'),
    (D.main, ['--n_label_games=0'], '--n_label_games=0'),
    (D.main, ['--game=chess', '--max_chars=1'], '--max_chars=1'),
    (EV.main, ['--n_train=0'], '--n_train=0'),
    (EV.main, ['--batch_size=-1'], '--batch_size=-1'),
    (EV.main, ['--device=cuda:99'], '--device=cuda:99'),
    (bench.main, ['--only=nosuch'], '--only=nosuch'),
    (bench.main, ['--seconds=0'], '--seconds=0'),
    (bench.main, ['--profile'], '--profile'),  # the CPU's benchmarks have no sweep to profile
])
def test_bad_values_are_refused_before_any_work(main, argv, flag, tmp_path, monkeypatch, capsys):
    dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
    dirs = {TR.main: dirs, EV.main: dirs, D.main: dirs[:1], bench.main: []}[main]
    code, err = run_main(main, argv + dirs, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, flag)
    assert os.listdir(tmp_path) == []  # nothing written


def test_bad_value_on_the_command_line(tmp_path):
    rc, out = run_script('train.py', '--batch_size=0', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out')
    assert rc == 2 and out.strip().splitlines()[-1].startswith('error: train.py: --batch_size=0') and 'Traceback' not in out
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope='module')
def tiny_out(tmp_path_factory):
    """A tiny Othello data set and out dir: model.pt (2 layers, iter 5) and one SAE trained on it."""
    root = tmp_path_factory.mktemp('tiny_out')
    D.prepare(D.DataConfig(game='othello', n_games=30, n_val=20, n_label_games=10, workers=1,
                           data_dir=str(root / 'data')), log=lambda _: None)
    model_path = str(root / 'out' / 'othello' / 'model.pt')
    model = GPT(GPTConfig(vocab_size=61, block_size=59, n_layer=2, n_head=2, n_embd=16, pad_id=60))
    save_checkpoint(model_path, model, 'othello', {'iter': 5})
    torch.manual_seed(0)
    sae = S.make_sae('topk', 16, 32, k=4, total_steps=1)
    S.save(sae, str(root / 'out' / 'othello' / 'saes' / 'topk_k4.pt'),
           {'name': 'topk_k4', 'game': 'othello', 'layer': 0, 'model': {'sha256': D.file_digest(model_path)}})
    return root


def test_evaluate_splits_fewer_labelled_games_than_asked_in_half(tiny_out):
    import evaluate as EV  # 10 games labelled, 1000 + 1000 asked: 5 train, 5 test
    ev = EV.Evaluation(EV.EvalConfig(device='cpu', data_dir=f'{tiny_out}/data', out_dir=f'{tiny_out}/out'),
                       log=lambda _: None)
    assert (ev.cfg.n_train, ev.cfg.n_test) == (5, 5)


def test_the_best_row_per_architecture_is_the_best_mean_reconstruction():
    # two TopK SAEs: A reconstructs the board better on average (0.8 and 0.6 against 0.9 and 0.1:
    # mean 0.7 against 0.5), B covers it better; the "Best" table keeps A, the full table both; a
    # standard SAE better still comes first
    import evaluate as EV
    def row(name, rec, cov, model='trained'):
        return {'name': name, 'arch': 'topk', 'model': model, 'l0': 10.0, 'explained_variance': 0.9,
                'ce_loss_score': 0.9, 'dead_fraction': 0.0, 'coverage_board': cov, 'reconstruction_board': rec[0],
                'coverage_legal': cov, 'reconstruction_legal': rec[1]}
    rows = [row('topk_b', (0.9, 0.1), 0.9), row('topk_a', (0.8, 0.6), 0.1), row('topk_c', (0.5, 0.1), 0.5, 'random'),
            dict(row('standard_a', (0.95, 0.95), 0.2), arch='standard', ce_loss_score=-12.345)]
    text = EV.report(EV.EvalConfig(), rows, ['board', 'legal'], 1.0)
    best = text.split('## Best per architecture')[1].split('## All')[0]
    assert '| topk_a | trained |' in best and '| topk_b |' not in best and '| topk_c | random |' in best
    assert best.index('| standard_a |') < best.index('| topk_a |') < best.index('| topk_c |')
    # a CE loss score far below 0 (a reconstruction worse than zeros): one decimal, as any number of 10 or more
    assert '| standard_a | trained | 10.0 | 0.900 | -12.3 |' in best
    assert [EV.fmt(v) for v in (-12.345, 12.345, 0.12345, None, 3)] == ['-12.3', '12.3', '0.123', '', '3']
    assert EV.PAPER['othello'] in text and EV.PAPER['chess'] not in text
    assert EV.PAPER['chess'] in EV.report(EV.EvalConfig(game='chess'), rows, ['board', 'legal'], 1.0)
    assert all(f'| {n} |' in text.split('## All')[1] for n in ('topk_a', 'topk_b', 'topk_c'))


def test_evaluate_on_a_short_context_skips_stale_saes_and_fits_probes_on_train(tiny_out, tmp_path, monkeypatch):
    # a model of context 20 (the games are longer: only labels at inputs 0..19 count), one SAE at
    # block 0 of 2 (the baselines read the SAEs' block, not the default 1), one trained on another
    # model.pt and one control without model_random.pt (both skipped, each with a line)
    import evaluate as EV
    shutil.copytree(tiny_out / 'data', tmp_path / 'data')
    out = tmp_path / 'out' / 'othello'
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, block_size=20, n_layer=2, n_head=2, n_embd=16, pad_id=60)).eval()
    save_checkpoint(str(out / 'model.pt'), model, 'othello', {'iter': 5})
    sae = S.make_sae('topk', 16, 32, k=4, total_steps=1)
    for sub, name, digest in (('saes', 'topk_k4', D.file_digest(str(out / 'model.pt'))), ('saes', 'topk_old', 'another'),
                              ('saes_random', 'topk_k4', 'any')):
        S.save(sae, str(out / sub / f'{name}.pt'), {'name': name, 'game': 'othello', 'layer': 0, 'model': {'sha256': digest}})
    fits, scored, fit = [], [], metrics.fit_linear_probe
    monkeypatch.setattr(metrics, 'fit_linear_probe', lambda x, lab, **kw: fits.append((len(x), fit(x, lab, **kw))) or fits[-1][1])
    probe_scores = metrics.probe_scores
    monkeypatch.setattr(metrics, 'probe_scores', lambda logits, lab: scored.append(len(logits)) or probe_scores(logits, lab))
    logs = []
    rows = EV.evaluate(EV.EvalConfig(n_train=4, n_test=3, probe_steps=5, device='cpu', data_dir=str(tmp_path / 'data'),
                                     out_dir=str(tmp_path / 'out')), log=logs.append)
    skipped = [line for line in logs if line.startswith('skip ')]
    assert len(skipped) == 2 and 'saes/topk_old.pt' in skipped[0] and 'saes_random/topk_k4.pt' in skipped[1]
    assert [r['name'] for r in rows if r['arch'] == 'topk'] == ['topk_k4'] and all(r['layer'] == 0 for r in rows)
    # the splits, from the labels (10 games): games 0..3 label the features and fit the probe,
    # 4..6 score
    labels = D.load_data('othello', 'labels', str(tmp_path / 'data'))
    g, p = labels['game_idx'], labels['pos']
    train, test = (g < 4) & (p < 20), (g >= 4) & (g < 7) & (p < 20)
    assert [n for n, _ in fits] == [int(train.sum())] and set(scored) == {int(test.sum())} != {int(train.sum())}
    # the probes as a dictionary: each element's probability (not its logit) as a feature, all
    # 192 of them (mine/theirs, then legal) competing for each element of a set
    tokens = D.load_data('othello', 'val', str(tmp_path / 'data'))['tokens'][:4, :20].long()
    with torch.no_grad():
        x_train = model.residual(tokens, 0)[g[train], p[train]]  # (P, 16)
        probability = torch.sigmoid(fits[0][1](x_train))  # (P, 192)
    assert list(labels['sets']) == ['mine_theirs', 'legal']
    want = metrics.coverage(probability, labels['sets']['mine_theirs'][train])
    assert next(r for r in rows if r['name'] == 'probe_dictionary')['coverage_mine_theirs'] == pytest.approx(want, abs=1e-9)


def test_layer_and_resume_are_checked_against_the_checkpoint(tiny_out, monkeypatch, capsys):
    dirs = [f'--data_dir={tiny_out}/data', f'--out_dir={tiny_out}/out']
    before = files_under(tiny_out)
    code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--layer=2', *dirs], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, '--layer=2', 'use -1 or 0..1', 'model.pt has 2 layers')
    code, err = run_main(TR.main, ['--preset=tiny', '--stage=lm', '--resume', '--max_iters=5', *dirs], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'is at iter 5', '--max_iters')
    assert files_under(tiny_out) == before  # no lock file left, nothing trained or written


def test_a_bf16_sweep_scores_its_saes_as_evaluate_does_in_fp32(tiny_out, tmp_path):
    # trained with bf16 products (as where bf16 measures the faster), the scores saved in each SAE
    # file ('final') are those of the loaded SAE, which computes in fp32, on the same held-out batch
    cfg = TR.build_config(['--preset=tiny', '--dtype=bfloat16', '--sae_steps=6', f'--data_dir={tiny_out}/data'])
    model, _ = load_checkpoint(str(tiny_out / 'out' / 'othello' / 'model.pt'), 'othello')
    train, val = TR.ensure_data(cfg, lambda _: None)
    tokens, val_tokens = train['tokens'], val['tokens']
    sweep = [('topk', {'k': 4}), ('standard', {'coef': 1.0})]
    with torch_threads(1):
        TR.train_sae_sweep(cfg, model, {'random_init': True}, tokens, val_tokens, train['pad_id'], sweep,
                           str(tmp_path), log=lambda _: None)
    held_out = held_out_batch(model, val_tokens, TR.default_layer(2), train['pad_id'], cfg)
    for arch, setting in sweep:
        sae = S.load(str(tmp_path / f'{TR.sae_name(arch, setting)}.pt'))
        assert sae.meta['layer'] == TR.default_layer(2)
        assert sae.matmul_dtype == torch.float32
        assert sae.meta['final'] == pytest.approx(metrics.sae_scores(sae, held_out), rel=1e-6, abs=1e-9)


def test_a_sweeps_lr_schedule_and_its_activations_a_second(tiny_out, tmp_path, monkeypatch):
    # the SAE lr: linear warm-up over --sae_warmup steps ((s+1)/w), then constant, then a linear
    # decay over the last 20% of steps (5(1 - s/n)): by hand for 10 steps, warm-up 4, lr 1e-2.
    # The speed saved in each file: the steps after the first (which compiles, under
    # --sae_compile) on a fake clock, 10 s for the first and 0.5 s each after it: 9 steps of
    # B activations through each of the 2 SAEs in 4.5 s
    cfg = TR.build_config(['--preset=tiny', '--dtype=float32', '--sae_steps=10', '--sae_warmup=4', '--sae_lr=1e-2',
                           '--sae_minutes=0', '--sae_log_interval=100', f'--data_dir={tiny_out}/data'])
    model, _ = load_checkpoint(str(tiny_out / 'out' / 'othello' / 'model.pt'), 'othello')
    train, val = TR.ensure_data(cfg, lambda _: None)
    lrs, clock, train_step = [], [0.0], TR.train_step

    def timed_step(saes, optimizer, x, step, lr, losses):
        lrs.append(lr)
        clock[0] += 10.0 if step == 0 else 0.5
        return train_step(saes, optimizer, x, step, lr, losses)

    monkeypatch.setattr(TR, 'train_step', timed_step)
    monkeypatch.setattr(TR.time, 'perf_counter', lambda: clock[0])
    sweep = [('topk', {'k': 4}), ('standard', {'coef': 1.0})]
    with torch_threads(1):
        TR.train_sae_sweep(cfg, model, {'random_init': True}, train['tokens'], val['tokens'], train['pad_id'], sweep,
                           str(tmp_path), log=lambda _: None)
    assert lrs == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 5e-3], rel=1e-9)
    for arch, setting in sweep:
        meta = S.load(str(tmp_path / f'{TR.sae_name(arch, setting)}.pt')).meta
        assert meta['acts_per_s'] == pytest.approx(9 * cfg.sae_batch * 2 / 4.5) and meta['steps'] == 10


def test_an_sae_starts_from_the_init_of_its_name_in_any_sweep():
    # its seed comes from its name: the control's SAE starts as the sweep's of the same name (a
    # paired comparison of the trained and random-init models), whatever else either trains
    cfg = TR.build_config(['--preset=tiny', '--dtype=float32'])
    first = torch.randn(256, 32)
    sweep = TR.new_sweep_saes(cfg, [('topk', {'k': 10}), ('standard', {'coef': 0.85}), ('topk', {'k': 40})], 256, 40, first)
    control = TR.new_sweep_saes(cfg, [('topk', {'k': 40})], 256, 40, first)
    for name in control['topk_k40'].state_dict():
        assert torch.equal(control['topk_k40'].state_dict()[name], sweep['topk_k40'].state_dict()[name]), name
    assert not torch.equal(sweep['topk_k10'].W_dec, sweep['topk_k40'].W_dec)
    assert not torch.equal(sweep['topk_k10'].W_dec, sweep['standard_coef0.85'].W_dec)


def test_evaluates_hint_for_more_labels_makes_these_games_again(tmp_path, capsys):
    # 30 + 20 games, 10 labelled: the note's data.py command keeps the 30 training games (not
    # data.py's default 500k) and labels the 40 evaluate.py asks for, in 40 val games
    import evaluate as EV
    D.prepare(D.DataConfig(game='othello', n_games=30, n_val=20, n_label_games=10, seed=5, workers=1,
                           data_dir=str(tmp_path / 'data')), log=lambda _: None)
    save_checkpoint(str(tmp_path / 'out' / 'othello' / 'model.pt'), GPT(GPTConfig(
        vocab_size=61, block_size=59, n_layer=2, n_head=2, n_embd=16, pad_id=60)), 'othello', {'iter': 5})
    EV.main(['--game=othello', '--saes=none', '--n_train=20', '--n_test=20', '--probe_steps=5',
             f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'])
    hint = re.search(r'\(more: `python data\.py (.*)` makes the games again\)', capsys.readouterr().out).group(1)
    assert hint == f'--game othello --data_dir={tmp_path}/data --n_games=30 --seed=5 --n_val=40 --n_label_games=40'
    D.main(hint.split() + ['--workers=1'])
    train, labels = D.load_data('othello', 'train', str(tmp_path / 'data')), D.load_data('othello', 'labels', str(tmp_path / 'data'))
    assert len(train['tokens']) == 30 and int(labels['game_idx'].max()) + 1 == 40


def test_labels_too_few_or_of_another_data_set_are_one_line(tmp_path, monkeypatch, capsys):
    import evaluate as EV
    for name, seed, n_label_games in (('one', 5, 1), ('other', 6, 10)):
        D.prepare(D.DataConfig(game='othello', n_games=30, n_val=20, n_label_games=n_label_games, seed=seed,
                               workers=1, data_dir=str(tmp_path / name)), log=lambda _: None)
    save_checkpoint(str(tmp_path / 'out' / 'othello' / 'model.pt'), GPT(GPTConfig(
        vocab_size=61, block_size=59, n_layer=2, n_head=2, n_embd=16, pad_id=60)), 'othello', {'iter': 5})
    args = ['--game=othello', '--saes=none', '--probe_steps=5', f'--out_dir={tmp_path}/out']
    # one labelled game: none left to score the features on
    code, err = run_main(EV.main, args + [f'--data_dir={tmp_path}/one'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'too few labelled positions', '(1 games)', f'python data.py --game othello --data_dir={tmp_path}/one')
    # another data set's labels (another seed) beside these val games
    shutil.copy(tmp_path / 'other' / 'othello' / 'labels.pt', tmp_path / 'one' / 'othello' / 'labels.pt')
    code, err = run_main(EV.main, args + [f'--data_dir={tmp_path}/one'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'labels.pt and val.pt beside it were made by different data.py runs')


def test_too_few_labels_from_a_short_pgn_ask_for_a_longer_file(tmp_path, monkeypatch, capsys):
    # 5 games: data.py keeps a tenth, one, for validation, whatever --n_val says: more labelled
    # games need a longer file, which the line says (not a command that remakes the same one)
    pgn = tmp_path / 'five.pgn'
    pgn.write_text('\n'.join([PGN_GOOD_1, PGN_GOOD_2] * 2 + [PGN_GOOD_1]))
    D.prepare(D.DataConfig(game='chess', source=str(pgn), workers=1, data_dir=str(tmp_path / 'data')), log=lambda _: None)
    assert len(D.load_data('chess', 'val', str(tmp_path / 'data'))['tokens']) == 1
    save_checkpoint(str(tmp_path / 'out' / 'chess' / 'model.pt'), GPT(GPTConfig(
        vocab_size=33, block_size=255, n_layer=1, n_head=2, n_embd=16, pad_id=CHESS_PAD_ID)), 'chess', {'iter': 5})
    code, err = run_main(EV.main, ['--game=chess', '--saes=none', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'],
                         monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'too few labelled positions', f'{pgn} gave 1 val game(s)',
                    'from a .pgn of at least 32000 games, 30000 to train on and 2000 to label')


def test_a_kill_in_the_control_resumes_at_the_control(tmp_path, monkeypatch, capsys):
    # the sweep, shorter than --sae_ckpt_minutes, is done; the run is killed as the control
    # begins: --resume trains the control, not the sweep again
    D.prepare(D.DataConfig(game='othello', n_games=30, n_val=20, n_label_games=10, workers=1,
                           data_dir=str(tmp_path / 'data')), log=lambda _: None)
    out = tmp_path / 'out' / 'othello'
    save_checkpoint(str(out / 'model.pt'), GPT(GPTConfig(vocab_size=61, block_size=59, n_layer=2, n_head=2,
                                                          n_embd=32, pad_id=60)), 'othello', {'iter': 5})
    args = ['--preset=tiny', '--stage=sae', '--sae_archs=topk', '--sae_steps=30', '--dtype=float32',
            f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']

    def killed(*_):
        raise Killed
    with monkeypatch.context() as m:
        m.setattr(TR, 'control_grid', killed)
        with pytest.raises(Killed):
            TR.main(args)
    saved = torch.load(out / 'sae_sweep.pt', weights_only=True)
    assert saved['part'] == 'saes_random' and saved['state'] is None and saved['done'][1] == 30
    assert sorted(f"{r['name']}.pt" for r in saved['done'][0]) == files_under(out / 'saes') and len(saved['done'][0]) == 3
    capsys.readouterr()
    TR.main(args + ['--resume'])
    log = capsys.readouterr().out
    assert '(saes_random)' in log and f'into {out}/saes/' not in log and f'into {out}/saes_random/' in log
    assert len(files_under(out / 'saes_random')) == 1 and not os.path.exists(out / 'sae_sweep.pt')


def test_a_sweep_resumes_only_as_it_was_started(tiny_out, monkeypatch, capsys):
    # tiny_out's model is 16 wide: 10 x 16 features hold TopK's k 160
    dirs = [f'--data_dir={tiny_out}/data', f'--out_dir={tiny_out}/out']
    out = tiny_out / 'out' / 'othello'
    cfg = TR.build_config(['--preset=tiny', '--stage=sae', '--sae_expansion=10', *dirs])
    cfg.layer = TR.resolved_layer(cfg, 2)  # as the sweep saves it: the block read, of the 2-layer model.pt
    saved = {'format': TR.SWEEP_FORMAT, 'version': TR.SWEEP_VERSION, 'part': 'saes', 'done': None, 'state': {},
             'model_sha256': D.file_digest(str(out / 'model.pt')), 'options': TR.sweep_options(cfg)}
    D.atomic_save(saved, str(out / 'sae_sweep.pt'))
    before = files_under(tiny_out)
    try:
        for argv, needles in ((['--sae_steps=7'], ('sae_sweep.pt is a sweep with --sae_steps=40', 'resume with it')),
                              (['--seed=1'], ('--seed=1337',)), (['--layer=0'], ('a sweep with --layer=1',)),
                              (['--anneal_start=0.5'], (f'a sweep with --anneal_start={cfg.anneal_start}',)),
                              (['--control=none'], (f'a sweep with --control={cfg.control}',))):
            code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--resume', *argv, *dirs], monkeypatch, capsys)
            assert code == 2
            assert_one_line(err, *needles)
        D.atomic_save({**saved, 'model_sha256': 'another'}, str(out / 'sae_sweep.pt'))
        code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--resume', *dirs], monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, 'a sweep on another', 'model.pt')
        # a checkpoint of the code before one optimiser served the whole sweep (an optimizer per SAE)
        D.atomic_save({**saved, 'version': 1}, str(out / 'sae_sweep.pt'))
        code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--resume', *dirs], monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, f'sae_sweep.pt has format version 1, this code reads {TR.SWEEP_VERSION}',
                        f'`python train.py --game othello {" ".join(dirs)} --stage sae`')  # the command for these dirs
        os.rename(out / 'sae_sweep.pt', out / 'sae_sweep.0of2.pt')  # the checkpoint of rank 0 of 2
        code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--resume', *dirs], monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, 'sae_sweep.0of2.pt', 'another number of processes', '--nproc_per_node')
        assert files_under(tiny_out) == [f.replace('sae_sweep.pt', 'sae_sweep.0of2.pt') for f in before]
        # rank 0 of 2 processes, whose checkpoint is there and the other's not (a kill before that
        # one had written its first): neither can resume its share alone, and both refuse alike
        with monkeypatch.context() as m:
            m.setattr(TR, 'rank_and_world', lambda: (0, 2))
            def agree(value, op):  # the other process has none: the sum is this one's
                assert op == torch.distributed.ReduceOp.SUM  # the count of checkpoints (MAX would refuse every resume)
                return value
            m.setattr(TR, 'agree', agree)
            code, err = run_main(TR.main, ['--preset=tiny', '--stage=sae', '--sae_expansion=10', '--resume', *dirs],
                                 monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, 'the sweep checkpoints of 1 of these 2 processes', 'run without --resume',
                        f'`python train.py --game othello {" ".join(dirs)} --stage sae`')
        assert files_under(tiny_out) == [f.replace('sae_sweep.pt', 'sae_sweep.0of2.pt') for f in before]
    finally:
        for f in glob.glob(str(out / 'sae_sweep*')):
            os.remove(f)
    # a --batch_size smaller than the number of processes cannot give each one a row
    monkeypatch.setattr(TR, 'rank_and_world', lambda: (0, 4))
    code, err = run_main(TR.main, ['--preset=tiny', '--batch_size=3', *dirs], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, '--batch_size=3', 'with 4 processes')


def test_out_dir_naming_a_file_fails_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / 'a_file').write_text('keep me')
    for out_dir in ('a_file', 'a_file/deeper'):
        code, err = run_main(TR.main, ['--preset=tiny', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/{out_dir}'],
                             monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, '--out_dir', 'is a file')
    os.makedirs(tmp_path / 'out' / 'othello')
    (tmp_path / 'out' / 'othello' / 'saes').write_text('')  # where the SAE stage writes
    code, err = run_main(TR.main, ['--preset=tiny', f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out'],
                         monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, '--out_dir', 'saes is a file')
    assert files_under(tmp_path) == ['a_file', 'out/othello/saes']  # no data made, no LM trained
    assert (tmp_path / 'a_file').read_text() == 'keep me'


def test_a_directory_that_cannot_be_made_is_one_line_naming_the_flag(tmp_path, monkeypatch):
    # what check_output_dir cannot foresee (/proc, a full or read-only mount seen as writable)
    def refuse(path, exist_ok=False):
        raise PermissionError(errno.EACCES, 'Permission denied', path)
    monkeypatch.setattr(D.os, 'makedirs', refuse)
    with pytest.raises(D.UserError, match=r'cannot make directory .*/out \(Permission denied\): pick another --out_dir$'):
        with D.lock_dir(str(tmp_path / 'out'), 'out_dir'):
            pass


@pytest.mark.parametrize('feature', ['topk_k10:\u00b2', '/abs/path/topk_k10:1', '../saes/topk_k10:1', 'random/..:1',
                                     'topk_k10', ':3'])
def test_a_feature_is_a_name_and_an_index_not_a_path(feature, tmp_path, monkeypatch, capsys):
    # a superscript two passes str.isdigit but not int(); a path would load any file and write
    # the picture under a folder named after it
    code, err = run_main(EV.main, [f'--feature={feature}', f'--out_dir={tmp_path}/out', f'--data_dir={tmp_path}/d'],
                         monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, '--feature wants NAME:INDEX')
    assert not os.listdir(tmp_path)


def test_evaluate_hints_carry_the_directories_it_was_given(tmp_path, monkeypatch, capsys):
    code, err = run_main(EV.main, [f'--out_dir={tmp_path}/out'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, f'`python train.py --game othello --out_dir={tmp_path}/out` first')
    code, err = run_main(EV.main, [f'--out_dir={tmp_path}/out', f'--data_dir={tmp_path}/d'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, f'`python train.py --game othello --data_dir={tmp_path}/d --out_dir={tmp_path}/out` first')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'othello').write_text('not a directory')
    code, err = run_main(EV.main, [f'--out_dir={tmp_path}/out'], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, f'{tmp_path}/out/othello is a file, not the directory train.py writes')


def zip_writer_failure():
    """What torch.save raises on a full disk (a small tmpfs): its zip writer's RuntimeError, raised
    while the OSError (ENOSPC) that caused it was being handled."""
    e = RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')
    e.__context__ = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return e


@pytest.mark.parametrize('failure, code, message', [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), 2, 'No space left on device'),
    (zip_writer_failure(), 2, 'No space left on device'),
    (KeyboardInterrupt(), 130, 'interrupted'),
])
def test_full_disk_or_ctrl_c_while_saving_keeps_the_previous_data(failure, code, message, tmp_path, monkeypatch, capsys):
    argv = ['--n_games=30', '--n_val=20', '--n_label_games=10', '--workers=1', f'--data_dir={tmp_path}']
    monkeypatch.setattr(sys, 'stdout', open(os.devnull, 'w'))  # progress lines
    D.prepare(D.parse_config(D.DataConfig(), argv, 'data.py'), log=lambda _: None)
    before = {f: (tmp_path / f).read_bytes() for f in files_under(tmp_path)}
    assert sorted(before) == ['othello/labels.pt', 'othello/train.pt', 'othello/val.pt']
    real_save, calls = torch.save, []

    def save_then_fail(obj, f):  # the second file (val.pt) fails half-way
        calls.append(1)
        if len(calls) == 2:
            f.write(b'half a file')
            raise failure
        real_save(obj, f)

    monkeypatch.setattr(torch, 'save', save_then_fail)
    got, err = run_main(D.main, argv + ['--seed=7'], monkeypatch, capsys)
    assert got == code and len(calls) == 2
    assert_one_line(err, message)
    assert {f: (tmp_path / f).read_bytes() for f in files_under(tmp_path)} == before  # no temp or lock file either


def test_a_directory_where_a_file_goes_is_one_line_and_keeps_the_other_files(tmp_path, monkeypatch, capsys):
    argv = ['--n_games=30', '--n_val=20', '--n_label_games=10', '--workers=1', f'--data_dir={tmp_path}']
    D.prepare(D.parse_config(D.DataConfig(), argv, 'data.py'), log=lambda _: None)
    os.remove(tmp_path / 'othello' / 'val.pt')
    os.makedirs(tmp_path / 'othello' / 'val.pt' / 'x')
    before = {f: (tmp_path / f).read_bytes() for f in files_under(tmp_path)}
    got, err = run_main(D.main, argv + ['--seed=7'], monkeypatch, capsys)
    assert got == 2
    assert_one_line(err, 'val.pt: a directory is there', 'remove it')
    assert {f: (tmp_path / f).read_bytes() for f in files_under(tmp_path)} == before  # labels.pt kept, no temp file


def test_out_of_memory_is_one_line_and_other_errors_stay_tracebacks(monkeypatch, capsys):
    # what torch raises when a size is too large for the machine: the CPU allocator's RuntimeError
    # (--batch_size=1e9), a GPU's OutOfMemoryError or CUDA error, also wrapped by torch.compile or
    # `raise from`; any other RuntimeError is a bug to show whole
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 472000000000 bytes. Error code 12 (Cannot allocate memory)")
    from torch._inductor.exc import InductorError
    gpu = torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')
    wrapped = RuntimeError('while running the sweep')  # `raise ... from` an out-of-memory error
    wrapped.__cause__ = gpu
    for failure in (cpu, gpu, MemoryError(), torch.AcceleratorError('CUDA error: out of memory'),
                    InductorError(gpu, None), wrapped):
        def main(argv):
            raise failure
        code, err = run_main(main, [], monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, 'out of memory', 'use smaller sizes (--batch_size')

    def buggy(argv):
        raise RuntimeError('shape mismatch')
    with pytest.raises(RuntimeError, match='shape mismatch'):
        run_main(buggy, [], monkeypatch, capsys)

    def buggy_while_handling(argv):  # a bug in the code that handles an out-of-memory error is a bug
        try:
            raise gpu
        except RuntimeError:
            raise RuntimeError('shape mismatch')
    with pytest.raises(RuntimeError, match='shape mismatch'):
        run_main(buggy_while_handling, [], monkeypatch, capsys)


def test_a_process_that_lost_the_others_of_its_torchrun_says_so_in_one_line(monkeypatch, capsys):
    # gloo's error when another process stopped (its own error, printed above, is the news); one
    # process, not under torchrun, shows such an error whole
    import torch.distributed as dist
    def lost(argv):
        raise RuntimeError('[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:55689')
    monkeypatch.setenv('RANK', '1')
    with monkeypatch.context() as m:
        m.setattr(dist, 'is_initialized', lambda: True)
        code, err = run_main(lost, [], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, 'process 1 of this torchrun stopped: another one did')
    with pytest.raises(RuntimeError, match='Connection closed by peer'):
        run_main(lost, [], monkeypatch, capsys)


def test_a_file_that_would_not_load_safely_is_refused_as_it_is_saved(tmp_path):
    # atomic_save loads what it wrote with weights_only (the tensors mapped, not read): an object
    # that weights_only refuses fails the save, the previous file stays, and no temp file is left
    import fractions
    path = str(tmp_path / 'model.pt')
    D.atomic_save({'w': torch.arange(3.0), 'step': 1}, path)
    with pytest.raises(pickle.UnpicklingError):
        D.atomic_save({'w': torch.zeros(3), 'step': fractions.Fraction(1, 3)}, path)
    assert files_under(tmp_path) == ['model.pt']
    assert torch.load(path, weights_only=True)['w'].tolist() == [0.0, 1.0, 2.0]


def test_random_bytes_or_junk_text_as_a_pgn_file(tmp_path, monkeypatch, capsys):
    rng = random.Random(0)
    (tmp_path / 'random.pgn').write_bytes(rng.randbytes(20_000))
    # text python-chess's parser raises on (an IndexError on a NAG before any move, for one)
    (tmp_path / 'junk.pgn').write_text(''.join(rng.choice('abcdefgh12345678NBRQK+#x=O-[]{}()"!?$ .;\n')
                                               for _ in range(20_000)))
    for name, message in (('random.pgn', 'not a PGN file'), ('junk.pgn', 'no valid games')):
        code, err = run_main(D.main, ['--game=chess', f'--source={tmp_path}/{name}', f'--data_dir={tmp_path}/data'],
                             monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, name, message)
    assert not os.path.exists(tmp_path / 'data')


def test_ctrl_c_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    lr_at = TR.lr_at

    def ctrl_c_at_iter_3(it, cfg, clock=0.0):  # Ctrl-C raises KeyboardInterrupt wherever Python is
        if it == 3:
            raise KeyboardInterrupt
        return lr_at(it, cfg, clock)

    monkeypatch.setattr(TR, 'lr_at', ctrl_c_at_iter_3)
    code, err = run_main(TR.main, ['--preset=tiny', '--stage=lm', '--n_layer=1', '--n_embd=16', '--batch_size=4',
                                   '--eval_interval=2', '--eval_iters=1', '--n_games=100', '--n_val=20',
                                   '--n_label_games=5', '--workers=1', f'--data_dir={tmp_path}/data',
                                   f'--out_dir={tmp_path}/out'], monkeypatch, capsys)
    assert code == 130
    assert_one_line(err, 'interrupted')
    assert torch.load(f'{tmp_path}/out/othello/model.pt', weights_only=True)['iter'] == 2  # the last save, whole
    assert files_under(tmp_path / 'out') == ['othello/model.pt']  # no temp file, no lock file


def sigint_caught(pid):
    """Whether process `pid` catches SIGINT (Linux: the SigCgt mask in /proc), or None once it is gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            mask = next(line for line in f if line.startswith('SigCgt:')).split()[1]
    except (OSError, StopIteration):
        return None
    return bool(int(mask, 16) >> (signal.SIGINT - 1) & 1)


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='reads the signal mask in /proc')
@pytest.mark.parametrize('script', ['data.py', 'train.py', 'evaluate.py', 'bench.py'])
def test_ctrl_c_while_torch_loads_stops_quietly(script, tmp_path):
    # Python catches SIGINT from its start; each script lets it go while torch loads (it writes
    # nothing then), so a Ctrl-C there stops the run without a traceback; run_cli then catches it
    # again for its one-line message
    p = subprocess.Popen([sys.executable, os.path.join(HERE, script)], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for wanted in (True, False):  # Python started (its handler), then the script let SIGINT go
            deadline = time.time() + 30
            while sigint_caught(p.pid) is not wanted and p.poll() is None and time.time() < deadline:
                time.sleep(0.001)
            assert sigint_caught(p.pid) is wanted, f'SIGINT caught: never {wanted} while the script started'
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGINT and err == ''
    assert files_under(tmp_path) == []


@pytest.mark.parametrize('names', [('results.json', 'results.md'), ('train.pt', 'val.pt', 'labels.pt')])
def test_a_set_interrupted_among_its_renames_shows_as_incomplete(names, tmp_path, monkeypatch):
    # atomic_write of a set (data.py's train, val, labels; evaluate.py's results): its last file
    # goes before the renames, so Ctrl-C after the first rename leaves no old last file to vouch
    # for a mixed set
    paths = [tmp_path / name for name in names]
    for path in paths:
        path.write_text('old')
    replace, renamed = os.replace, []

    def interrupted(src, dst):
        renamed.append(dst)
        if len(renamed) == len(paths) - 1:
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.atomic_write({str(path): (lambda tmp: open(tmp, 'w').write('new')) for path in paths})
    assert [p.read_text() if p.exists() else None for p in paths] == ['new'] * (len(paths) - 2) + ['old', None]
    assert files_under(tmp_path) == sorted(names[:-1])  # no temp file either


def test_a_kill_while_writing_leaves_the_previous_file_and_no_temp(tmp_path):
    # evaluate.py writes results.json and results.md (and every other file) through atomic_write
    (tmp_path / 'results.json').write_text('{"previous": true}')
    script = ("import sys, time, data as D\n"
              "def write(tmp):\n"
              "    f = open(tmp, 'w'); f.write('{\"rows\": ['); f.flush()\n"
              "    print('half written', flush=True); time.sleep(60)\n"
              f"D.run_cli(lambda argv: D.atomic_write({{{str(tmp_path / 'results.json')!r}: write}}))\n")
    p = subprocess.Popen([sys.executable, '-c', script], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'half written\n'
        assert len(files_under(tmp_path)) == 2  # results.json and its temp file
        p.terminate()  # SIGTERM, what `kill` sends
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130
    assert_one_line(err, 'interrupted')
    assert files_under(tmp_path) == ['results.json'] and (tmp_path / 'results.json').read_text() == '{"previous": true}'


def process_state(pid):
    """The state letter of process `pid` from /proc (R, S, Z, ...), or None if there is none."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_a_kill_9_of_the_main_process_ends_its_workers_quietly():
    # data making's pool workers go with their main process (a SIGTERM from the kernel) instead of
    # finishing their game and printing a BrokenPipe traceback when its result has nowhere to go
    script = ("import os, time, data as D\n"
              "def game():\n"
              "    print(os.getpid(), flush=True); time.sleep(1.0)\n"
              "pool = D.make_pool(1)\n"
              "pool.apply_async(game)\n"
              "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, '-c', script], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = int(p.stdout.readline())  # the worker has its game
        p.kill()
        _, err = p.communicate(timeout=30)  # stderr closes once the worker, which shares it, is gone too
    finally:
        p.kill()
    assert err == ''
    deadline = time.time() + 30  # its files closed, it may still be finishing its exit
    while process_state(worker) not in (None, 'Z') and time.time() < deadline:
        time.sleep(0.01)
    assert process_state(worker) in (None, 'Z')  # gone, or a zombie until its new parent reaps it


def test_a_kill_9_while_writing_leaves_the_previous_file_whole(tmp_path):
    # SIGKILL: no clean-up runs, so the temp file stays beside the intact old file until the next
    # run that locks the directory (every script's run does) removes it
    (tmp_path / 'results.json').write_text('{"previous": true}')
    script = ("import time, data as D\n"
              "def write(tmp):\n"
              "    f = open(tmp, 'w'); f.write('{\"rows\": ['); f.flush()\n"
              "    print('half written', flush=True); time.sleep(60)\n"
              f"D.atomic_write({{{str(tmp_path / 'results.json')!r}: write}})\n")
    p = subprocess.Popen([sys.executable, '-c', script], cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'half written\n'
        p.kill()
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    assert files_under(tmp_path) == ['results.json', f'results.json.tmp{p.pid}']
    assert json.loads((tmp_path / 'results.json').read_text()) == {'previous': True}
    with D.lock_dir(str(tmp_path), 'out_dir'):
        assert files_under(tmp_path) == ['.lock', 'results.json']


def test_evaluate_feature_refuses_an_sae_of_another_model(tiny_out, monkeypatch, capsys):
    argv = ['--feature=topk_k4:1', f'--data_dir={tiny_out}/data', f'--out_dir={tiny_out}/out', '--n_train=5', '--n_test=5']
    code, err = run_main(EV.main, argv, monkeypatch, capsys)  # trained on this model: explained
    assert code == 0, err
    model_path = tiny_out / 'out' / 'othello' / 'model.pt'
    before = model_path.read_bytes()
    try:  # another model.pt (retrained since): the SAE no longer belongs to it
        save_checkpoint(str(model_path), GPT(GPTConfig(vocab_size=61, block_size=59, n_layer=2, n_head=2, n_embd=16)),
                        'othello', {'iter': 6})
        code, err = run_main(EV.main, argv, monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, 'topk_k4.pt: trained on another model.pt', '--stage sae')
    finally:
        model_path.write_bytes(before)


def test_a_second_run_refuses_while_the_first_lives_and_not_once_it_is_killed(tmp_path, monkeypatch, capsys):
    out = tmp_path / 'out' / 'othello'
    ready, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first run: holds the lock, with a file half-written, until killed
        try:
            lock = D.lock_dir(str(out), 'out_dir')
            lock.__enter__()
            (out / f'model.pt.tmp{os.getpid()}').write_text('half')
            os.makedirs(out / 'saes')  # and one in a folder under it (the SAE stage's files)
            (out / 'saes' / f'topk.pt.tmp{os.getpid()}').write_text('half')
            os.write(ready_w, b'1')
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready, 1) == b'1'
        dirs = [f'--data_dir={tmp_path}/data', f'--out_dir={tmp_path}/out']
        for main, argv in ((TR.main, ['--preset=tiny']), (EV.main, [])):
            code, err = run_main(main, argv + dirs, monkeypatch, capsys)
            assert code == 2
            assert_one_line(err, f'in use by another run (pid {pid})', '--out_dir')
        assert not os.path.exists(tmp_path / 'data')  # refused before making data
    finally:
        os.kill(pid, signal.SIGKILL)  # no clean-up runs: the lock file and the temp file stay
        os.waitpid(pid, 0)
        os.close(ready)
    assert files_under(out) == ['.lock', f'model.pt.tmp{pid}', f'saes/topk.pt.tmp{pid}']
    assert (out / '.lock').read_text() == f'{pid}\n'
    (out / 'notes.tmp').write_text('a user file')  # not one of ours: kept
    with D.lock_dir(str(out), 'out_dir'):  # the dead run does not block, and its temp files go
        assert (out / '.lock').read_text() == f'{os.getpid()}\n'
        assert files_under(out) == ['.lock', 'notes.tmp']
    assert files_under(out) == ['notes.tmp']
    with pytest.raises(D.UserError):  # an error inside releases the lock too, and the empty directory goes
        with D.lock_dir(str(tmp_path / 'other'), 'out_dir'):
            raise D.UserError('boom')
    assert not os.path.exists(tmp_path / 'other')


def test_the_lock_is_taken_on_the_file_on_disk_when_its_last_owner_removed_it_meanwhile(tmp_path, monkeypatch):
    # the last owner removes .lock as it leaves: a run that opened that file just before and locks
    # it just after holds a lock no later run sees, so it must open the file on disk and lock that
    import fcntl
    flock, calls = fcntl.flock, []

    def last_owner_leaves_first(f, op):
        if not calls:  # between this run's open and its first flock
            os.remove(tmp_path / '.lock')
        calls.append(op)
        return flock(f, op)

    monkeypatch.setattr(fcntl, 'flock', last_owner_leaves_first)
    with D.lock_dir(str(tmp_path), 'out_dir'):
        assert len(calls) == 2 and (tmp_path / '.lock').read_text() == f'{os.getpid()}\n'
        with open(tmp_path / '.lock') as other:  # another run (flock: another open file) is refused
            with pytest.raises(BlockingIOError):
                flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# kill -9, then --resume: the same files as a run that never stopped (README, "Resume")

# the subprocesses run on one thread like this process (the one_thread fixture), so that on the
# CPU their sums run in the same order as the in-process reference runs: bit-identical results
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}


def run_train(args, kill_when=None, timeout=900):
    """`python train.py args` (args may start with torchrun's: see torchrun()); with `kill_when`,
    SIGKILLed as soon as that file exists (no clean-up of any kind runs). Returns its output."""
    cmd = args if args[0] == '-m' else ['train.py', *args]
    p = subprocess.Popen([sys.executable, *cmd], cwd=HERE, env=ONE_THREAD, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        if kill_when:
            deadline = time.time() + timeout
            while not os.path.exists(kill_when) and p.poll() is None and time.time() < deadline:
                time.sleep(0.005)
            assert p.poll() is None, f"the run ended before {kill_when} appeared:\n{p.stdout.read()}"
            os.kill(p.pid, signal.SIGKILL)
        out = p.communicate(timeout=timeout)[0]
    finally:
        p.kill()
    assert p.returncode == (-signal.SIGKILL if kill_when else 0), out
    return out


KILL_RUN = ['--game=othello', '--preset=tiny', '--max_iters=40', '--eval_interval=5', '--sae_steps=30',
            '--sae_archs=p_anneal,batch_topk', '--dtype=float32', '--workers=1']


@pytest.fixture(scope='module')
def killed_and_resumed(tmp_path_factory):
    """A tiny run of both stages, uninterrupted (ref/), and the same run (killed/) SIGKILLed after
    the LM's first checkpoint, resumed and SIGKILLed after the SAE sweep's first checkpoint, and
    resumed again. Returns (root, the iter and the sweep step each kill left, the outputs)."""
    root = tmp_path_factory.mktemp('kill')
    common = KILL_RUN + [f'--data_dir={root}/data']
    # the reference in this process (a new python costs about 7 s of imports on a 2-core
    # machine), on one thread as the subprocesses run (ONE_THREAD; a module fixture comes before
    # the one_thread fixture)
    with torch_threads(1):
        TR.main(common + [f'--out_dir={root}/ref'])
    killed = common + [f'--out_dir={root}/killed', '--sae_ckpt_minutes=0']  # a sweep checkpoint every step
    out = root / 'killed' / 'othello'
    run_train(killed, kill_when=out / 'model.pt')
    lm_at = torch.load(out / 'model.pt', weights_only=True)['iter']
    first = run_train(killed + ['--resume'], kill_when=out / 'sae_sweep.pt')
    sweep = torch.load(out / 'sae_sweep.pt', weights_only=True)
    second = run_train(killed + ['--resume'])
    return root, lm_at, (sweep['part'], sweep['state']['step']), first, second


def test_a_killed_lm_run_resumes_to_the_same_weights(killed_and_resumed):
    root, lm_at, _, first, _ = killed_and_resumed
    assert 0 < lm_at < 40 and f'from iter {lm_at}' in first  # killed mid-run, resumed from there
    want, got = (torch.load(root / run / 'othello' / 'model.pt', weights_only=True) for run in ('ref', 'killed'))
    assert got['iter'] == want['iter'] == 40 and got['model'].keys() == want['model'].keys()
    for k, v in want['model'].items():
        assert torch.equal(got['model'][k], v), k  # bit for bit: the same batches in the same order
    assert got['val_loss'] == want['val_loss'] and torch.equal(got['batch_rng'], want['batch_rng'])


def test_a_killed_sae_sweep_resumes_to_the_same_saes(killed_and_resumed):
    root, _, (part, step), _, second = killed_and_resumed
    assert part == 'saes' and 0 < step < 30 and f'resuming 6 SAEs at step {step} of 30' in second
    assert 'the LM is done' not in second and 'resuming' in second
    ref, killed = root / 'ref' / 'othello', root / 'killed' / 'othello'
    names = files_under(ref / 'saes') + files_under(ref / 'saes_random')
    assert len(names) == 6 + 2 and files_under(killed) == files_under(ref)  # no checkpoint or temp file left
    for sub in ('saes', 'saes_random'):
        for name in files_under(ref / sub):
            want, got = (torch.load(d / sub / name, weights_only=True) for d in (ref, killed))
            assert got['cfg'] == want['cfg'] and got['train_state'].keys() == want['train_state'].keys()
            for k, v in want['state_dict'].items():  # weights, act_scale, dead-latent counters, thresholds
                assert torch.equal(got['state_dict'][k], v), (name, k)
            assert got['train_state']['p'] == want['train_state']['p'] and got['train_state']['coef'] == want['train_state']['coef']
            assert got['extra']['history'] == want['extra']['history'] and got['extra']['final'] == want['extra']['final']


# ------------------------------------------------------------------------------------------------
# Several processes: torchrun with 2 processes on the CPU (gloo) against one process

def torchrun(n, *args):
    """torchrun's command line (through python -m, so no torchrun on the PATH is needed)."""
    return ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', 'train.py', *args]


def test_two_processes_train_the_one_process_lm_and_saes(killed_and_resumed):
    root = killed_and_resumed[0]
    ref = root / 'ref' / 'othello'  # one process, the same options
    common = KILL_RUN + [f'--data_dir={root}/data']
    # a killed one-process sweep's checkpoint: a run that starts the sweep over removes it (a
    # later one-process --resume would take it up)
    os.makedirs(root / 'ddp' / 'othello')
    D.atomic_save({'stale': 1}, str(root / 'ddp' / 'othello' / 'sae_sweep.pt'))
    # both stages in one torchrun (each python costs seconds of imports), with a time budget too
    # large to bind, so that the processes agree on the clock (every CLOCK_EVERY steps) and all
    # stop at --max_iters; a clock this far behind the iterations moves the lr by parts in a
    # million at most, far inside the tolerance of the weights below
    out = run_train(torchrun(2, *common, '--lm_minutes=1000', f'--out_dir={root}/ddp'))
    assert '2 processes (gloo)' in out and out.count('final val loss') == 1  # rank 0 alone logs
    # the same global batches, split 16 + 16 rows: the gradient is the one-process gradient up to
    # the order of the float sums, so after 40 steps the weights agree to about 1e-6 here
    got = root / 'ddp' / 'othello'
    model, ckpt = load_checkpoint(str(got / 'model.pt'), 'othello')  # in one process
    want = torch.load(ref / 'model.pt', weights_only=True)
    assert ckpt['iter'] == 40 and ckpt['val_loss'] == pytest.approx(want['val_loss'], abs=1e-4)
    for k, v in want['model'].items():
        assert torch.allclose(ckpt['model'][k], v, rtol=0, atol=1e-4), k
    # the sweep on 2 processes: each process trains its share (3 + 3, then 1 + 1 control SAEs),
    # and every file is the one one process writes on the same model, bit for bit (this process,
    # on one thread as the subprocesses: the one_thread fixture)
    assert "this process's share of 6" in out
    one = root / 'one' / 'othello'
    os.makedirs(one)
    shutil.copy(got / 'model.pt', one / 'model.pt')
    TR.main(common + ['--stage=sae', f'--out_dir={root}/one'])
    assert files_under(got) == files_under(one) == files_under(ref)
    for sub in ('saes', 'saes_random'):
        for name in files_under(one / sub):
            a, b = (torch.load(d / sub / name, weights_only=True) for d in (one, got))
            assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict']), name
            assert a['extra']['history'] == b['extra']['history']
